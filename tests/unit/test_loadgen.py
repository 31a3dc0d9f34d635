"""`senseflow send` (senseflow/commands/send.py) and its corpus: exact counts, the mix, the flags.

Datagrams go to a UDP socket on loopback read by a thread, so what is checked is what a
receiver gets. Rates are bounded low enough (and the socket buffer large enough) that
loopback never drops; nothing here asserts how fast the sender is.
"""

from __future__ import annotations

import collections
import io
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from senseflow.cli import main
from senseflow.commands.corpus import ACTION_WEIGHTS, make_corpus
from senseflow.commands.send import BURST, ProgressBar, SendReport, mix_of, send, summary
from workers.parse import parse_datagram


class UdpSink:
    """A loopback UDP socket whose datagrams a thread collects."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []
        self.sources: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, address = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.datagrams.append(data)
            self.sources.add(address)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Until `count` datagrams arrived (or `timeout`); then a moment for any extra one."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        while len(self.datagrams) < count and not deadline.is_set():
            deadline.wait(0.01)
        timer.cancel()
        self._stop.wait(0.2)
        return list(self.datagrams)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def udp_sink() -> Iterator[UdpSink]:
    sink = UdpSink()
    yield sink
    sink.close()


def kinds(datagrams: list[bytes]) -> collections.Counter[str]:
    """What a receiver makes of the datagrams: the action, or `invalid`."""
    parsed = (parse_datagram(d, 0) for d in datagrams)
    return collections.Counter("invalid" if isinstance(e, str) else e.command for e in parsed)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["send", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the engine -------------------------------------------------------------------------------


def test_sends_exactly_count_from_every_source(udp_sink: UdpSink) -> None:
    pool = make_corpus(1_000, seed=3)
    report = send(("127.0.0.1", udp_sink.port), pool, 20_000, count=2_500, sources=5)
    received = udp_sink.wait_for(2_500)
    assert report.sent == 2_500 and report.errors == 0
    assert len(received) == 2_500
    assert len(udp_sink.sources) == 5  # five sending sockets, as five Sense proxies
    # The pool is cycled in order: 2.5 passes over it.
    assert collections.Counter(received) == collections.Counter(pool * 2 + pool[:500])


def test_reported_mix_is_what_the_receiver_parses(udp_sink: UdpSink) -> None:
    pool = make_corpus(700, seed=5, invalid_share=0.1)
    report = send(("127.0.0.1", udp_sink.port), pool, 20_000, count=1_000)
    received = udp_sink.wait_for(1_000)
    assert mix_of(pool, report.sent) == dict(kinds(received))


def test_rate_paces_the_sending() -> None:
    """At 2,000/s, 600 datagrams cannot leave before ~0.3 s (minus one burst of slack)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        report = send(target.getsockname(), make_corpus(100), 2_000, count=600)
    assert report.sent == 600
    assert report.seconds >= (600 - BURST) / 2_000
    assert report.target_rate == 2_000


def test_duration_bounds_what_is_sent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        report = send(target.getsockname(), make_corpus(100), 1_000, duration=0.3)
    assert 0 < report.sent <= 0.3 * 1_000 + BURST
    assert report.seconds >= 0.3


def test_falling_behind_is_reported() -> None:
    report = SendReport(
        sent=50_000, seconds=1.0, target_rate=200_000, mix={"Open connection": 50_000}
    )
    assert report.fell_behind
    assert "fell behind: achieved 25% of the target rate" in summary(report)
    on_time = SendReport(sent=199_000, seconds=1.0, target_rate=200_000)
    assert not on_time.fell_behind and "fell behind" not in summary(on_time)
    assert not SendReport(sent=10, seconds=1.0, target_rate=0).fell_behind  # 0: as fast as possible


# -- the corpus -------------------------------------------------------------------------------


def test_corpus_is_deterministic() -> None:
    assert make_corpus(500, seed=9) == make_corpus(500, seed=9)
    assert make_corpus(500, seed=9) != make_corpus(500, seed=10)


@pytest.mark.parametrize("share", [0.0, 0.013, 0.25, 1.0])
def test_invalid_share_is_exact(share: float) -> None:
    pool = make_corpus(2_000, seed=2, invalid_share=share)
    assert kinds(pool)["invalid"] == round(2_000 * share)


