"""`senseflow send`: a load generator an operator can point at any receiver.

It sends a realistic, deterministic mix (see senseflow/commands/corpus.py) from K sockets,
as K Sense proxies would, at a steady rate. Datagrams are generated before the clock starts and
sent in bursts whose loop runs in C (`map(sock.send, ...)`), which is what lets one
Python process hold 200,000+ datagrams/s; when it cannot keep up, it says so.
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import orjson

from senseflow.commands.corpus import make_corpus
from workers.parse import parse_datagram

POOL_LIMIT = 50_000
BURST = 64
PROGRESS_INTERVAL = 0.25
BEHIND_TOLERANCE = 0.98


@dataclass
class SendReport:
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0
    target_rate: float = 0.0
    mix: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def fell_behind(self) -> bool:
        return bool(self.target_rate) and self.rate < self.target_rate * BEHIND_TOLERANCE

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": round(self.rate, 1), "fell_behind": self.fell_behind}


def add_send_command(commands: Any) -> None:
    parser = commands.add_parser(
        "send",
        help="send realistic test user events over UDP (load generator, smoke test)",
        description="Send a realistic mix of Qlik Sense user-event datagrams to a receiver.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9997)
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="datagrams per second (0: as fast as possible)"
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--count", type=int, help="send exactly N datagrams")
    amount.add_argument("--duration", type=float, help="send for S seconds (default 10)")
    parser.add_argument("--sources", type=int, default=4, help="sending sockets (Sense proxies)")
    parser.add_argument(
        "--invalid-share", type=float, default=0.0, help="share of invalid datagrams, 0..1"
    )
    parser.add_argument(
        "--formats",
        choices=("both", "a", "b"),
        default="both",
        help="wire formats: Butler SOS (a), short (b) or both",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live progress bar (default: when stderr is a terminal)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--sessions",
        type=int,
        metavar="N",
        help="session mode: N simulated users with a known ground truth (see --truth)",
    )
    parser.add_argument(
        "--truth", metavar="FILE", help="session mode: write the ground truth as JSON lines"
    )
    parser.add_argument(
        "--truth-every", type=int, default=1000, metavar="K", help="a truth line every K sent"
    )
    parser.set_defaults(command=run_send)


def run_send(args: argparse.Namespace) -> int:
    if args.count is None and args.duration is None:
        args.duration = 10.0
    if args.sessions:
        return run_session_mode(args)
    total = args.count if args.count is not None else int(args.rate * args.duration) or POOL_LIMIT
    pool = make_corpus(min(max(total, 1), POOL_LIMIT), args.seed, args.invalid_share, args.formats)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    report = send(
        (args.host, args.port),
        pool,
        args.rate,
        count=args.count,
        duration=args.duration,
        sources=args.sources,
        on_progress=ProgressBar(sys.stderr) if progress else None,
    )
    if progress:
        sys.stderr.write("\n")
    report.mix = mix_of(pool, report.sent)
    if args.json:
        print(orjson.dumps(report.as_dict()).decode())
    else:
        print(summary(report))
    return 0 if not report.errors else 1


def run_session_mode(args: argparse.Namespace) -> int:
    from senseflow.commands.sessionsim import Simulation, send_sessions

    count = args.count if args.count is not None else int(args.rate * args.duration)
    simulation = Simulation(args.sessions, args.seed)
    started = time.perf_counter()
    sent = send_sessions(
        (args.host, args.port), simulation, count, args.rate, max(1, args.truth_every), args.truth
    )
    totals = simulation.truth.totals()
    print(
        f"sent {sent:,} session datagrams in {time.perf_counter() - started:.2f} s; now on: "
        f"{totals[0]} sessions, {totals[1]} users, {totals[2]} connections"
    )
    return 0


def send(
    address: tuple[str, int],
    pool: list[bytes],
    rate: float,
    count: int | None = None,
    duration: float | None = None,
    sources: int = 4,
    on_progress: Callable[[SendReport, int | None], None] | None = None,
) -> SendReport:
    """Send `count` datagrams (or for `duration` s), cycling through `pool`, at `rate`/s."""
    family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)[0][0]
    sockets = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(max(1, sources))]
    for sock in sockets:
        sock.connect(address)
    report = SendReport(target_rate=rate)
    try:
        _send_loop(sockets, pool, rate, count, duration, report, on_progress)
    finally:
        for sock in sockets:
            sock.close()
    return report


def _send_loop(
    sockets: list[socket.socket],
    pool: list[bytes],
    rate: float,
    count: int | None,
    duration: float | None,
    report: SendReport,
    on_progress: Callable[[SendReport, int | None], None] | None,
) -> None:
    senders = [sock.send for sock in sockets]
    start = time.perf_counter()
    deadline = start + duration if duration is not None else float("inf")
    next_progress = start + PROGRESS_INTERVAL
    limit = count if count is not None else sys.maxsize
    sent, position, turn = 0, 0, 0
    while sent < limit:
        now = time.perf_counter()
        if now >= deadline:
            break
        due = limit if not rate else min(limit, int((now - start) * rate) + 1)
        if due <= sent:
            time.sleep(min(0.0005, (sent + 1) / rate - (now - start)))
            continue
        burst = min(due - sent, BURST, len(pool) - position)
        try:
            collections.deque(map(senders[turn], pool[position : position + burst]), maxlen=0)
        except OSError:
            report.errors += 1
        sent += burst
        position = (position + burst) % len(pool)
        turn = (turn + 1) % len(senders)
        if on_progress is not None and now >= next_progress:
            report.sent, report.seconds = sent, now - start
            on_progress(report, count)
            next_progress = now + PROGRESS_INTERVAL
    report.sent = sent
    report.seconds = time.perf_counter() - start
    if on_progress is not None:
        on_progress(report, count)


def mix_of(pool: list[bytes], sent: int) -> dict[str, int]:
    """What was sent, by action (and `invalid` for the rest), as the receiver will see it."""
    kinds = [_kind(datagram) for datagram in pool]
    mix: collections.Counter[str] = collections.Counter()
    full, rest = divmod(sent, len(pool)) if pool else (0, 0)
    for index, kind in enumerate(kinds):
        mix[kind] += full + (1 if index < rest else 0)
    return dict(mix)


def _kind(datagram: bytes) -> str:
    result = parse_datagram(datagram, 0)
    return "invalid" if isinstance(result, str) else result.command


def summary(report: SendReport) -> str:
    lines = [
        f"sent {report.sent:,} datagrams in {report.seconds:.2f} s: {report.rate:,.0f}/s"
        + (f" (target {report.target_rate:,.0f}/s)" if report.target_rate else ""),
        "mix: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report.mix.items())),
    ]
    if report.fell_behind:
        lines.append(
            f"fell behind: achieved {report.rate / report.target_rate:.0%} of the target rate"
        )
    if report.errors:
        lines.append(f"send errors: {report.errors}")
    return "\n".join(lines)


class ProgressBar:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, report: SendReport, count: int | None) -> None:
        width = 30
        if count:
            done = min(1.0, report.sent / count)
            bar = "#" * int(done * width) + "-" * (width - int(done * width))
            head = f"[{bar}] {done:6.1%} {report.sent:,}/{count:,}"
        else:
            head = f"{report.sent:,} sent"
        target = f" (target {report.target_rate:,.0f}/s)" if report.target_rate else ""
        self.stream.write(f"\r{head}  {report.rate:,.0f}/s{target}   ")
        if count and report.sent >= count:
            self.stream.write("\n")
        self.stream.flush()
