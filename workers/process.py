"""A worker process: raw batches in, one encoded batch out per raw batch.

The worker counts nothing of its own: each encoded batch carries its counts (events,
invalid, excluded) to the writer, which counts them as it spools the batch. What the
worker records, in its shared counter block, is what it holds: `WORKER_NUMBER`, the number
of its next send, and `WORKER_HELD`, how many datagrams it has taken and not yet sent on
(shared/counternames.py). If the worker is killed, the supervisor reads that and tells the
writer (a `Fence`), which counts what never arrived as `dropped.worker_crash`. On its
report timer it beats its heartbeat (the supervisor restarts a worker that stops).
"""

from __future__ import annotations

import logging
import time

from shared import exitcodes
from shared.config import Config
from shared.counternames import EVENTS, INVALID_PREFIX, WORKER_HELD, WORKER_NUMBER
from shared.counters import SharedCounters, beat
from shared.events import RAW_DECODER, RAW_ENCODER, RawBatch, raw_batch_size
from shared.ipc import REPORT_INTERVAL, STOP, Channels, report, start_parent_watch
from shared.logs import RateLimitedLog, setup_logging
from workers.appnames import AppNamesWatcher
from workers.pipeline import EventPipeline
from workers.samples import InvalidSample

log = logging.getLogger("senseflow.worker")


def run(config: Config, channels: Channels, index: int, parent_pid: int, block: object) -> int:
    name = f"worker-{index}"
    setup_logging(config.pipeline.log_level, config.pipeline.log_format, name)
    return start(Worker(config, channels, index, SharedCounters(block)), parent_pid)


def start(worker: Worker, parent_pid: int) -> int:
    """Serve until stopped; `run` for this worker, benchmarks/discard.py for its own."""
    channels, name = worker.channels, worker.name
    start_parent_watch(parent_pid, worker.orphaned)
    report(channels, name, "ready")
    return worker.serve()


class Worker:
    def __init__(
        self, config: Config, channels: Channels, index: int, counters: SharedCounters
    ) -> None:
        self.channels = channels
        self.index = index
        self.name = f"worker-{index}"
        self.counters = counters
        # A predecessor's sends were numbered up to here; the supervisor settled what it held.
        self.number = counters.get(WORKER_NUMBER)
        self.pipeline = EventPipeline(config, load_app_names(config))
        self.app_names = AppNamesWatcher(channels.app_names_path)
        self.refresh_app_names()
        self.invalid_log = RateLimitedLog(log)
        self.held = 0
        self.orphan = False

    def orphaned(self) -> None:
        self.orphan = True

    def serve(self) -> int:
        next_report = time.monotonic() + REPORT_INTERVAL
        beat(self.counters)
        while not self.orphan:
            item = self.channels.raw.receive(REPORT_INTERVAL)
            if item == STOP:
                break
            if item is not None:
                self.process(item)
            if time.monotonic() >= next_report:
                beat(self.counters)
                self.report_counters()
                self.refresh_app_names()
                next_report = time.monotonic() + REPORT_INTERVAL
        self.report_counters()
        return exitcodes.OK

    def process(self, item: bytes) -> None:
        self.held = raw_batch_size(item)
        self.counters.set(WORKER_HELD, self.held)
        self.process_raw(RAW_DECODER.decode(item))

    def process_raw(self, raw: RawBatch) -> None:
        batch = self.pipeline.process_batch(raw)
        batch.worker, batch.number, batch.datagrams = self.index, self.number, len(raw.datagrams)
        message = RAW_ENCODER.encode(batch)
        if len(message) > self.channels.encoded.max_message and len(raw.datagrams) > 1:
            middle = len(raw.datagrams) // 2
            self.process_raw(RawBatch(raw.datagrams[:middle], raw.received_ns[:middle]))
            self.process_raw(RawBatch(raw.datagrams[middle:], raw.received_ns[middle:]))
            return
        if self.pipeline.event_counts is not None:
            self.pipeline.event_counts.commit()
        if batch.counters.keys() - {EVENTS}:
            self.log_invalid(batch.counters, raw)
        # Sent even when it holds no event: the writer counts its invalid and excluded.
        if not self.send(message):
            return
        self.number += 1
        self.held -= batch.datagrams
        self.counters.commit({}, {WORKER_NUMBER: self.number, WORKER_HELD: self.held})

    def send(self, message: bytes) -> bool:
        """To the writer. While its channel is full (backpressure, not a wedged worker) the
        heartbeat goes on; if the supervisor dies meanwhile nobody will ever read the
        channel: give up, and `serve()` ends."""
        channel = self.channels.encoded
        if channel.send_nowait(message):
            return True
        while not channel.send(message, timeout=REPORT_INTERVAL):
            beat(self.counters)
            if self.orphan:
                return False
        return True

    def log_invalid(self, counters: dict[str, int], raw: RawBatch) -> None:
        reasons = {k: v for k, v in counters.items() if k.startswith(INVALID_PREFIX)}
        if reasons:
            self.invalid_log.warning(
                "invalid datagrams in a batch: %s; sample: %s", reasons, InvalidSample(raw)
            )

    def report_counters(self) -> None:
        if self.pipeline.event_counts is not None and (counts := self.pipeline.event_counts.take()):
            report(self.channels, self.name, "event_counts", counts)

    def refresh_app_names(self) -> None:
        """Take the app names the supervisor published from QRS, when they changed."""
        mapping = self.app_names.poll()
        if mapping is not None:
            self.pipeline.set_app_names(mapping)


def load_app_names(config: Config) -> dict[str, str]:
    from workers.enrich import load_app_names as load

    path = config.pipeline.app_names_file
    return load(path) if path else {}
