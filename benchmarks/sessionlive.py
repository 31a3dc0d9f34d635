"""The live session view's hand-over, writer -> supervisor: whole state vs deltas.

    python -m benchmarks.sessionlive [--users 10000 100000] [--active 1000] [--rate 10000]

A real `SessionKeeper` (2 s reorder buffer) holding `--users` users (one session and one
app connection each, over 4 hosts) takes events at `--rate` per second of event time:
opens and closes of random users (every event changes one entry), among all held or only
the first `--active` (the users seen within `maxIdle` are held, few are on at once), in
batches of 500, and publishes every 0.5 s. Per publish, CPU time (`time.thread_time`) of:

- whole (before): the writer's `encode_live` of the state and its reorder buffer +
  atomic write; the supervisor's decode + the buffer applied (what it did per read);
- deltas (now): the writer's `SessionPublisher.publish` (a delta appended); the
  supervisor's `LiveSessionsReader` following it: as `/api/sessions` after every publish
  (the buffer replayed onto copies of the entries it touches), and as an export every
  10 publishes (InfluxDB, MQTT, chart, Prometheus poll every 5-30 s: the deltas since,
  no replay while events keep coming).

Medians over `--rounds` x 10 publishes after a warm-up. One process, nothing else: the
machine may be shared (CPU time, not wall).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from senseflow.sessions import LiveSessionsReader
from shared.config import SessionOptions
from shared.events import EncodedBatch
from shared.sessionlive import decode_snapshot, encode_live, write_atomically
from shared.sessions import CLOSE, OPEN, START, SessionEvent, SessionState
from workers.writer.sessionpublish import SessionPublisher
from workers.writer.sessions import CONSUMER, SessionKeeper
from workers.writer.spool import Spool

HOSTS = ("SENSE1", "SENSE2", "SENSE3", "SENSE4")
BATCH = 500
T0 = 1_790_000_000 * 10**9


def batch_of(events: list[SessionEvent]) -> EncodedBatch:
    stamps = [e.time_ns for e in events]
    return EncodedBatch(b"", [], b"", [], stamps, {}, sessions=msgspec.msgpack.encode(events))


class Load:
    def __init__(
        self, keeper: SessionKeeper, spool: Spool, users: int, rate: int, active: int
    ) -> None:
        self.keeper, self.spool, self.users, self.rate = keeper, spool, users, rate
        self.active = min(active, users) or users
        self.now = T0
        self.rng = random.Random(1)

    def add(self, events: list[SessionEvent]) -> None:
        for i in range(0, len(events), BATCH):
            batch = batch_of(events[i : i + BATCH])
            self.keeper.add(self.spool.append(b"x", len(batch.received_ns)), batch)

    def fill(self) -> None:
        """Every user on: a Start and an Open each, 1 µs apart."""
        events = []
        for i in range(self.users):
            user, host = f"user{i:06d}", HOSTS[i % 4]
            events.append(SessionEvent(self.now, START, host, "LAB", user, "", "", "Chrome", "119"))
            events.append(SessionEvent(self.now + 1, OPEN, host, "LAB", user, "app-1", "App"))
            self.now += 2000
        self.add(events)

    def half_second(self) -> int:
        """0.5 s of events at the rate: an open or close of a random active user each."""
        count, step = self.rate // 2, 10**9 // self.rate
        events = []
        for _ in range(count):
            i = self.rng.randrange(self.active)
            action = OPEN if self.rng.random() < 0.5 else CLOSE
            user, host = f"user{i:06d}", HOSTS[i % 4]
            events.append(SessionEvent(self.now, action, host, "LAB", user, "app-2", "App"))
            self.now += step
        self.add(events)
        return count


def view(reader: LiveSessionsReader, now_ns: int, *, buffered: bool = True) -> SessionState:
    """What every user of the view does first: the latest state, as one view."""
    with reader.state(now_ns, buffered=buffered) as state:
        return state


def thread_ms(work: Callable[[], object]) -> float:
    started = time.thread_time()
    work()
    return (time.thread_time() - started) * 1000


def whole_costs(keeper: SessionKeeper, path: Path) -> tuple[float, float, int]:
    """(writer ms, supervisor ms, bytes) of the hand-over as it was: the whole state."""
    data = b""

    def publish() -> None:
        nonlocal data
        data = encode_live(keeper.state, keeper.waiting, time.time_ns())
        write_atomically(path, data)

    def read() -> None:
        live = decode_snapshot(path.read_bytes())
        state = SessionState.from_checkpoint(live.state)
        state.apply_all(live.waiting)

    return thread_ms(publish), thread_ms(read), len(data)


def measure(users: int, rate: int, rounds: int, active: int = 0) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        spool = Spool(directory, [CONSUMER])
        keeper = SessionKeeper(SessionOptions(), spool, sync=False)
        publisher = SessionPublisher(keeper)
        load = Load(keeper, spool, users, rate, active)
        load.fill()
        publisher.publish()  # the snapshot at start
        every = LiveSessionsReader(Path(directory) / "sessions.live", keeper.max_idle_ns)
        tenth = LiveSessionsReader(Path(directory) / "sessions.live", keeper.max_idle_ns)
        for reader in (every, tenth):
            view(reader, load.now)
        for _ in range(6):  # the reorder buffer full (2 s), steady state
            load.half_second()
            publisher.publish()
            view(every, load.now)
        figures: dict[str, list[float]] = {k: [] for k in ("wp", "wr", "dp", "api", "exp")}
        events = 0
        gc.collect()
        for index in range(rounds * 10):
            events = load.half_second()
            if index % 10 == 0:  # the old way, on the same state (not published)
                wp, wr, size = whole_costs(keeper, Path(directory) / "whole.live")
                figures["wp"].append(wp)
                figures["wr"].append(wr)
            figures["dp"].append(thread_ms(publisher.publish))
            figures["api"].append(thread_ms(lambda: view(every, load.now)))
            if index % 10 == 9:  # an export, every 5 s: the buffer not replayed
                figures["exp"].append(thread_ms(lambda: view(tenth, load.now, buffered=False)))
        spool.close()
        publisher.close()
    result = {key: statistics.median(values) for key, values in figures.items()}
    result["events"] = events
    result["whole_mb"] = size / 1e6
    result["snapshots_read"] = every.snapshots_read + tenth.snapshots_read
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--active", type=int, default=0, help="events touch only this many users (0: all held)"
    )
    args = parser.parse_args()
    print(
        "| users held | events/publish | whole state MB | writer ms per publish: whole -> delta "
        "| supervisor ms per read: whole -> /api/sessions (buffer replayed) / export (5 s) |"
    )
    print("|---:|---:|---:|---|---|")
    for users in args.users:
        r = measure(users, args.rate, args.rounds, args.active)
        print(
            f"| {users:,} | {r['events']:,.0f} | {r['whole_mb']:.1f} "
            f"| {r['wp']:.1f} -> {r['dp']:.2f} "
            f"| {r['wr']:.1f} -> {r['api']:.1f} / {r['exp']:.2f} |"
        )


if __name__ == "__main__":
    main()
