"""Live session state (SPEC 3a): the rules, checked against a plain reference model."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ConfigError, config_from_document
from shared.events import UserEvent
from shared.sessions import (
    CLOSE,
    EXPIRED,
    IMPLICIT_START,
    OPEN,
    START,
    STOP,
    UNMATCHED_CLOSE,
    UNMATCHED_STOP,
    SessionEvent,
    SessionState,
    session_event,
)
from tests.unit.sessions_reference import ReferenceState

MAX_IDLE = 1000
LATER = [0, 1, 999, 1000, 1001]  # snapshot this long after the last event
SWEEP = 300  # ns of event time between sweeps of idle users
APP_A = "3a64c6ff-94b3-4d4b-9b4e-8a6a8b6f1a11"
APP_B = "5c3e1f0a-1111-4a2b-9c3d-0123456789ab"

events = st.builds(
    SessionEvent,
    time_ns=st.sampled_from([-3, 0, 1, 200, 500, 999, 1000, 1001]),  # a step; some go back
    action=st.integers(min_value=START, max_value=CLOSE),
    host=st.sampled_from(["SENSE1", "sense1", "SENSE2"]),
    user_directory=st.sampled_from(["LAB", "lab"]),
    user_id=st.sampled_from(["anna", "Anna", "bob", "carl"]),
    app_id=st.sampled_from(["", APP_A, APP_B]),
    app_name=st.sampled_from(["", "Sales", "Ops"]),
    browser_name=st.sampled_from(["", "Chrome", "Firefox"]),
    browser_major=st.sampled_from(["", "119"]),
    os_name=st.sampled_from(["", "Windows", "Mac OS X"]),
    os_version=st.sampled_from(["", "10"]),
)
filters = st.tuples(
    st.sampled_from([None, "sense1", "SENSE2", "nohost"]),
    st.sampled_from([None, "ANNA", "lab\\bob", "nobody"]),
    st.sampled_from([None, APP_A.upper(), "sales", "none"]),
)


def timed(steps: list[SessionEvent]) -> list[SessionEvent]:
    """Steps to absolute times, starting at 1 s."""
    now = 1_000_000_000
    out = []
    for step in steps:
        now += step.time_ns
        out.append(SessionEvent(now, *(getattr(step, f) for f in step.__struct_fields__[1:])))
    return out


def compared(state: SessionState, reference: ReferenceState, at: int, *where: str | None) -> None:
    assert state.snapshot(at, *where) == reference.snapshot(at, *where)
    assert state.counters == reference.counters


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(events, max_size=120),
    st.integers(0, 120),
    filters,
    st.sampled_from([0, 1, 999, 1000, 1001]),
)
def test_state_equals_reference_model(
    steps: list[SessionEvent], split: int, where: tuple[str | None, ...], later: int
) -> None:
    state, reference = SessionState(MAX_IDLE, SWEEP), ReferenceState(MAX_IDLE)
    sequence = timed(steps)
    for index, event in enumerate(sequence):
        if index == split:  # a checkpoint and restore in the middle changes nothing
            state = SessionState.restore(state.checkpoint(), sweep_every_ns=SWEEP)
        state.apply(event)
        reference.apply(event)
        if index % 17 == 0:
            compared(state, reference, reference.clock)
    at = max(reference.clock, 1_000_000_000) + later
    compared(state, reference, at, *where)
    compared(state, reference, at)


def event(time_s: float, action: int, user: str = "anna", **more: str) -> SessionEvent:
    host = more.pop("host", "SENSE1")
    return SessionEvent(int(time_s * 1e9), action, host, "LAB", user, **more)


def test_rules_on_a_story() -> None:
    state = SessionState(max_idle_ns=3600 * 10**9)
    state.apply(
        event(
            0, START, browser_name="Chrome", browser_major="119", os_name="Windows", os_version="10"
        )
    )
    state.apply(event(1, OPEN, app_id=APP_A, app_name="Sales"))
    state.apply(event(2, OPEN, "BOB", app_id=APP_A, host="SENSE2"))  # implicit start
    state.apply(event(3, START, "Anna", host="SENSE2"))  # same user, other host
    state.apply(event(4, CLOSE, "bob", app_id=APP_B, host="SENSE2"))  # unmatched
    state.apply(event(5, STOP, "carl"))  # unmatched
    doc = state.snapshot(10 * 10**9)
    assert doc["totals"] == {"sessions": 3, "users": 2, "connections": 2}
    first = doc["hosts"][0]
    assert first["host"] == "SENSE1"
    assert first["active"][0] == {
        "userDirectory": "LAB",
        "userId": "anna",
        "sessions": 1,
        "since": "1970-01-01T00:00:00.000Z",
        "lastSeen": "1970-01-01T00:00:01.000Z",
        "browser": "Chrome 119",
        "os": "Windows 10",
        "apps": [
            {
                "appId": APP_A,
                "appName": "Sales",
                "connections": 1,
                "since": "1970-01-01T00:00:01.000Z",
            }
        ],
    }
    assert [u["userId"] for u in doc["hosts"][1]["active"]] == ["Anna", "BOB"]
    assert state.counters == {
        UNMATCHED_STOP: 1,
        UNMATCHED_CLOSE: 1,
        IMPLICIT_START: 1,
        EXPIRED: 0,
    }
    state.apply(event(20, STOP, "ANNA"))  # closes anna's connection on SENSE1 too
    assert [h["host"] for h in state.snapshot(20 * 10**9)["hosts"]] == ["SENSE2"]
    assert state.snapshot(4000 * 10**9)["hosts"] == []
    assert state.counters[EXPIRED] == 2
    json.dumps(doc)


def test_session_event_from_an_enriched_event() -> None:
    user_event = UserEvent(
        "qseow-proxy-connection", "SENSE1", "Open connection", "LAB", "anna", "AppAccess",
        f"/app/{APP_A}", "msg", 7, APP_A, "Sales", "Chrome", "119", "Windows", "10",
    )  # fmt: skip
    assert session_event(user_event, OPEN) == SessionEvent(
        7, OPEN, "SENSE1", "LAB", "anna", APP_A, "Sales", "Chrome", "119", "Windows", "10"
    )


def test_memory_per_session_is_bounded() -> None:
    """100,000 sessions, each with a connection, must fit well under 200 MB (measured: about
    64 MiB, benchmarks/sessions.py); this checks the layout did not grow past 1 KB each."""
    from benchmarks.sessions import memory

    per_session, per_connection, _ = memory(10_000)
    assert per_session + per_connection < 1000


def test_sessions_config_defaults_keys_and_mistakes() -> None:
    defaults = config_from_document({}, {}).pipeline.sessions
    assert (defaults.enable, defaults.max_idle, defaults.snapshot_interval) == (True, 86400, 30)
    assert (defaults.virtual_proxy, defaults.mqtt_topic) == ("events", "")
    given_doc = {"maxIdle": 600, "snapshotInterval": 5, "virtualProxy": "hub", "mqttTopic": "s"}
    sessions = config_from_document({"senseflow": {"sessions": given_doc}}, {}).pipeline.sessions
    assert (sessions.max_idle, sessions.snapshot_interval) == (600, 5)
    assert (sessions.virtual_proxy, sessions.mqtt_topic) == ("hub", "s")
    with pytest.raises(ConfigError) as caught:
        config_from_document({"senseflow": {"sessions": {"maxIdel": 5, "snapshotInterval": 0}}}, {})
    assert caught.value.problems[0].startswith("senseflow.sessions.maxIdel: unknown key")
    with pytest.raises(ConfigError) as caught:
        config_from_document({"senseflow": {"sessions": {"snapshotInterval": 0}}}, {})
    assert caught.value.problems == [
        "senseflow.sessions.snapshotInterval: expected seconds >= 1, found 0"
    ]


def test_user_key_cache_stays_bounded_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.sessions as sessions

    monkeypatch.setattr(sessions, "_KEYS", {})
    monkeypatch.setattr(sessions, "_KEYS_MAX", 4)
    state = SessionState(max_idle_ns=3600 * 10**9)
    for i in range(10):  # the same ids in two directories: one key each, case folded
        for directory in ("LAB", "lab", "CORP"):
            state.apply(SessionEvent(i, START, "SENSE1", directory, f"User{i}"))
            assert len(sessions._KEYS) <= 4
    assert set(state.hosts["SENSE1"]) == {
        sessions.user_key(d, f"user{i}") for i in range(10) for d in ("lab", "corp")
    }
    assert state.totals() == (30, 20, 0)


def test_a_run_applied_at_once_equals_one_by_one() -> None:
    """`apply_all` (the writer's reorder buffer hands runs over) and `apply` agree, ends too."""
    actions = [START, OPEN, OPEN, CLOSE, CLOSE, STOP]
    run = [
        SessionEvent(i * 7, actions[i * 5 % 6], f"S{i % 2}", "LAB", f"u{i * 3 % 5}", f"a{i % 3}")
        for i in range(300)
    ]
    at_once, one_by_one = SessionState(500, 100), SessionState(500, 100)
    at_once.apply_all(run)
    for event in run:
        one_by_one.apply(event)
    assert at_once.checkpoint() == one_by_one.checkpoint()
    assert at_once.ended_seq > 20
