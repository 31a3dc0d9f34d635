"""The writer process: takes encoded batches from the workers and feeds every destination.

It never parses: batches arrive as bytes ready to send. Each sink batches, retries and
bounds on its own; when a sink's bound is reached the writer waits, the queue from the
workers fills, and the receivers count their drops (SPEC 4).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import uvloop

from shared import exitcodes
from shared.config import Config
from shared.counters import Counters
from shared.events import ENCODED_DECODER
from shared.ipc import REPORT_INTERVAL, STOP, Channels, report, start_parent_watch
from shared.logs import setup_logging
from workers.sinks.base import DestinationUnreachable, Sink

log = logging.getLogger("senseflow.writer")

NAME = "writer"
DRAIN_TIMEOUT = 60.0


def run(config: Config, channels: Channels, parent_pid: int) -> int:
    setup_logging(config.pipeline.log_level, config.pipeline.log_format, NAME)
    writer = Writer(config, channels)
    start_parent_watch(parent_pid, writer.orphaned)
    return uvloop.run(writer.serve())


def destination_names(config: Config) -> list[str]:
    butler = config.butler
    names = []
    if butler.influxdb_config.enable and butler.user_events.send_to_influxdb.enable:
        names.append("influxdb")
    if butler.mqtt_config.enable and butler.user_events.send_to_mqtt.enable:
        names.append("mqtt")
    return names


def make_sinks(config: Config, counters: Counters) -> list[Sink]:
    from workers.sinks.influx import InfluxSink
    from workers.sinks.mqtt import MqttSink

    factories: dict[str, type[InfluxSink] | type[MqttSink]] = {"influxdb": InfluxSink, "mqtt": MqttSink}
    return [factories[name](config, counters) for name in destination_names(config)]


class Writer:
    def __init__(self, config: Config, channels: Channels) -> None:
        self.config = config
        self.channels = channels
        self.counters = Counters()
        self.sinks = make_sinks(config, self.counters)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="writer-input")
        self.orphan = False

    def orphaned(self) -> None:
        self.orphan = True

    async def serve(self) -> int:
        if not await self.start_sinks():
            return exitcodes.DESTINATION_UNREACHABLE
        report(self.channels, NAME, "ready")
        reporter = asyncio.create_task(self.report_loop(), name="writer.report")
        await self.consume()
        await self.drain()
        reporter.cancel()
        self.report_counters()
        return exitcodes.OK

    async def start_sinks(self) -> bool:
        """Reach every destination; with onUnreachable=wait, keep trying until it works."""
        wait = self.config.pipeline.on_unreachable == "wait"
        for sink in self.sinks:
            while True:
                try:
                    await asyncio.wait_for(sink.start(), self.config.pipeline.startup_timeout)
                    break
                except (DestinationUnreachable, TimeoutError) as exc:
                    message = str(exc) or f"{sink.name}: no answer within the startup timeout"
                    if not wait:
                        report(self.channels, NAME, "fatal", f"cannot reach {message}")
                        return False
                    log.warning("cannot reach %s; waiting for it", message)
                    await asyncio.sleep(2.0)
            log.info("destination %s ready", sink.name)
        return True

    async def consume(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.orphan:
            item = await loop.run_in_executor(self.executor, self.channels.encoded.receive, 0.2)
            if item is None:
                continue
            if item == STOP:
                return
            batch = ENCODED_DECODER.decode(item)
            for sink in self.sinks:
                await sink.write_batch(batch)

    async def drain(self) -> None:
        started = time.monotonic()
        for sink in self.sinks:
            try:
                await asyncio.wait_for(sink.close(), DRAIN_TIMEOUT)
            except TimeoutError:
                log.error("%s: could not deliver everything within %.0fs at exit", sink.name, DRAIN_TIMEOUT)
        log.info("writer drained in %.2fs", time.monotonic() - started)
        self.executor.shutdown(wait=False)

    async def report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self.report_counters()

    def report_counters(self) -> None:
        delta = self.counters.take_delta()
        if delta:
            report(self.channels, NAME, "counters", delta)