def test_action_mix_is_realistic() -> None:
    counts = kinds(make_corpus(20_000, seed=4))
    assert set(counts) == set(ACTION_WEIGHTS)
    for action, weight in ACTION_WEIGHTS.items():
        assert counts[action] / 20_000 == pytest.approx(weight, abs=0.02)


@pytest.mark.parametrize(("formats", "butler_share"), [("a", 1.0), ("b", 0.0), ("both", 0.7)])
def test_wire_formats(formats: str, butler_share: float) -> None:
    pool = make_corpus(5_000, seed=6, formats=formats)
    butler = sum(
        d.startswith((b"/qseow-proxy-session/", b"/qseow-proxy-connection/")) for d in pool
    )
    short = sum(d.startswith(b"/proxy-user-event/") for d in pool)
    assert butler + short == len(pool)
    assert butler / len(pool) == pytest.approx(butler_share, abs=0.03)
    assert kinds(pool)["invalid"] == 0  # both formats parse


def test_realistic_variety() -> None:
    events = [parse_datagram(d, 0) for d in make_corpus(5_000, seed=8)]
    users = {(e.user_directory, e.user_id) for e in events if not isinstance(e, str)}
    agents = {e.message.partition("UserAgent: ")[2] for e in events if not isinstance(e, str)} - {
        ""
    }
    assert len(users) > 100
    assert len(agents) >= 20


# -- the command ------------------------------------------------------------------------------


def test_cli_count_and_json_summary(udp_sink: UdpSink, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys,
        "--port",
        str(udp_sink.port),
        "--count",
        "1200",
        "--rate",
        "20000",
        "--invalid-share",
        "0.05",
        "--sources",
        "3",
        "--json",
        "--no-progress",
    )
    received = udp_sink.wait_for(1_200)
    assert code == 0
    summary_json = json.loads(out)
    assert {
        "sent",
        "errors",
        "seconds",
        "target_rate",
        "mix",
        "rate",
        "fell_behind",
    } <= summary_json.keys()
    assert summary_json["sent"] == len(received) == 1_200
    assert summary_json["mix"] == dict(kinds(received))
    assert summary_json["mix"]["invalid"] == 60  # 5 % of 1,200 exactly
    assert sum(summary_json["mix"].values()) == 1_200
    assert summary_json["target_rate"] == 20_000 and summary_json["errors"] == 0
    assert len(udp_sink.sources) == 3


@pytest.mark.parametrize(
    ("formats", "prefix"), [("a", b"/qseow-proxy-"), ("b", b"/proxy-user-event/")]
)
def test_cli_formats(
    udp_sink: UdpSink, capsys: pytest.CaptureFixture[str], formats: str, prefix: bytes
) -> None:
    code, _, _ = run_cli(
        capsys,
        "--port",
        str(udp_sink.port),
        "--count",
        "300",
        "--rate",
        "20000",
        "--formats",
        formats,
        "--json",
        "--no-progress",
    )
    received = udp_sink.wait_for(300)
    assert code == 0 and len(received) == 300
    assert all(d.startswith(prefix) for d in received)


def test_cli_duration(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        code, out, _ = run_cli(
            capsys,
            "--port",
            str(target.getsockname()[1]),
            "--duration",
            "0.3",
            "--rate",
            "1000",
            "--json",
            "--no-progress",
        )
    result = json.loads(out)
    assert code == 0
    assert 0 < result["sent"] <= 300 + BURST
    assert result["seconds"] >= 0.3


def test_cli_text_summary_and_progress(
    udp_sink: UdpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "--port", str(udp_sink.port), "--count", "600", "--rate", "1500", "--progress"
    )
    assert code == 0
    assert out.startswith("sent 600 datagrams in ")
    assert "(target 1,500/s)" in out and "mix: " in out
    frames = [f for f in err.split("\r") if f.strip()]
    assert len(frames) >= 2  # a live bar (every 0.25 s), then the final one
    assert frames[-1].startswith("[" + "#" * 30 + "] 100.0% 600/600")
    assert "/s (target 1,500/s)" in frames[-1]
    assert err.endswith("\n")


def test_progress_bar_without_count() -> None:
    stream = io.StringIO()
    ProgressBar(stream)(SendReport(sent=12_345, seconds=0.5, target_rate=0), None)
    assert stream.getvalue() == "\r12,345 sent  24,690/s   "
