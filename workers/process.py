"""A worker process: raw batches in, one encoded batch out per raw batch."""

from __future__ import annotations

import logging
import time

from shared import exitcodes
from shared.config import Config
from shared.counters import Counters
from shared.events import RAW_DECODER, RAW_ENCODER, RawBatch
from shared.ipc import REPORT_INTERVAL, STOP, Channels, report, start_parent_watch
from shared.logs import RateLimitedLog, setup_logging
from workers.pipeline import EventPipeline

log = logging.getLogger("senseflow.worker")


def run(config: Config, channels: Channels, index: int, parent_pid: int) -> int:
    name = f"worker-{index}"
    setup_logging(config.pipeline.log_level, config.pipeline.log_format, name)
    worker = Worker(config, channels, name)
    start_parent_watch(parent_pid, worker.orphaned)
    report(channels, name, "ready")
    return worker.serve()


class Worker:
    def __init__(self, config: Config, channels: Channels, name: str) -> None:
        self.channels = channels
        self.name = name
        self.counters = Counters()
        self.pipeline = EventPipeline(config, load_app_names(config))
        self.invalid_log = RateLimitedLog(log)
        self.orphan = False

    def orphaned(self) -> None:
        self.orphan = True

    def serve(self) -> int:
        next_report = time.monotonic() + REPORT_INTERVAL
        while not self.orphan:
            item = self.channels.raw.receive(REPORT_INTERVAL)
            if item == STOP:
                break
            if item is not None:
                self.process(item)
            if time.monotonic() >= next_report:
                self.report_counters()
                next_report = time.monotonic() + REPORT_INTERVAL
        self.report_counters()
        return exitcodes.OK

    def process(self, item: bytes) -> None:
        self.process_raw(RAW_DECODER.decode(item))

    def process_raw(self, raw: RawBatch) -> None:
        batch = self.pipeline.process_batch(raw)
        message = RAW_ENCODER.encode(batch)
        if len(message) > self.channels.encoded.max_message and len(raw.datagrams) > 1:
            middle = len(raw.datagrams) // 2
            self.process_raw(RawBatch(raw.datagrams[:middle], raw.received_ns[:middle]))
            self.process_raw(RawBatch(raw.datagrams[middle:], raw.received_ns[middle:]))
            return
        self.counters.add_all(batch.counters)
        if batch.counters.keys() - {"events"}:
            self.log_invalid(batch.counters)
        if batch.received_ns:
            self.channels.encoded.send(message)

    def log_invalid(self, counters: dict[str, int]) -> None:
        reasons = {k: v for k, v in counters.items() if k.startswith("invalid.")}
        if reasons:
            self.invalid_log.warning("invalid datagrams in a batch: %s", reasons)

    def report_counters(self) -> None:
        delta = self.counters.take_delta()
        if delta:
            report(self.channels, self.name, "counters", delta)


def load_app_names(config: Config) -> dict[str, str]:
    from workers.enrich import load_app_names as load

    path = config.pipeline.app_names_file
    return load(path) if path else {}
