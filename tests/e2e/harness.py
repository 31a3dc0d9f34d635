"""Drives the real `senseflow run` in its own process group, with real UDP on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tests.localservers import InfluxServer, MosquittoServer, free_ports
from workers.writer.segments import scan_segment

SENSEFLOW = [sys.executable, "-m", "senseflow.cli"]


def cli_of(tree: Path) -> list[str]:
    """The command line of a code tree's CLI: `senseflow.cli`, or `receiver.cli` in trees
    from before the control plane had its own package (benchmarks/ab.py runs those)."""
    if (tree / "senseflow" / "cli.py").exists():
        return SENSEFLOW
    return [sys.executable, "-m", "receiver.cli"]


REPO = Path(__file__).resolve().parents[2]


EVERYTHING_TOPIC_ONLY: dict[str, Any] = {
    "userEvents": {
        "sendToMQTT": {
            "postTo": {
                key: {"enable": False}
                for key in (
                    "sessionStartTopic",
                    "sessionStopTopic",
                    "connectionOpenTopic",
                    "connectionCloseTopic",
                )
            }
        }
    }
}
"""`butler_overrides` publishing each event once, on the everything topic."""


def write_config(
    path: Path,
    udp_port: int,
    influx: InfluxServer | None = None,
    database: str = "",
    broker: MosquittoServer | None = None,
    butler_overrides: dict[str, Any] | None = None,
    **pipeline: Any,
) -> Path:
    """A config file for `senseflow run`; `butler_overrides` is merged into `Butler-SOS`."""
    butler: dict[str, Any] = {
        "userEvents": {
            "udpServerConfig": {"serverHost": "127.0.0.1", "portUserActivityEvents": udp_port},
            "tags": [{"name": "qs_env", "value": "test"}],
            "sendToInfluxdb": {"enable": influx is not None},
            "sendToMQTT": {"enable": broker is not None},
        },
        "influxdbConfig": {"enable": False},
        "mqttConfig": {"enable": False},
    }
    if influx is not None:
        butler["influxdbConfig"] = {
            "enable": True,
            "host": "127.0.0.1",
            "port": influx.port,
            "version": 1,
            "v1Config": {"dbName": database, "retentionPolicy": {"name": "autogen"}},
        }
    if broker is not None:
        butler["mqttConfig"] = {
            "enable": True,
            "brokerHost": broker.host,
            "brokerPort": broker.port,
        }
    merge(butler, butler_overrides or {})
    spool = {"directory": str(spool_directory(path))}
    own: dict[str, Any] = {"summaryInterval": 1, "spool": spool}
    merge(own, pipeline)  # `spool={...}` keeps the directory unless it names one
    document = {"Butler-SOS": butler, "senseflow": own}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def spool_directory(config: Path) -> Path:
    """Where `write_config` puts the spool of the service started with `config`."""
    return Path(f"{config.with_suffix('')}-spool")


def merge(target: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Deep-merge `overrides` into `target`: mappings key by key, anything else replaced."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


class Service:
    """`senseflow run` as a child process group; always stopped by the fixture."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *flags: str,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        cli: list[str] | None = None,
    ) -> None:
        """`cwd` and `env` (default: this repository, this environment) say which code
        runs; benchmarks/ab.py starts another tree's. `cli`: another command line than the
        tree's CLI (benchmarks/discard.py)."""
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*(cli or cli_of(cwd)), "run", "--config", str(config), *flags],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_running(self, timeout: float = 30.0) -> None:
        self.wait_for_log("senseflow running", timeout)

    def wait_for_log(self, text: str, timeout: float = 30.0, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log[after:]:
            if self.process.poll() is not None:
                raise AssertionError(f"senseflow exited ({self.process.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log within {timeout}s:\n{self.log}")
            time.sleep(0.05)

    def child_pids(self, name: str) -> list[int]:
        return [
            int(pid) for pid in re.findall(rf"started {re.escape(name)} \(pid (\d+)\)", self.log)
        ]

    def group_pids(self) -> list[int]:
        """Every live process in the service's process group."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[2]) == self.process.pid and fields[0] != "Z":
                pids.append(int(entry.name))
        return pids

    def lingering_pids(self, timeout: float = 5.0) -> list[int]:
        """The group's processes still alive `timeout` s after the supervisor exited (a
        child that sees its parent gone, e.g. multiprocessing's resource tracker, needs a
        moment); [] as soon as the group is empty."""
        deadline = time.monotonic() + timeout
        while (pids := self.group_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids

    def kill_group(self) -> None:
        """SIGKILL the supervisor and every child at once, as a power cut would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        deadline = time.monotonic() + 10
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def terminate(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        for pid in self.group_pids():
            os.kill(pid, signal.SIGKILL)
        self._log.close()

    def counters(self) -> dict[str, int]:
        """The last counters line the supervisor logged."""
        lines = [line for line in self.log.splitlines() if "counters: " in line]
        assert lines, self.log
        return {
            k: int(v) for k, v in re.findall(r"([\w.]+)=(\d+)", lines[-1].split("counters: ", 1)[1])
        }

    def wait_counter(self, name: str, value: int, timeout: float = 60.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            counters = self.counters() if "counters: " in self.log else {}
            if counters.get(name, 0) >= value:
                return counters
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{name} reached {counters.get(name)} not {value}:\n{self.log[-3000:]}"
                )
            time.sleep(0.2)


class Subscriber:
    """mosquitto_sub writing every message (topic and payload) to a file."""

    def __init__(
        self, broker: MosquittoServer, topic: str, path: Path, client_id: str | None = None
    ) -> None:
        """With `client_id`, a persistent session (`-c`): the broker keeps the QoS 1 messages
        queued for it across a reconnect, and, with persistence, across its own restart."""
        self.path = path
        self._out = open(path, "wb")  # noqa: SIM115 - closed in stop()
        session = (
            ["-c", "-i", client_id]
            if client_id
            else ["-i", f"test-sub-{os.getpid()}-{time.monotonic_ns()}"]
        )
        self.process = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                broker.host,
                "-p",
                str(broker.port),
                "-t",
                topic,
                "-q",
                "1",
                "-v",
                *session,
            ],
            stdout=self._out,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_subscribed(broker)
        except BaseException:
            self.stop()
            raise

    def _wait_subscribed(self, broker: MosquittoServer) -> None:
        probe_topic = "qliksense/userevent/__probe__"
        deadline = time.monotonic() + 10
        while b"__probe__" not in self.path.read_bytes():
            subprocess.run(
                [
                    "mosquitto_pub",
                    "-h",
                    broker.host,
                    "-p",
                    str(broker.port),
                    "-t",
                    probe_topic,
                    "-m",
                    "x",
                ],
                check=True,
                timeout=10,
            )
            time.sleep(0.1)
            assert time.monotonic() < deadline, "subscriber never received the probe"

    def messages(self) -> list[tuple[str, str]]:
        """Every whole line so far: mosquitto_sub writes to a file in blocks, so a line
        still being written may end the file cut short; it is left for the next call."""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        result = []
        for line in text[: text.rfind("\n") + 1].splitlines():
            topic, _, payload = line.partition(" ")
            if not topic.endswith("__probe__"):
                result.append((topic, payload))
        return result

    def wait_count(self, count: int, timeout: float = 60.0) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while len(self.messages()) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # anything beyond `count` would be a duplicate; let it show up
        return self.messages()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._out.close()


