"""What the benchmark suite observes from outside: the sender, processes, UDP sockets.

- `Sender`: `senseflow send` as a child process. Its progress bar (stderr) tells when
  sending started and ended, to the millisecond, and its `--json` summary what was sent.
- `cpu_seconds` / `rss_mb` / `peak_rss_mb`: from /proc, per process.
- `ServiceProcesses`: the processes of one `senseflow run`, named from its log.
- `RssSampler`: a thread sampling RSS per process (overload: does it stay flat?).
- `UdpSocketWatch`: a UDP socket's receive queue and drop counter from /proc/net/udp,
  which is how the socket ceiling and the receiver are timed the same way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.e2e.harness import REPO, Service

CLOCK_TICKS = float(os.sysconf("SC_CLK_TCK"))
_PROGRESS = re.compile(rb"([\d,]+)/([\d,]+)\s+([\d,]+)/s")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    return _status_mb(pid, "VmRSS:")


def peak_rss_mb(pid: int) -> float | None:
    return _status_mb(pid, "VmHWM:")


class ServiceProcesses:
    """Name -> pid of a running `senseflow run` (supervisor, readers, workers, writer)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def pids(self) -> dict[str, int]:
        log = self.service.log
        pids = {"supervisor": self.service.process.pid}
        for name, pid in re.findall(r"started ([\w-]+) \(pid (\d+)\)", log):
            pids[name] = int(pid)  # the last start wins: a restarted child replaces its slot
        named = set(pids.values())
        for pid in self.service.group_pids():  # e.g. multiprocessing's resource tracker
            if pid not in named:
                pids[f"other-{pid}"] = pid
        return pids

    def cpu(self) -> dict[str, float]:
        return {name: s for name, pid in self.pids().items() if (s := cpu_seconds(pid)) is not None}

    def peak_rss(self) -> dict[str, float]:
        return {name: m for name, pid in self.pids().items() if (m := peak_rss_mb(pid)) is not None}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 3) for name in after}


class RssSampler:
    """Samples RSS (MB) of every service process every `interval` s, in a thread."""

    def __init__(self, processes: ServiceProcesses, interval: float = 0.5) -> None:
        self.processes = processes
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._pids = processes.pids()
        self._started = 0.0

    def __enter__(self) -> RssSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = {n: m for n, pid in self._pids.items() if (m := rss_mb(pid)) is not None}
            self.samples.append((round(time.monotonic() - self._started, 2), sample))
            self._stop.wait(self.interval)

    def peak(self) -> dict[str, float]:
        peaks: dict[str, float] = {}
        for _, sample in self.samples:
            for name, value in sample.items():
                peaks[name] = max(peaks.get(name, 0.0), value)
        return {k: round(v, 1) for k, v in peaks.items()}

    def totals(self) -> list[tuple[float, float]]:
        """(seconds since start, total RSS MB) per sample."""
        return [(t, round(sum(s.values()), 1)) for t, s in self.samples]


@dataclass
class SendResult:
    sent: int = 0
    rate: float = 0.0
    target_rate: float = 0.0
    seconds: float = 0.0
    fell_behind: bool = False
    errors: int = 0
    started: float = 0.0
    """time.monotonic() at which the first datagram was sent (from the progress bar)."""
    ended: float = 0.0
    """time.monotonic() at which the last datagram was sent."""
    summary: dict[str, Any] = field(default_factory=dict)


def parse_progress(line: bytes) -> tuple[int, int] | None:
    """(sent, rate) from a progress bar line of `senseflow send`."""
    match = _PROGRESS.search(line)
    if match is None:
        return None
    return int(match.group(1).replace(b",", b"")), int(match.group(3).replace(b",", b""))


