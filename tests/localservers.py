"""Real InfluxDB 1.x and Mosquitto servers as child processes, for tests and benchmarks.

Each server listens on free loopback ports only, keeps its data under a temporary
directory and writes its stdout/stderr to a log file there. Ports and directories are
chosen once, at construction, so `stop()` then `start()` brings the same server back on
the same port with the same data (tests restart InfluxDB mid-load). Processes are
stopped by PID: SIGTERM, a grace period, then SIGKILL, and always reaped.

    with InfluxServer() as influx, MosquittoServer() as broker:
        influx.create_database("db")
        influx.write("db", b"m v=1i 1\\n")
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LOOPBACK = "127.0.0.1"
_POLL_INTERVAL = 0.05
_LOG_TAIL_BYTES = 4000
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server did not start, or an HTTP request to it failed."""


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct loopback ports that nothing listens on right now.

    All sockets are held open together so the ports differ; a port may still be taken
    by someone else before the server binds it, which start() then reports.
    """
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: a server then outlives a test run that was killed


_PRCTL = _load_prctl()  # looked up here: the child may only call it (no dlopen after fork)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when its parent dies (Linux).

    A test run killed hard then leaves no server behind. Only used when starting from
    the main thread: the signal follows the spawning *thread*, so a server started from
    a worker thread (asyncio.to_thread) would die when that thread ends.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout)


class _ServerProcess:
    """One server process: config file, log file, start / wait ready / stop by PID."""

    name = "server"

    def __init__(self, workdir: str | os.PathLike[str] | None, startup_timeout: float) -> None:
        self._owns_dir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"senseflow-{self.name}-")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.config_path = self.workdir / f"{self.name}.conf"
        self.startup_timeout = startup_timeout
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- to be provided by each server ------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _config_text(self) -> str:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and return once it accepts requests; raises ServerError."""
        if self._process is not None:
            raise ServerError(f"{self.name} is already running (pid {self.pid})")
        self.config_path.write_text(self._config_text(), encoding="utf-8")
        self._spawn()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; returns the exit code (None if idle)."""
        process = self._process
        if process is None:
            return None
        try:
            _terminate(process, timeout)
        finally:  # also when interrupted: never leave the process running or unreaped
            if process.poll() is None:
                process.kill()
            process.wait()
            self._process, self.pid = None, None
        return process.returncode

    def close(self) -> None:
        """Stop the server and remove the work directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, size: int = _LOG_TAIL_BYTES) -> str:
        """The end of the server's log, for error messages."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - size))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        command = self._command()
        if shutil.which(command[0]) is None:
            raise ServerError(f"{self.name}: executable {command[0]!r} not found")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._environment(),
                preexec_fn=_die_with_parent if _on_main_thread() else None,
                # Out of the terminal's process group: a Ctrl-C meant for the service
                # (`make run`) must not stop the servers it is still draining into.
                start_new_session=True,
            )
        self.pid = self._process.pid

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self._is_ready():
            if self._process.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise self._failure(f"not ready after {self.startup_timeout:g} s")
            time.sleep(_POLL_INTERVAL)
        code = self._process.poll()  # ready, but maybe someone else answering on our port
        if code is not None:
            raise self._failure(f"exited with code {code} during start-up")

    def _failure(self, what: str) -> ServerError:
        return ServerError(
            f"{self.name} (pid {self.pid}) {what}; command: {' '.join(self._command())}\n"
            f"--- tail of {self.log_path} ---\n{self.log_tail()}"
        )


class InfluxServer(_ServerProcess):
    """InfluxDB 1.x (`influxd -config <file>`) on a free loopback port."""

    name = "influxd"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        binary: str = "influxd",
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(workdir, startup_timeout)
        self.binary = binary
        self.host = LOOPBACK
        self.port, self.rpc_port = free_ports(2)
        if port is not None:
            self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        return [self.binary, "-config", str(self.config_path)]

    def _environment(self) -> dict[str, str]:
        """Without INFLUXDB_* variables, which would override the generated config."""
        return {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}

    def _config_text(self) -> str:
        data = self.workdir
        return _INFLUX_CONFIG.format(
            rpc=_toml(f"{LOOPBACK}:{self.rpc_port}"),
            http=_toml(f"{self.host}:{self.port}"),
            meta=_toml(str(data / "meta")),
            data=_toml(str(data / "data")),
            wal=_toml(str(data / "wal")),
        )

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1.0) as response:
                return bool(response.status == 204)
        except (urllib.error.URLError, OSError):
            return False

    # -- HTTP API ---------------------------------------------------------------------------

    def query(self, q: str, db: str | None = None, *, epoch: str | None = None) -> dict[str, Any]:
        """Run InfluxQL via POST /query; raises ServerError on any error in the answer."""
        params = {"q": q} | ({"db": db} if db else {}) | ({"epoch": epoch} if epoch else {})
        body = self._request("/query", urllib.parse.urlencode(params).encode(), form=True)
        answer: dict[str, Any] = json.loads(body)
        errors = [answer.get("error")] + [r.get("error") for r in answer.get("results", [])]
        if any(errors):
            raise ServerError(f"query {q!r} failed: {[e for e in errors if e]}")
        return answer

    def create_database(self, name: str) -> None:
        self.query(f"CREATE DATABASE {_quote_identifier(name)}")

    def write(self, db: str, lines: bytes, *, precision: str = "ns", rp: str | None = None) -> None:
        """POST line protocol to /write; raises ServerError unless InfluxDB answers 204."""
        params = {"db": db, "precision": precision} | ({"rp": rp} if rp else {})
        self._request(f"/write?{urllib.parse.urlencode(params)}", lines, form=False)

    def _request(self, path: str, body: bytes, *, form: bool) -> bytes:
        content_type = "application/x-www-form-urlencoded" if form else "text/plain; charset=utf-8"
        request = urllib.request.Request(
            f"{self.url}{path}", data=body, method="POST", headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=30.0) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode("utf-8", "replace")
            raise ServerError(f"POST {path} -> HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"POST {self.url}{path} failed: {exc}") from exc


class MosquittoServer(_ServerProcess):
    """Mosquitto 2.x on a free loopback port; anonymous unless a username is given."""

    name = "mosquitto"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        binary: str = "mosquitto",
        startup_timeout: float = 15.0,
        persistence: bool = False,
    ) -> None:
        super().__init__(workdir, startup_timeout)
        self.binary = binary
        self.persistence = persistence
        self.host = LOOPBACK
        self.port = port if port is not None else free_ports(1)[0]
        self.username = username
        self.password = password

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def _config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            # With persistence, sessions and queued QoS 1 messages of persistent subscribers
            # survive a broker restart (saved on SIGTERM to the work directory).
            *(
                ["persistence true", f"persistence_location {self.workdir}/"]
                if self.persistence
                else ["persistence false"]
            ),
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            # Test subscribers are slow consumers: queue for them without limit rather than
            # drop QoS 1 messages past mosquitto's default of 1000 queued per client.
            "max_queued_messages 0",
            # As root mosquitto would switch to user 'mosquitto', which cannot read our files.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        if self.username is None:
            return "\n".join([*lines, "allow_anonymous true", ""])
        password_file = self.workdir / "passwd"
        password_file.write_text(_password_line(self.username, self.password or ""), "utf-8")
        password_file.chmod(0o600)
        return "\n".join([*lines, "allow_anonymous false", f"password_file {password_file}", ""])

    def _is_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False


def _password_line(username: str, password: str) -> str:
    """A mosquitto 2.x password-file line (`$7$`: PBKDF2-SHA512, as mosquitto_passwd writes)."""
    iterations, salt = 101, secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return f"{username}:$7${iterations}${encoded[0]}${encoded[1]}\n"


def _toml(value: str) -> str:
    """A TOML basic string; JSON's escapes are a subset of TOML's."""
    return json.dumps(value, ensure_ascii=False)


def _quote_identifier(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


_INFLUX_CONFIG = """\
reporting-enabled = false
bind-address = {rpc}

