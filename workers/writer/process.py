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
it was spooled and counted. A `Fence` from the supervisor says what a dead worker
held; what never arrived is counted `dropped.worker_crash`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import uvloop

from shared import counternames as names
from shared import exitcodes
from shared.backoff import Backoff
from shared.config import Config
from shared.counternames import SPOOLED
from shared.counters import SharedCounters, beat
from shared.delivery import make_tracker
from shared.events import ENCODED_DECODER, EncodedBatch, Fence
from shared.ipc import (
    REPORT_INTERVAL,
    STOP,
    Channels,
    MessageChannel,
    report,
    start_parent_watch,
)
from shared.logs import RateLimitedLog, setup_logging
from shared.tasks import cancel_all, spawn
from workers.writer.destinations import enabled_destinations
from workers.writer.feeds import BatchCache, Feed, read_batch
from workers.writer.sessionpublish import SessionPublisher
from workers.writer.sessions import CONSUMER, SessionKeeper
from workers.writer.sinks.base import DestinationUnreachable
from workers.writer.spool import Spool, SpoolWriteError
from workers.writer.spooldir import destination_identities, spool_directory
from workers.writer.spoolsync import sync_while_changing

log = logging.getLogger("senseflow.writer")

NAME = "writer"
DRAIN_TIMEOUT = 60.0
SESSION_CHECKPOINT_SECONDS = 5.0
TAKE_AT_ONCE = 16
"""Batches the writer takes from its channel before the loop's other tasks get a turn."""
STOPPED = -1


def run(config: Config, channels: Channels, parent_pid: int, block: object) -> int:
    setup_logging(config.pipeline.log_level, config.pipeline.log_format, NAME)
    writer = Writer(config, channels, SharedCounters(block))
    start_parent_watch(parent_pid, writer.orphaned)
    return uvloop.run(writer.serve())