class Sender:
    """`senseflow send --json --progress` as a child process; stderr read by a thread.

    The progress bar prints `sent/count  rate/s` every 0.25 s and a final line (ending in a
    newline) as soon as the last datagram is out; the first line gives the start
    (arrival time - sent / rate), the last one the end. The summary on stdout comes later
    (it first computes the mix), which is why it is not used for timing.
    """

    def __init__(self, port: int, rate: float, count: int, sources: int = 4, seed: int = 1) -> None:
        command = [
            sys.executable,
            "-m",
            "senseflow.cli",
            "send",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--rate",
            str(rate),
            "--count",
            str(count),
            "--sources",
            str(sources),
            "--seed",
            str(seed),
            "--json",
            "--progress",
        ]
        self.count = count
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[tuple[float, tuple[int, int]]] = []
        """(arrival time, (sent, rate)) of every progress line."""
        self.sending_done = threading.Event()
        self._reader = threading.Thread(
            target=self._read_progress, name="sender-progress", daemon=True
        )
        self._reader.start()

    def _read_progress(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        pending = b""
        while chunk := os.read(stream.fileno(), 4096):
            now = time.monotonic()
            pending += chunk
            *complete, pending = re.split(rb"[\r\n]", pending)
            for line in complete:
                progress = parse_progress(line)
                if progress is not None:
                    self.lines.append((now, progress))
                    if progress[0] >= self.count:
                        self.sending_done.set()
        self.sending_done.set()

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float | None = None) -> SendResult:
        out, _ = self.process.communicate(timeout=timeout)
        self._reader.join(5)
        summary = orjson.loads(out.splitlines()[-1]) if out.strip() else {}
        result = SendResult(
            sent=summary.get("sent", 0),
            rate=summary.get("rate", 0.0),
            target_rate=summary.get("target_rate", 0.0),
            seconds=summary.get("seconds", 0.0),
            fell_behind=summary.get("fell_behind", False),
            errors=summary.get("errors", 0),
            summary=summary,
        )
        result.started, result.ended = self.times(result)
        return result

    def times(self, result: SendResult) -> tuple[float, float]:
        """When the first and the last datagram were sent (time.monotonic())."""
        if not self.lines:
            return 0.0, 0.0
        first_at, (sent, rate) = self.lines[0]
        started = first_at - (sent / rate if rate else 0.0)
        final = [at for at, (sent, _) in self.lines if sent >= self.count]
        ended = final[0] if final else started + result.seconds
        return started, ended

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def send(port: int, rate: float, count: int, sources: int = 4, seed: int = 1) -> SendResult:
    """Send and wait for the summary."""
    sender = Sender(port, rate, count, sources, seed)
    try:
        return sender.wait(timeout=count / max(rate, 1000.0) * 3 + 120)
    finally:
        sender.kill()


class UdpSocketWatch:
    """Receive-queue bytes and drops of the UDP socket(s) bound to a local port."""

    def __init__(self, port: int) -> None:
        self.suffix = f":{port:04X}"

    def read(self) -> tuple[int, int]:
        """(receive queue bytes, drops) summed over the sockets on the port (IPv4)."""
        queued = drops = 0
        with open("/proc/net/udp", encoding="ascii") as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[1].endswith(self.suffix):
                    queued += int(fields[4].split(":")[1], 16)
                    drops += int(fields[12])
        return queued, drops


@dataclass
class ReadWindow:
    """How fast a receiver emptied its socket while a sender flooded it."""

    sent: int
    drops: int
    started: float
    ended: float
    sender_rate: float

    @property
    def read(self) -> int:
        return self.sent - self.drops

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.read / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "kernel_drops": self.drops,
            "read": self.read,
            "seconds": round(self.seconds, 4),
            "rate": round(self.rate, 1),
            "sender_rate": round(self.sender_rate, 1),
            "sender_bound": self.drops == 0,
        }


def flood_and_time(port: int, count: int, sources: int = 4, poll: float = 0.001) -> ReadWindow:
    """Send `count` datagrams as fast as `senseflow send` can; time how long the receiver
    on `port` takes to read them: from the first datagram sent until its socket's receive
    queue was last seen non-empty (or the last datagram sent, whichever is later)."""
    watch = UdpSocketWatch(port)
    _, drops_before = watch.read()
    sender = Sender(port, 0, count, sources)
    last_busy = 0.0
    try:
        while not sender.sending_done.is_set() or watch.read()[0]:
            queued, _ = watch.read()
            if queued:
                last_busy = time.monotonic()
            time.sleep(poll)
        result = sender.wait(timeout=120)
    finally:
        sender.kill()
    _, drops_after = watch.read()
    ended = max(result.ended, last_busy)
    return ReadWindow(result.sent, drops_after - drops_before, result.started, ended, result.rate)


def pss_mb(pid: int) -> float | None:
    """Proportional set size: shared pages divided among the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class MachineLoad:
    """How busy the whole machine was between construction and `take()`: other jobs on a
    shared machine show up here, next to what the benchmark itself used."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def take(self) -> dict[str, float]:
        busy, total = self._read()
        spent = max(total - self.start[1], 1.0)
        return {
            "busy_pct": round((busy - self.start[0]) / spent * 100, 1),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        }


def prefill_and_time(port: int, reader_pid: int, count: int, poll: float = 0.0005) -> ReadWindow:
    """The receiver's own pace, without a sender competing for the CPU: stop the reading
    process (SIGSTOP), let `senseflow send` fill its socket with `count` datagrams, resume
    it (SIGCONT) and time until the receive queue is empty again."""
    watch = UdpSocketWatch(port)
    _, drops_before = watch.read()
    os.kill(reader_pid, signal.SIGSTOP)
    try:
        sender = Sender(port, 0, count)
        try:
            result = sender.wait(timeout=120)
        finally:
            sender.kill()
        _, drops = watch.read()
        started = time.monotonic()
    finally:
        os.kill(reader_pid, signal.SIGCONT)
    while watch.read()[0]:
        time.sleep(poll)
    ended = time.monotonic()
    return ReadWindow(result.sent, drops - drops_before, started, ended, result.rate)
