"""The supervisor: starts the children, watches them, restarts what dies, drains on signal.

Modelled on gunicorn's arbiter and uvicorn's multiprocess supervisor: signal handlers only
record; one loop reads the children's reports (readiness, telemetry) and sums their shared
counter blocks, kills a child that stopped beating its heartbeat (senseflow/liveness.py),
reaps the dead (telling the writer what a dead worker held),
restarts a child that crashed at run time with capped backoff, halts on a boot failure or
a restart storm, and on the first SIGTERM/SIGINT drains in order: receivers stop reading,
workers finish every batch read, the writer flushes every destination. A second signal
stops at once; past the graceful timeout, SIGKILL.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from senseflow.appnames import AppNamesPublisher
from senseflow.backpressure import Backpressure
from senseflow.childwatch import ExitWatch
from senseflow.liveness import kill_wedged
from senseflow.observers import start_observers
from senseflow.telemetry import Telemetry
from shared import counternames as names
from shared import exitcodes
from shared.config import Config
from shared.counters import SharedCounters, new_block, sum_counters, summary_line
from shared.events import RAW_ENCODER, Fence
from shared.ipc import STOP, MessageChannel, drain_reports, open_channels
from workers.writer.destinations import destination_names

log = logging.getLogger("senseflow.supervisor")

MAX_RESTART_DELAY = 10.0
STORM_WINDOW = 60.0
STORM_RESTARTS = 10
GRACEFUL_TIMEOUT = 90.0
BOOT_TIMEOUT = 30.0
MAIN_LOOP_WAIT = 0.5
"""Longest wait for a report between checks on the children (signals, deaths, heartbeats)."""


def child_main(target: Callable[..., int], args: tuple[Any, ...]) -> None:
    """Entry of every child: the supervisor alone reacts to SIGINT/SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(target(*args))