class Writer:
    def __init__(self, config: Config, channels: Channels, counters: SharedCounters) -> None:
        self.config = config
        self.channels = channels
        self.counters = counters
        self.destinations = enabled_destinations(config)
        self.destination_names = [destination.name for destination in self.destinations]
        self.delivery = make_tracker(config, self.destination_names, self.counters)
        self.orphan = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.woken: asyncio.Future[None] | None = None  # consume() waits for input
        self.cache = BatchCache()
        self.spool: Spool | None = None
        self.feeds: list[Feed] = []
        self.feed_tasks: list[asyncio.Task[None]] = []
        self.sessions: SessionKeeper | None = None
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
        self.make_feeds()
        self.start_sessions()
        if not await self.start_sinks():
            return exitcodes.DESTINATION_UNREACHABLE
        self.start_feeds()
        report(self.channels, NAME, "ready")
        background = [
            asyncio.create_task(self.report_loop(), name="writer.report"),
            spawn(self.sync_loop(), name="writer.spool-sync"),
            spawn(self.session_checkpoint_loop(), name="writer.sessions"),
            spawn(self.session_publish_loop(), name="writer.sessions.publish"),
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
        identities = destination_identities(self.config, self.destination_names)
        directory = spool_directory(self.config, identities)
        try:
            consumers = [CONSUMER] if self.config.pipeline.sessions.enable else []
            self.spool = Spool(
                directory,
                self.destination_names + consumers,
                options.max_bytes,
                options.segment_bytes,
                options.fsync,
                self.known_cursors(),
                identities | {consumer: "" for consumer in consumers},  # writes nowhere
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
        keys = {name: names.cursor(name) for name in self.destination_names}
        counters = self.counters
        return {name: counters.get(key) for name, key in keys.items() if counters.has(key)}

    def count_spool_at_start(self) -> None:
        """First writer of the run: what a previous run left is `recovered.<destination>`.
        A restarted writer: count the record its predecessor spooled but did not count."""
        assert self.spool is not None
        spool = self.spool
        if not self.counters.has(SPOOLED):
            recovered = {
                names.recovered(name): sum(spool.events_in(seq) for seq in spool.pending(name))
                for name in self.destination_names
            }
            damage = {names.DROPPED_SPOOL_CORRUPT: spool.corrupt_records} | {
                names.spool_mismatch(name): events for name, events in spool.discarded.items()
            }
            cursors = {names.cursor(name): spool.cursors[name] for name in self.destination_names}
            self.counters.commit(recovered | damage, {SPOOLED: spool.next_seq, **cursors})
            return
        for seq in range(self.counters.get(SPOOLED), spool.next_seq):
            if seq in spool.index and (batch := read_batch(spool, seq, self.counters)):
                self.counters.commit(batch.counters, {SPOOLED: seq + 1, **self.seen(batch)})
                log.info("counted batch %d, spooled by the writer before a restart", seq)
        for name in spool.destinations:  # given up while the dead writer's sink held them
            if limbo := self.counters.get(names.limbo(name)):
                self.counters.commit({names.destination_full(name): limbo}, {names.limbo(name): 0})

    def make_feeds(self) -> None:
        """A feed per destination, each with its sink, which acknowledges to the feed."""
        assert self.spool is not None
        self.feeds = [
            Feed(d, self.config, self.spool, self.cache, self.counters, self.delivery.delivered)
            for d in self.destinations
        ]

    def start_sessions(self) -> None:
        """The session state: its checkpoint, then the spooled batches after it."""
        if self.spool is None or not self.config.pipeline.sessions.enable:
            return
        sync = self.config.pipeline.spool.fsync != "never"
        self.sessions = SessionKeeper(self.config.pipeline.sessions, self.spool, sync=sync)
        self.sessions.start()

    async def session_publish_loop(self) -> None:
        """The live view for the supervisor (/api/sessions, shared/sessionlive.py)."""
        if self.sessions is not None:
            await SessionPublisher(self.sessions).run()

    async def session_checkpoint_loop(self) -> None:
        while self.sessions is not None:
            await asyncio.sleep(SESSION_CHECKPOINT_SECONDS)
            if self.sessions.changed:
                self.sessions.checkpoint()

    def start_feeds(self) -> None:
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
        for sink in (feed.sink for feed in self.feeds):
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
        """Take what the channel holds, up to `TAKE_AT_ONCE` batches per turn of the loop
        (the sinks got each one as it was spooled; the loop's other tasks run between two
        turns), then wait for more. The channel stays registered with the loop while we
        consume: no epoll registration per batch."""
        self.loop = asyncio.get_running_loop()
        channel = self.channels.encoded
        self.loop.add_reader(channel.fileno(), self.wake_up)
        try:
            while not self.orphan and self.failure is None:
                try:
                    taken = self.take_ready(channel)
                except SpoolWriteError as exc:  # the batch stays in the channel: taken again
                    await self.wait_for_disk(exc, channel.fileno())
                    continue
                if taken == STOPPED:
                    return
                if taken == TAKE_AT_ONCE:
                    await asyncio.sleep(0)  # more may wait: the others' turn first
                else:  # the channel was found empty
                    await self.input_or_wake_up()
        finally:
            self.loop.remove_reader(channel.fileno())

    def take_ready(self, channel: MessageChannel) -> int:
        """Spool, count and hand over the batches waiting, up to `TAKE_AT_ONCE`: how many
        (0: none waited), or STOPPED. A SpoolWriteError leaves its batch in the channel."""
        for taken in range(TAKE_AT_ONCE):
            item = channel.peek(0)
            if item is None:
                return taken
            if item != STOP:
                self.take(item)
                self.disk_backoff.reset()
            channel.discard_next()  # only now: spooled and counted
            if item == STOP:
                return STOPPED
        return TAKE_AT_ONCE

    async def input_or_wake_up(self) -> None:
        """Until the channel holds a message (its reader calls `wake_up()`), an orphan or
        a failure: no polling."""
        loop = asyncio.get_running_loop()
        self.woken = woken = loop.create_future()
        try:
            await woken
        finally:
            self.woken = None

    def wake_up(self) -> None:
        """In the loop's thread: `consume` looks at the channel and its exit conditions."""
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(None)

    async def wait_for_disk(self, error: SpoolWriteError, channel: int) -> None:
        """The spool could not append (disk full...): count, say so, retry later; the
        channel holds the batch meanwhile and, once full, readers count what they drop.
        Its reader is off meanwhile: the batch waiting would wake the loop at every turn."""
        self.counters.commit({names.SPOOL_WRITE_ERRORS: 1})
        first = self.disk_backoff.attempt == 0
        delay = self.disk_backoff.next_delay()
        message = "cannot append to the spool: %s; retrying in %.1f s"
        (log.error if first else self.drop_log.warning)(message, error, delay)
        loop = asyncio.get_running_loop()
        loop.remove_reader(channel)
        try:
            await asyncio.sleep(delay)
        finally:
            loop.add_reader(channel, self.wake_up)

    def take(self, item: bytes) -> None:
        batch = ENCODED_DECODER.decode(item)
        if isinstance(batch, Fence):
            self.settle_fence(batch)
            return
        if batch.worker >= 0 and self.counters.get(names.seen(batch.worker)) > batch.number:
            return  # spooled and counted before a restart of this writer
        sets = self.seen(batch)
        seq = -1
        if batch.received_ns:
            seq = self.spool_batch(item, batch)  # first: it may fail, to be retried
            self.delivery.accept(len(batch.received_ns))
            sets[SPOOLED] = seq + 1
        self.counters.commit(batch.counters, sets)
        self.enforce_spool_limit()
        if seq >= 0:
            self.hand_over(seq, batch)

    @staticmethod
    def seen(batch: EncodedBatch) -> dict[str, int]:
        if batch.worker < 0:
            return {}
        return {
            names.seen(batch.worker): batch.number + 1,
            names.seen_datagrams(batch.worker): batch.datagrams,
        }

    def settle_fence(self, fence: Fence) -> None:
        """Worker `fence.worker` died holding `fence.datagrams` datagrams from its send
        `fence.number` on: whatever of them did not reach us is lost."""
        worker, number = fence.worker, fence.number
        lost = fence.datagrams
        seen = self.counters.get(names.seen(worker))
        if seen == number + 1:  # its send `number` did arrive
            lost -= self.counters.get(names.seen_datagrams(worker))
        lost = max(lost, 0)
        sets = {
            names.seen(worker): max(seen, number + 1),
            names.seen_datagrams(worker): fence.datagrams,
        }
        self.counters.commit({names.DROPPED_WORKER_CRASH: lost}, sets)
        if lost:
            log.error("worker-%d died holding %d datagram(s); counted as lost", worker, lost)

    def spool_batch(self, item: bytes, batch: EncodedBatch) -> int:
        assert self.spool is not None
        seq = self.spool.append(item, len(batch.received_ns))
        if self.sessions is not None:
            self.sessions.add(seq, batch)
        self.cache.put(seq, batch)
        return seq

    def hand_over(self, seq: int, batch: EncodedBatch) -> None:
        """Spooled and counted: every sink gets the batch in this same turn of the loop (an
        MQTT publish leaves now, behind no other task) when its feed has handed over all
        before it and the sink has room; else the feed's own task hands it over."""
        for feed in self.feeds:
            if not feed.offer(seq, batch):
                feed.wake.set()

    def enforce_spool_limit(self) -> None:
        assert self.spool is not None
        if self.sessions is not None and self.spool.over_limit():
            self.sessions.checkpoint()  # the session state never holds records back
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
        for feed in self.feeds:
            with contextlib.suppress(TimeoutError):  # undelivered: kept in the spool
                await asyncio.wait_for(feed.sink.close(), 1.0)
        for feed in self.feeds:
            feed.give_up_handed()  # no longer in the spool, and now not delivered either
        if self.sessions is not None:
            self.sessions.flush()
            self.sessions.checkpoint()
            SessionPublisher(self.sessions).publish()  # the final state, for the next start
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
        beat(self.counters)
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            beat(self.counters)
            self.report_counters()

    def report_counters(self) -> None:
        # Counters live in the shared block. Latency / batch histogram deltas and who
        # waits: aggregated here, never per event.
        report(self.channels, NAME, "delivery", self.delivery.take_report())
