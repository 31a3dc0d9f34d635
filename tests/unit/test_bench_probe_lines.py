"""The InfluxDB latency probe times user events only: session snapshot and end lines carry
the snapshot's or the end's time, which would read as seconds of latency."""

from __future__ import annotations

from benchmarks.probes import _LINE_TIME


def test_only_user_event_lines_are_timed() -> None:
    body = (
        b'user_events,host=SENSE1,user_full=LAB\\ann message="a b 1" 1700000000000000001\n'
        b"user_session_ended,host=SENSE1 duration=12.0 1699999990000000000\n"
        b"user_connection_ended,host=SENSE1 duration=3.0 1699999991000000000\n"
        b"user_session_summary,host=SENSE1 session_count=1.0 1699999992000000000\n"
        b'user_events appName="x" 1700000000000000002\n'
    )
    assert [int(t) for t in _LINE_TIME.findall(body)] == [
        1700000000000000001,
        1700000000000000002,
    ]