class Child:
    """One slot (reader-0, worker-1, writer): the process in it, its restart history, and
    its shared counter block, which every process in the slot counts into in turn."""

    def __init__(
        self, name: str, target: Callable[..., int], args: tuple[Any, ...], context: Any
    ) -> None:
        self.name = name
        self.target = target
        block = new_block(context)
        self.counters = SharedCounters(block)
        self.args = (*args, block)
        self.process: BaseProcess | None = None
        self.exit_watch = ExitWatch(None)
        self.ready = False
        self.restarts: list[float] = []
        self.restart_at = 0.0
        self.started_at = 0.0

    def spawn(self, context: Any) -> None:
        self.ready = False
        self.started_at = time.monotonic()
        self.process = context.Process(
            target=child_main, args=(self.target, self.args), name=self.name
        )
        self.process.start()
        self.exit_watch.close()
        self.exit_watch = ExitWatch(self.process.pid)
        log.info("started %s (pid %s)", self.name, self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def reap(self) -> None:
        if self.process is not None:
            self.process.join(1)

    def next_restart_delay(self, now: float) -> float:
        self.restarts = [t for t in self.restarts if now - t < STORM_WINDOW] + [now]
        return float(min(MAX_RESTART_DELAY, 0.5 * 2 ** (len(self.restarts) - 1)))

    def storming(self) -> bool:
        return len(self.restarts) > STORM_RESTARTS


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def child_context(start_method: str) -> Any:
    """`spawn`, or `forkserver` with the children's code and ua-parser's rules preloaded."""
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(["senseflow.preload"])
    return context


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.context = child_context(config.pipeline.start_method)
        self.app_names = AppNamesPublisher(config)
        pipe = config.pipeline
        self.channels = open_channels(config, self.context, self.app_names.path)
        self.totals: dict[str, int] = {}
        self.fences: list[bytes] = []  # for the writer: what dead workers held
        threshold = config.butler.user_events.udp_server_config.message_queue
        self.backpressure = Backpressure(threshold.backpressure_threshold)
        self.telemetry = Telemetry(config, self.destinations())  # delivery, latency, children
        self.signals: list[int] = []
        self.fatal: dict[str, str] = {}
        self.last_summary = time.monotonic()
        self.readers = [self._reader_slot(i) for i in range(pipe.readers)]
        self.workers = [self._worker_slot(i) for i in range(pipe.workers)]
        self.writer = self._writer_slot()
        self.listening_port: int | None = None

    # -- slots ------------------------------------------------------------------------------

    def _reader_slot(self, index: int) -> Child:
        from receiver import process

        return Child(
            f"reader-{index}",
            process.run,
            (self.config, self.channels, index, os.getpid()),
            self.context,
        )

    def _worker_slot(self, index: int) -> Child:
        from workers import process

        return Child(
            f"worker-{index}",
            process.run,
            (self.config, self.channels, index, os.getpid()),
            self.context,
        )

    def _writer_slot(self) -> Child:
        from workers.writer import process as writer

        return Child("writer", writer.run, (self.config, self.channels, os.getpid()), self.context)

    @property
    def children(self) -> list[Child]:
        return [*self.readers, *self.workers, self.writer]

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signal_handlers()
        observers = start_observers(self)  # /metrics, /healthz, InfluxDB stats: before boot
        if observers is None:
            return exitcodes.BIND_ERROR
        self.app_names.start()  # QRS app names first, so that the first events have them
        try:
            return self.supervise()
        finally:
            self.app_names.stop()
            observers.stop()  # after the drain: the last stats carry the final counts

    def supervise(self) -> int:
        for group in ([self.writer], self.workers, self.readers):
            code = self.boot(group)
            if code != exitcodes.OK:
                self.stop_now()
                return code
        log.info(
            "senseflow running: %d reader(s), %d worker(s), destinations: %s",
            len(self.readers),
            len(self.workers),
            ", ".join(self.destinations()) or "none",
        )
        code = self.main_loop()
        self.log_summary()
        return code

    def boot(self, group: list[Child]) -> int:
        """Start a group and wait until each child is ready; a child that dies first halts us."""
        for child in group:
            child.spawn(self.context)
        deadline = time.monotonic() + BOOT_TIMEOUT + self.config.pipeline.startup_timeout
        waiting_for_destinations = self.config.pipeline.on_unreachable == "wait"
        while not all(child.ready for child in group):
            self.read_reports(0.1)
            if self.signals:
                return exitcodes.INTERRUPTED
            for child in group:
                if not child.ready and not child.alive:
                    return self.boot_failure(child)
            if time.monotonic() > deadline and not waiting_for_destinations:
                log.error(
                    "children not ready after %.0fs: %s",
                    BOOT_TIMEOUT,
                    ", ".join(c.name for c in group if not c.ready),
                )
                return exitcodes.BOOT_FAILURE
        return exitcodes.OK

    def boot_failure(self, child: Child) -> int:
        assert child.process is not None
        child.process.join(1)
        code = child.process.exitcode
        reason = self.fatal.get(child.name, describe_exit(code))
        log.error("%s failed to start: %s", child.name, reason)
        if code in (
            exitcodes.BIND_ERROR,
            exitcodes.DESTINATION_UNREACHABLE,
            exitcodes.CONFIG_ERROR,
        ):
            return code
        return exitcodes.BOOT_FAILURE

    def main_loop(self) -> int:
        while True:
            self.read_reports(MAIN_LOOP_WAIT)
            if self.signals:
                return self.drain()
            kill_wedged(self.children, self.config.pipeline.heartbeat_timeout, time.monotonic())
            code = self.reap_children()
            if code is not None:
                self.stop_now()
                return code
            queue_full = self.totals.get(names.DROPPED_QUEUE_FULL, 0)
            self.backpressure.watch(self.channels.raw, queue_full)
            self.maybe_log_summary()

    def reap_children(self) -> int | None:
        """Restart children that died on their own; None while all is well."""
        now = time.monotonic()
        for child in self.children:
            if child.alive:
                continue
            if child.restart_at == 0.0:
                assert child.process is not None
                child.exit_watch.make_sure_gone()  # before its counters are settled
                child.process.join(0.1)
                delay = child.next_restart_delay(now)
                log.error(
                    "%s (pid %s) died: %s; restarting in %.1fs",
                    child.name,
                    child.pid,
                    describe_exit(child.process.exitcode),
                    delay,
                )
                if child in self.workers:
                    self.settle_worker(child)
                if child.storming():
                    log.error(
                        "%s keeps dying (%d restarts in %.0fs); stopping",
                        child.name,
                        len(child.restarts),
                        STORM_WINDOW,
                    )
                    return exitcodes.FAILURE
                child.restart_at = now + delay
            elif now >= child.restart_at and not (self.fences and child in self.workers):
                # a worker's successor starts only once the writer's channel has its fence
                child.restart_at = 0.0
                child.spawn(self.context)
        return None

    def settle_worker(self, child: Child) -> None:
        """A worker died: tell the writer what it held (a fence, after anything it sent),
        and let its successor number its sends past it."""
        number = child.counters.get(names.WORKER_NUMBER)
        datagrams = child.counters.get(names.WORKER_HELD)
        if datagrams:
            fence = Fence(self.workers.index(child), number, datagrams)
            self.fences.append(RAW_ENCODER.encode(fence))
            child.counters.commit({}, {names.WORKER_NUMBER: number + 1, names.WORKER_HELD: 0})
        self.send_fences()

    def send_fences(self, timeout: float = 0.0) -> None:
        while self.fences and self.channels.encoded.send(self.fences[0], timeout):
            self.fences.pop(0)

    def drain(self) -> int:
        """Stop reading, finish every batch read, flush every destination, exit 0."""
        log.info("draining: stopping receivers, then workers, then the writer")
        deadline = time.monotonic() + GRACEFUL_TIMEOUT
        self.channels.stop.set()
        if not self.wait_for(self.readers, deadline):
            return self.stop_now()
        if not self.revive([self.writer], deadline):  # it takes what the workers finish
            return self.stop_now()
        if not self.finish(self.workers, self.channels.raw, deadline):
            return self.stop_now()
        if not self.finish([self.writer], self.channels.encoded, deadline):
            return self.stop_now()
        self.read_reports(0.2)
        log.info("drained; exiting")
        return exitcodes.OK

    def finish(self, group: list[Child], channel: MessageChannel, deadline: float) -> bool:
        """Send each child of the group a STOP behind everything queued and wait for it to
        exit; one that dies instead (its work still queued) is restarted and stopped again.
        Meanwhile the writer is kept running: whatever the workers finish goes to it."""
        workers = group is self.workers
        stopping = group
        while True:
            if not self.revive(stopping, deadline):
                return False
            if not workers:
                self.send_fences(max(0.0, deadline - time.monotonic()))
            for _ in stopping:
                if not self.send_stop(channel, deadline):
                    return False
            if not self.wait_for(group, deadline, keep_writer=workers):
                return False
            stopping = [c for c in group if c.process is not None and c.process.exitcode != 0]
            if not stopping:
                return True
            log.warning(
                "%s died while draining; restarting to finish", ", ".join(c.name for c in stopping)
            )
            for child in stopping:
                if child in self.workers:
                    self.settle_worker(child)

    def send_stop(self, channel: MessageChannel, deadline: float) -> bool:
        """Queue a STOP, waiting for room (the writer kept alive) until the deadline."""
        while not channel.send(STOP, timeout=0.5):
            self.read_reports(0.0)
            if time.monotonic() > deadline or len(self.signals) > 1:
                log.error("graceful timeout: no room to queue a stop message")
                return False
            if not self.keep_writer(deadline):
                return False
        return True

    def keep_writer(self, deadline: float) -> bool:
        return self.writer.alive or self.revive([self.writer], deadline)

    def revive(self, group: list[Child], deadline: float) -> bool:
        """Start now what is dead and waiting for its restart: a drain needs every worker
        (or at least one) and the writer to finish what was read."""
        dead = [child for child in group if not child.alive]
        if not dead:
            return True
        for child in dead:
            if child in self.workers:
                self.settle_worker(child)  # idempotent: a settled worker holds nothing
        if self.fences and self.writer.alive:  # before any successor's sends
            self.send_fences(max(0.0, deadline - time.monotonic()))
        for child in dead:
            child.restart_at = 0.0
            child.spawn(self.context)
        while not all(child.ready for child in dead):
            self.read_reports(0.1)
            if time.monotonic() > deadline or any(not c.alive and not c.ready for c in dead):
                log.error("cannot restart %s to drain", ", ".join(c.name for c in dead))
                return False
        return True

    def wait_for(self, group: list[Child], deadline: float, keep_writer: bool = False) -> bool:
        while any(child.alive for child in group):
            self.read_reports(0.1)
            if keep_writer and not self.keep_writer(deadline):
                return False
            if len(self.signals) > 1:
                log.warning("second signal: stopping now")
                return False
            if time.monotonic() > deadline:
                log.error(
                    "graceful timeout: %s still running",
                    ", ".join(c.name for c in group if c.alive),
                )
                return False
        for child in group:
            if child.process is not None:
                child.process.join()
        return True

    def stop_now(self) -> int:
        self.channels.stop.set()
        for child in self.children:
            if child.alive and child.pid is not None:
                os.kill(child.pid, signal.SIGKILL)
        for child in self.children:
            if child.process is not None:
                child.process.join(5)
        self.read_reports(0.1)
        return exitcodes.FAILURE

    # -- reports and signals ----------------------------------------------------------------

    def read_reports(self, timeout: float) -> None:
        for name, kind, payload in drain_reports(self.channels.reports, timeout):
            if kind == "ready":
                self._mark_ready(name, payload)
            elif kind == "fatal":
                self.fatal[name] = payload
            elif kind in ("delivery", "event_counts"):
                self.telemetry.record(kind, payload)
        self.totals = sum_counters(child.counters for child in self.children)
        self.send_fences()
        self.telemetry.observe_children((c.name, c.pid, c.alive, c.ready) for c in self.children)

    def _mark_ready(self, name: str, payload: Any) -> None:
        for child in self.children:
            if child.name == name:
                child.ready = True
        if name.startswith("reader") and isinstance(payload, int):
            self.listening_port = payload

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle_signal)

    def handle_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    # -- summaries --------------------------------------------------------------------------

    def destinations(self) -> list[str]:
        return destination_names(self.config)

    def maybe_log_summary(self) -> None:
        interval = self.config.pipeline.summary_interval
        if interval and time.monotonic() - self.last_summary >= interval:
            self.last_summary = time.monotonic()
            self.log_summary()

    def log_summary(self) -> None:
        log.info("counters: %s", summary_line(self.totals, self.destinations()))