def send_paced(port: int, datagrams: Iterable[bytes], rate: float, sources: int = 4) -> int:
    """Send at a steady `rate` per second from `sources` sockets; returns how many were sent."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sources)]
    try:
        start = time.monotonic()
        sent = 0
        for datagram in datagrams:
            sockets[sent % sources].sendto(datagram, ("127.0.0.1", port))
            sent += 1
            if sent % 200 == 0:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        return sent
    finally:
        for sock in sockets:
            sock.close()


class PacedSender(threading.Thread):
    """`send_paced` in a thread that tells how far it got, from `source` (a loopback IP)."""

    def __init__(
        self,
        port: int,
        datagrams: list[bytes],
        rate: float,
        sources: int = 4,
        source: str = "127.0.0.1",
    ) -> None:
        super().__init__(name="paced-sender", daemon=True)
        self.port, self.datagrams, self.rate = port, datagrams, rate
        self.sources, self.source = sources, source
        self.sent = 0

    def run(self) -> None:
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(self.sources)]
        try:
            for sock in sockets:
                sock.bind((self.source, 0))
            start = time.monotonic()
            for datagram in self.datagrams:
                sockets[self.sent % self.sources].sendto(datagram, ("127.0.0.1", self.port))
                self.sent += 1
                if self.sent % 100 == 0:
                    ahead = self.sent / self.rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        finally:
            for sock in sockets:
                sock.close()

    def wait_sent(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < count and self.is_alive():
            assert time.monotonic() < deadline, f"sent {self.sent} of {count} in {timeout}s"
            time.sleep(0.01)


def influx_count(influx: InfluxServer, database: str, where: str = "") -> int:
    result = influx.query(f"SELECT count(userId_field) FROM user_events {where}", db=database)
    series = result["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def udp_port() -> int:
    return free_ports(1)[0]


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a live process: the most resident memory it ever had, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def spool_usage(directory: Path) -> tuple[int, int]:
    """Segment files and their bytes in a spool directory (read only; safe while it runs)."""
    sizes = []
    for segment in directory.glob("segment-*.log"):
        with contextlib.suppress(FileNotFoundError):  # collected meanwhile
            sizes.append(segment.stat().st_size)
    return len(sizes), sum(sizes)


def spooled_events(directory: Path) -> int:
    """Events in the readable records of a spool's segments, read only: the writer's own
    recovery (workers.writer.spool.Spool) would set aside a segment being created right now."""
    events = 0
    for segment in sorted(directory.glob("segment-*.log")):
        try:
            data = segment.read_bytes()
        except FileNotFoundError:
            continue
        first = int(segment.stem.removeprefix("segment-"))
        events += sum(count for _, _, count in scan_segment(data, first).records)
    return events
