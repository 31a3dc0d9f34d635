"""Session state (shared/sessions.py): memory per session and connection, CPU per event.

    python -m benchmarks.sessions [--sessions 100000] [--events 200000]

Memory: tracemalloc over building `--sessions` users, one session each, spread over 4 hosts
(user names and browser strings made new per user, as decoded events make them), then the
same users each opening one app connection. CPU: `time.thread_time_ns` around applying
`--events` random events (starts, opens, closes, stops over 5,000 users and 50 apps), and
the writer's whole share for 50,000 corpus events (decode the worker's session arrays,
reorder, apply). The live view: what publishing and reading it costs at `--sessions`.
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
import tracemalloc
import uuid

from shared.sessions import CLOSE, OPEN, START, STOP, SessionEvent, SessionState

DAY_NS = 86_400 * 10**9
HOSTS = ("SENSE1", "SENSE2", "SENSE3", "SENSE4")


def memory(sessions: int) -> tuple[float, float, int]:
    """(bytes per session, bytes per connection, total bytes) for `sessions` users."""
    apps = [str(uuid.UUID(int=i)) for i in range(50)]
    gc.collect()
    tracemalloc.start()
    state = SessionState(DAY_NS)
    for i in range(sessions):  # made inside the trace: what the state keeps of them counts
        user, major = f"user{i:06d}", str(119 + i % 3)
        state.apply(
            SessionEvent(i, START, HOSTS[i % 4], "LAB", user, "", "", "Chrome", major, "Win", "10")
        )
    with_sessions = tracemalloc.get_traced_memory()[0]
    for i in range(sessions):
        user, app = f"user{i:06d}", apps[i % 50]
        state.apply(SessionEvent(sessions + i, OPEN, HOSTS[i % 4], "LAB", user, app, "App"))
    with_connections = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert state.totals() == (sessions, sessions, sessions)
    return (
        with_sessions / sessions,
        (with_connections - with_sessions) / sessions,
        with_connections,
    )


def cpu_per_event(count: int, seed: int = 1, *, one_by_one: bool = True) -> float:
    """`apply` per event, or (`one_by_one` False) the whole list in one `apply_all`, as
    the writer's reorder buffer hands its runs over."""
    rng = random.Random(seed)
    apps = [str(uuid.UUID(int=i)) for i in range(50)]
    actions = (START, OPEN, OPEN, CLOSE, CLOSE, STOP)
    events = [
        SessionEvent(
            i * 1000,
            rng.choice(actions),
            rng.choice(HOSTS),
            "LAB",
            f"user{rng.randrange(5000)}",
            rng.choice(apps),
            "App",
            "Chrome",
            "119",
            "Windows",
            "10",
        )
        for i in range(count)
    ]
    state = SessionState(DAY_NS)
    gc.collect()
    started = time.thread_time_ns()
    if one_by_one:
        for event in events:
            state.apply(event)
    else:
        state.apply_all(events)
    return (time.thread_time_ns() - started) / count


def writer_cpu_per_event(
    count: int, seed: int = 1, spacing_ns: int = 20_000
) -> tuple[float, float]:
    """What the writer spends per event: decode `EncodedBatch.sessions`, reorder, apply;
    and of that, the decode alone. Events `spacing_ns` apart: at 20 µs all of them wait in
    the 2 s reorder buffer until the end (decoded long before they are applied, so out of
    the CPU's caches); at 1 ms (1,000 events/s) about 2,000 wait at a time."""
    from benchmarks.sessions_ab import writer_ns
    from senseflow.commands.corpus import app_names, make_corpus
    from shared.config import config_from_document
    from shared.events import RawBatch
    from workers.pipeline import EventPipeline
    from workers.writer import sessions as keeper_module
    from workers.writer.sessions import _EVENTS

    pipeline = EventPipeline(config_from_document({}, {}), app_names())
    datagrams = make_corpus(count, seed=seed)
    start = time.time_ns()
    batches = [
        pipeline.process_batch(
            RawBatch(datagrams[i : i + 500], [start + (i + j) * spacing_ns for j in range(500)])
        )
        for i in range(0, count - count % 500, 500)
    ]
    events = sum(len(b.received_ns) for b in batches)
    spent_per_event = writer_ns(keeper_module, batches)
    gc.collect()
    started = time.thread_time_ns()
    for batch in batches:
        _EVENTS.decode(batch.sessions)
    return spent_per_event, (time.thread_time_ns() - started) / events


def publish_cost(sessions: int) -> dict[str, float]:
    """The live view's whole snapshot at `sessions` users with a connection each
    (shared/sessionlive.py; the deltas between snapshots: benchmarks/sessionlive.py):
    the writer's encode + write (CPU ms), the file (MB), the supervisor's decode and one
    `/api/sessions` document as JSON (CPU ms: the machine may be shared)."""
    from pathlib import Path

    import msgspec

    from shared.sessionlive import decode_snapshot, encode_live, write_atomically

    state = SessionState(DAY_NS)
    for i in range(sessions):
        user, host = f"user{i:06d}", HOSTS[i % 4]
        state.apply(SessionEvent(i, START, host, "LAB", user, "", "", "Chrome", "119"))
        state.apply(SessionEvent(sessions + i, OPEN, host, "LAB", user, f"app{i % 50}", "App"))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "sessions.live"
        started = time.thread_time()
        data = encode_live(state, [], time.time_ns())
        write_atomically(path, data)
        written = time.thread_time()
        published = SessionState.from_checkpoint(decode_snapshot(path.read_bytes()).state)
        decoded = time.thread_time()
        msgspec.json.encode(published.snapshot(2 * sessions))
        shown = time.thread_time()
    return {
        "publish_ms": (written - started) * 1000,
        "megabytes": len(data) / 1e6,
        "decode_ms": (decoded - written) * 1000,
        "document_ms": (shown - decoded) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    per_session, per_connection, total = memory(args.sessions)
    print(f"sessions: {args.sessions}, traced memory {total / 2**20:.1f} MiB")
    print(f"bytes per session: {per_session:.0f}, per connection: {per_connection:.0f}")
    print(
        f"CPU per applied event: {cpu_per_event(args.events):.0f} ns one by one, "
        f"{cpu_per_event(args.events, one_by_one=False):.0f} ns as one run"
    )
    for spacing_ns, rate in ((20_000, "50,000"), (1_000_000, "1,000")):
        writer, decode = writer_cpu_per_event(50_000, spacing_ns=spacing_ns)
        print(
            f"writer CPU per event at {rate} events/s (decode, reorder, apply): "
            f"{writer:.0f} ns, of which decode {decode:.0f} ns"
        )
    cost = publish_cost(args.sessions)
    print(
        f"live view at {args.sessions} sessions: publish {cost['publish_ms']:.0f} ms "
        f"({cost['megabytes']:.1f} MB), decode {cost['decode_ms']:.0f} ms, "
        f"/api/sessions JSON {cost['document_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main()
