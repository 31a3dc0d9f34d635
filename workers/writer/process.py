"""The writer process: takes encoded batches from the workers and feeds every destination.

It never parses: batches arrive as bytes ready to send. Each batch is appended to the
spool first (workers/writer/spool.py), then every destination is fed from there at its own pace
(workers/writer/feeds.py): a destination that is down holds back nobody, its backlog waits on
disk (bounded; past the bound the oldest is dropped and counted), and a writer killed at
any moment is replayed from the spool by its successor (SPEC 4, issue 5).

Counting is exact across a SIGKILL of the writer or of a worker. The writer peeks at each
batch, spools it, counts its events / invalid / excluded and records the worker's send
number in one commit of its shared counter block, and only then takes the batch off the
channel: a successor peeks the same batch again and knows from the send numbers whether
it was spooled and counted. A fence batch from the supervisor says what a dead worker
held; what never arrived is counted `dropped.worker_crash`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import uvloop

from shared import exitcodes
from shared.backoff import Backoff
from shared.config import Config
from shared.counters import Counting, SharedCounters
from shared.delivery import make_tracker
from shared.events import ENCODED_DECODER, EncodedBatch
from shared.ipc import REPORT_INTERVAL, STOP, Channels, report, start_parent_watch
from shared.logs import RateLimitedLog, setup_logging
from shared.tasks import cancel_all, spawn
from workers.writer.feeds import (
    SPOOL_CORRUPT,
    SPOOL_MISMATCH,
    BatchCache,
    Feed,
    cursor_key,
    limbo_key,
    read_batch,
)
from workers.writer.sinks.base import DestinationUnreachable, Sink
from workers.writer.spool import Spool, SpoolWriteError
from workers.writer.spooldir import destination_identities, spool_directory
from workers.writer.spoolsync import sync_while_changing

log = logging.getLogger("senseflow.writer")

NAME = "writer"
DRAIN_TIMEOUT = 60.0
SPOOLED = "_spooled"
SPOOL_WRITE_ERRORS = "spool.write_errors"
"""Appends to the spool that failed (disk full...) and were retried."""
"""The first spool sequence number whose record this run has not counted yet."""


def seen_key(worker: int) -> str:
    """One past the last send number taken from this worker slot."""
    return f"_seen.{worker}"


def seen_datagrams_key(worker: int) -> str:
    """Datagrams in that last send."""
    return f"_seen_datagrams.{worker}"


def run(config: Config, channels: Channels, parent_pid: int, block: object) -> int:
    setup_logging(config.pipeline.log_level, config.pipeline.log_format, NAME)
    writer = Writer(config, channels, SharedCounters(block))
    start_parent_watch(parent_pid, writer.orphaned)
    return uvloop.run(writer.serve())


def destination_names(config: Config) -> list[str]:
    butler = config.butler
    names = []
    if butler.influxdb_config.enable and butler.user_events.send_to_influxdb.enable:
        names.append("influxdb")
    if butler.mqtt_config.enable and butler.user_events.send_to_mqtt.enable:
        names.append("mqtt")
    if butler.new_relic.enable and butler.user_events.send_to_new_relic.enable:
        names.append("newrelic")
    return names


def make_sinks(
    config: Config,
    counters: Counting,
    on_delivered: Callable[[str, list[int]], None] | None = None,
) -> list[Sink]:
    from workers.writer.sinks.influx import InfluxSink
    from workers.writer.sinks.mqtt import MqttSink
    from workers.writer.sinks.newrelic import NewRelicSink

    factories: dict[str, type[InfluxSink] | type[MqttSink] | type[NewRelicSink]] = {
        "influxdb": InfluxSink,
        "mqtt": MqttSink,
        "newrelic": NewRelicSink,
    }
    return [factories[name](config, counters, on_delivered) for name in destination_names(config)]


class Writer:
    def __init__(self, config: Config, channels: Channels, counters: SharedCounters) -> None:
        self.config = config
        self.channels = channels
        self.counters = counters
        self.delivery = make_tracker(config, destination_names(config), self.counters)
        self.sinks = make_sinks(config, self.counters, self.delivery.delivered)
        self.orphan = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.woken: asyncio.Future[None] | None = None  # consume() waits for input
        self.cache = BatchCache()
        self.spool: Spool | None = None
        self.feeds: list[Feed] = []
        self.feed_tasks: list[asyncio.Task[None]] = []
        self.drop_log = RateLimitedLog(log)
        self.disk_backoff = Backoff(base=0.5, cap=10.0)
        self.failure: BaseException | None = None

    def orphaned(self) -> None:
        """Called in the parent watch's thread."""
        self.orphan = True
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                self.loop.call_soon_threadsafe(self.wake_up)

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A background task died: log why and stop; the supervisor restarts us and the
        spool replays whatever was not delivered."""
        error = context.get("exception")
        log.error("%s", context.get("message"), exc_info=error)
        if self.failure is None:
            self.failure = error or RuntimeError(str(context.get("message")))
        self.wake_up()

    async def serve(self) -> int:
        asyncio.get_running_loop().set_exception_handler(self.on_loop_error)
        if not self.open_spool():
            return exitcodes.BOOT_FAILURE
        self.count_spool_at_start()
        if not await self.start_sinks():
            return exitcodes.DESTINATION_UNREACHABLE
        self.start_feeds()
        report(self.channels, NAME, "ready")
        background = [
            asyncio.create_task(self.report_loop(), name="writer.report"),
            spawn(self.sync_loop(), name="writer.spool-sync"),
        ]
        await self.consume()
        if self.failure is not None:
            self.report_counters()
            return exitcodes.FAILURE
        await self.drain()
        for task in background:
            task.cancel()
        self.report_counters()
        return exitcodes.OK

    def open_spool(self) -> bool:
        options = self.config.pipeline.spool
        names = [sink.name for sink in self.sinks]
        identities = destination_identities(self.config, names)
        directory = spool_directory(self.config, identities)
        try:
            self.spool = Spool(
                directory,
                names,
                options.max_bytes,
                options.segment_bytes,
                options.fsync,
                self.known_cursors(),
                identities,
                options.discard_mismatch,
            )
        except OSError as exc:
            report(self.channels, NAME, "fatal", f"cannot use the spool {directory}: {exc}")
            return False
        log.info("spool: %s", directory)
        self.delivery.use_spool(self.spool)  # /healthz and /metrics: what the spool holds
        return True

    def known_cursors(self) -> dict[str, int]:
        """The cursors a predecessor in this run reached (more recent than the file's)."""
        keys = {sink.name: cursor_key(sink.name) for sink in self.sinks}
        counters = self.counters
        return {name: counters.get(key) for name, key in keys.items() if counters.has(key)}

    def count_spool_at_start(self) -> None:
        """First writer of the run: what a previous run left is `recovered.<destination>`.
        A restarted writer: count the record its predecessor spooled but did not count."""
        assert self.spool is not None
        spool = self.spool
        if not self.counters.has(SPOOLED):
            recovered = {
                f"recovered.{name}": sum(spool.events_in(seq) for seq in spool.pending(name))
                for name in spool.destinations
            }
            damage = {SPOOL_CORRUPT: spool.corrupt_records} | {
                f"{SPOOL_MISMATCH}.{name}": events for name, events in spool.discarded.items()
            }
            cursors = {cursor_key(name): spool.cursors[name] for name in spool.destinations}
            self.counters.commit(recovered | damage, {SPOOLED: spool.next_seq, **cursors})
            return
        for seq in range(self.counters.get(SPOOLED), spool.next_seq):
            if seq in spool.index and (batch := read_batch(spool, seq, self.counters)):
                self.counters.commit(batch.counters, {SPOOLED: seq + 1, **self.seen(batch)})
                log.info("counted batch %d, spooled by the writer before a restart", seq)
        for name in spool.destinations:  # given up while the dead writer's sink held them
            if limbo := self.counters.get(limbo_key(name)):
                self.counters.commit(
                    {f"dropped.destination_full.{name}": limbo}, {limbo_key(name): 0}
                )

    def start_feeds(self) -> None:
        assert self.spool is not None
        self.feeds = [Feed(sink, self.spool, self.cache, self.counters) for sink in self.sinks]
        for feed in self.feeds:
            if feed.backlog:
                log.info("%s: replaying %d batch(es) from the spool", feed.name, feed.backlog)
            self.feed_tasks.append(spawn(feed.run(), name=f"writer.feed.{feed.name}"))

    async def sync_loop(self) -> None:
        """fsync (policy `interval`) and save the cursors to disk, on the fsync timer while
        the spool changes."""
        options = self.config.pipeline.spool
        if self.spool is None:
            return
        await sync_while_changing(self.spool, options.fsync_interval / 1000)

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
        self.loop = asyncio.get_running_loop()
        channel = self.channels.encoded
        while not self.orphan and self.failure is None:
            item = channel.peek(0)
            if item is None:
                await self.input_or_wake_up(channel.fileno())
                continue
            await asyncio.sleep(0)  # the feeds and sinks run between two batches
            if item != STOP:
                try:
                    self.take(item)
                except SpoolWriteError as exc:
                    await self.wait_for_disk(exc)
                    continue  # the batch stays in the channel: taken again
                self.disk_backoff.reset()
            channel.discard_next()  # only now: spooled and counted
            if item == STOP:
                return

    async def input_or_wake_up(self, channel: int) -> None:
        """Until the channel (its fileno) holds a message, or `wake_up()`: no polling."""
        loop = asyncio.get_running_loop()
        self.woken = woken = loop.create_future()
        loop.add_reader(channel, self.wake_up)
        try:
            await woken
        finally:
            loop.remove_reader(channel)
            self.woken = None

    def wake_up(self) -> None:
        """In the loop's thread: `consume` looks at the channel and its exit conditions."""
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(None)

    async def wait_for_disk(self, error: SpoolWriteError) -> None:
        """The spool could not append (disk full...): count, say so, retry later; the
        channel holds the batch meanwhile and, once full, readers count what they drop."""
        self.counters.commit({SPOOL_WRITE_ERRORS: 1})
        first = self.disk_backoff.attempt == 0
        delay = self.disk_backoff.next_delay()
        message = "cannot append to the spool: %s; retrying in %.1f s"
        (log.error if first else self.drop_log.warning)(message, error, delay)
        await asyncio.sleep(delay)

    def take(self, item: bytes) -> None:
        batch = ENCODED_DECODER.decode(item)
        if batch.fence:
            self.settle_fence(batch)
            return
        if batch.worker >= 0 and self.counters.get(seen_key(batch.worker)) > batch.number:
            return  # spooled and counted before a restart of this writer
        sets = self.seen(batch)
        if batch.received_ns:
            seq = self.spool_batch(item, batch)  # first: it may fail, to be retried
            self.delivery.accept(len(batch.received_ns))
            sets[SPOOLED] = seq + 1
        self.counters.commit(batch.counters, sets)
        self.enforce_spool_limit()

    @staticmethod
    def seen(batch: EncodedBatch) -> dict[str, int]:
        if batch.worker < 0:
            return {}
        return {
            seen_key(batch.worker): batch.number + 1,
            seen_datagrams_key(batch.worker): batch.datagrams,
        }

    def settle_fence(self, fence: EncodedBatch) -> None:
        """Worker `fence.worker` died holding `fence.datagrams` datagrams from its send
        `fence.number` on: whatever of them did not reach us is lost."""
        worker, number = fence.worker, fence.number
        lost = fence.datagrams
        seen = self.counters.get(seen_key(worker))
        if seen == number + 1:  # its send `number` did arrive
            lost -= self.counters.get(seen_datagrams_key(worker))
        lost = max(lost, 0)
        self.counters.commit(
            {"dropped.worker_crash": lost},
            {seen_key(worker): max(seen, number + 1), seen_datagrams_key(worker): fence.datagrams},
        )
        if lost:
            log.error("worker-%d died holding %d datagram(s); counted as lost", worker, lost)

    def spool_batch(self, item: bytes, batch: EncodedBatch) -> int:
        assert self.spool is not None
        seq = self.spool.append(item, len(batch.received_ns))
        self.cache.put(seq, batch)
        for feed in self.feeds:
            feed.wake.set()
        return seq

    def enforce_spool_limit(self) -> None:
        assert self.spool is not None
        while self.spool.over_limit():
            dropped = self.spool.drop_oldest_segment()
            if not dropped:
                break
            adds: dict[str, int] = {}
            sets: dict[str, int] = {}
            lost = {
                feed.name: feed.count_dropped(dropped[feed.name], adds, sets) for feed in self.feeds
            }
            self.counters.commit(adds, sets)  # every destination's outcome at once
            self.spool.persist()
            for name, events in lost.items():
                if events:
                    self.drop_log.warning(
                        "%s: spool full (%d bytes): dropped the oldest %d event(s)",
                        name,
                        self.spool.max_bytes,
                        events,
                    )
        if self.feeds:
            self.cache.forget_before(min(feed.next for feed in self.feeds))

    async def drain(self) -> None:
        """Deliver everything spooled; what a destination cannot take in time stays spooled."""
        started = time.monotonic()
        for feed in self.feeds:
            remaining = max(0.1, DRAIN_TIMEOUT - (time.monotonic() - started))
            try:
                await asyncio.wait_for(self.deliver_all(feed), remaining)
            except TimeoutError:
                log.error(
                    "%s: %d batch(es) not delivered at exit; they stay in the spool and are "
                    "delivered after the next start",
                    feed.name,
                    feed.pending_batches,
                )
        await cancel_all(self.feed_tasks)
        for sink in self.sinks:
            with contextlib.suppress(TimeoutError):  # undelivered: kept in the spool
                await asyncio.wait_for(sink.close(), 1.0)
        for feed in self.feeds:
            feed.give_up_handed()  # no longer in the spool, and now not delivered either
        if self.spool is not None:
            self.spool.close()
        log.info("writer drained in %.2fs", time.monotonic() - started)

    @staticmethod
    async def deliver_all(feed: Feed) -> None:
        while feed.backlog:
            feed.wake.set()
            await asyncio.sleep(0.01)
        await feed.sink.flush()
        while feed.pending_batches:
            await asyncio.sleep(0.01)

    async def report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self.report_counters()

    def report_counters(self) -> None:
        # Counters live in the shared block. Latency / batch histogram deltas and who
        # waits: aggregated here, never per event.
        report(self.channels, NAME, "delivery", self.delivery.take_report())