[meta]
  dir = {meta}
  logging-enabled = false

[data]
  dir = {data}
  wal-dir = {wal}
  wal-fsync-delay = "0s"
  query-log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = {http}
  auth-enabled = false
  log-enabled = false
  suppress-write-log = true
  max-body-size = 25000000
  max-concurrent-write-limit = 0
  max-enqueued-write-limit = 0

[logging]
  level = "warn"
  suppress-logo = true
"""


class NatsServer(_ServerProcess):
    """nats-server with JetStream on (its MQTT listener needs it) and an MQTT listener.

    `port` is the MQTT port (what an MQTT client connects to), `nats_port` NATS's own
    (`url`). JetStream keeps its store (MQTT sessions, QoS 1 messages, streams) under the
    work directory. With `routes` (the cluster ports of every member, see `NatsCluster`)
    it joins a cluster; ready means its monitoring `/healthz` says JetStream is current.
    """

    name = "nats-server"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        binary: str = "nats-server",
        startup_timeout: float = 15.0,
        server_name: str = "senseflow_test",
        cluster_port: int = 0,
        routes: list[int] | None = None,
        user: str = "",
        password: str = "",
        tls: tuple[str, str, str] | None = None,
    ) -> None:
        """`tls`: (certificate, key, CA) of the NATS port; clients must show a
        certificate from that CA."""
        super().__init__(workdir, startup_timeout)
        self.binary = binary
        self.user, self.password = user, password
        self.tls = tls
        self.host = LOOPBACK
        self.port, self.nats_port, self.monitor_port = free_ports(3)
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.routes = routes or []

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{LOOPBACK}:{self.nats_port}"

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def _config_text(self) -> str:
        store = json.dumps(str(self.workdir / "jetstream"))
        text = (
            f"listen: {json.dumps(f'{LOOPBACK}:{self.nats_port}')}\n"
            f"http: {json.dumps(f'{LOOPBACK}:{self.monitor_port}')}\n"
            f"server_name: {self.server_name}\n"
            f"jetstream {{ store_dir: {store} }}\n"
            f"mqtt {{ listen: {json.dumps(f'{self.host}:{self.port}')} }}\n"
        )
        if self.tls:
            cert, key, ca = (json.dumps(path) for path in self.tls)
            text += f"tls {{ cert_file: {cert}, key_file: {key}, ca_file: {ca}, verify: true }}\n"
        if self.user:
            text += (
                f"authorization {{ user: {json.dumps(self.user)}, "
                f"password: {json.dumps(self.password)} }}\n"
            )
        if self.cluster_port:
            routes = ", ".join(json.dumps(f"nats://{LOOPBACK}:{p}") for p in self.routes)
            text += (
                f"cluster {{ name: senseflow_cluster, "
                f"listen: {json.dumps(f'{LOOPBACK}:{self.cluster_port}')}, routes: [{routes}] }}\n"
            )
        return text

    def _is_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                pass
        except OSError:
            return False
        if not self.cluster_port:
            return True
        return self.healthy()

    def healthy(self) -> bool:
        """JetStream is up and current on this server (its monitoring `/healthz`)."""
        url = f"http://{LOOPBACK}:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.URLError):
            return False


class NatsCluster:
    """`size` nats-servers routed into one JetStream cluster on loopback.

    Members start together (JetStream needs a quorum to elect its meta leader, so none is
    ready alone); each can be stopped and started again on the same ports with its data.
    """

    def __init__(self, size: int = 3) -> None:
        cluster_ports = free_ports(size)
        self.servers = [
            NatsServer(server_name=f"senseflow_{i}", cluster_port=port, routes=cluster_ports)
            for i, port in enumerate(cluster_ports)
        ]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start(self) -> None:
        for server in self.servers:
            server.config_path.write_text(server._config_text(), encoding="utf-8")
            server._spawn()
        for server in self.servers:
            server._wait_ready()

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
