"""tests/localservers.py against the real binaries: start, use, restart, stop by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.localservers import LOOPBACK, InfluxServer, MosquittoServer, ServerError

CLIENT_TIMEOUT = 10


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_both_servers_serve_restart_and_stop_by_pid() -> None:
    with InfluxServer() as influx, MosquittoServer() as broker:
        pids = [influx.pid, broker.pid]
        first_pid = pids[0]
        assert first_pid is not None
        port, workdir = influx.port, influx.workdir
        assert influx.url == f"http://{LOOPBACK}:{port}"
        influx.create_database("db")
        influx.write("db", b"probe,host=a value=1i 1000\n")
        assert read_probe(influx) == [[1000, "a", 1]]

        mqtt(broker, "mosquitto_pub", "-t", "senseflow/test", "-m", "hello", "-q", "1", "-r")
        received = mqtt(broker, "mosquitto_sub", "-t", "senseflow/test", "-C", "1", "-W", "10")
        assert received.stdout == b"hello\n"

        influx.stop()
        assert influx.pid is None
        assert not is_alive(first_pid)
        influx.start()
        assert influx.port == port
        assert influx.pid not in pids
        assert read_probe(influx) == [[1000, "a", 1]]
        pids.append(influx.pid)
    assert all(pid is not None and not is_alive(pid) for pid in pids)
    assert (influx.pid, broker.pid) == (None, None)
    assert not workdir.exists()


def read_probe(influx: InfluxServer) -> list[list[object]]:
    answer = influx.query("SELECT * FROM probe", "db", epoch="ns")
    values: list[list[object]] = answer["results"][0]["series"][0]["values"]
    return values


def test_influx_reports_errors() -> None:
    with InfluxServer() as influx:
        influx.create_database("db")
        with pytest.raises(ServerError, match="HTTP 400"):
            influx.write("db", b"no fields\n")
        with pytest.raises(ServerError, match="database not found"):
            influx.query("SELECT * FROM m", "nope")


def test_a_port_in_use_fails_start_with_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        server = InfluxServer(tmp_path, port=taken.getsockname()[1], startup_timeout=20)
        with pytest.raises(ServerError, match="address already in use") as failure:
            server.start()
    assert "tail of" in str(failure.value)
    assert server.pid is None
    server.close()
    assert tmp_path.is_dir()  # the caller's directory is the caller's


def test_mosquitto_with_a_password_file() -> None:
    with MosquittoServer(username="sense", password="s3cret: pw") as broker:
        mqtt(broker, "mosquitto_pub", "-t", "t", "-m", "x", "-u", "sense", "-P", "s3cret: pw")
        with pytest.raises(subprocess.CalledProcessError):
            mqtt(broker, "mosquitto_pub", "-t", "t", "-m", "x", "-u", "sense", "-P", "wrong")
        with pytest.raises(subprocess.CalledProcessError):
            mqtt(broker, "mosquitto_pub", "-t", "t", "-m", "x")


def test_mosquitto_restarts_on_the_same_port(mosquitto_server: MosquittoServer) -> None:
    with MosquittoServer() as broker:
        port = broker.port
        broker.stop()
        broker.start()
        assert broker.port == port
        mqtt(broker, "mosquitto_pub", "-t", "t", "-m", "again")
    mqtt(mosquitto_server, "mosquitto_pub", "-t", "t", "-m", "session broker is up")


STUBBORN_BROKER = """\
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(open(sys.argv[2]).read().split()[1])  # "listener <port> <host>" comes first
with socket.create_server(("127.0.0.1", port)):
    while True:
        time.sleep(1)
"""


def test_a_server_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    stub = tmp_path / "stubborn"
    stub.write_text(f"#!{sys.executable}\n{STUBBORN_BROKER}")
    stub.chmod(0o755)
    with MosquittoServer(tmp_path, binary=str(stub)) as broker:
        pid = broker.pid
        assert pid is not None
        assert broker.stop(timeout=0.5) == -signal.SIGKILL
    assert not is_alive(pid)


def mqtt(broker: MosquittoServer, client: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a mosquitto client against the broker; raises if it fails or hangs."""
    command = [client, "-h", broker.host, "-p", str(broker.port), *args]
    return subprocess.run(command, capture_output=True, check=True, timeout=CLIENT_TIMEOUT)
