"""Session snapshot lines (senseflow/sessionsinflux.py): Butler SOS's measurement, tag and
field names, its field types per InfluxDB version, and zeros for a host that emptied."""

from __future__ import annotations

from typing import Any

from senseflow.sessionsinflux import SnapshotLines, chunks, ended_lines, session_id
from shared.config import config_from_document
from shared.sessions import CLOSE, OPEN, START, STOP, Ended, SessionEvent, SessionState

AT = 1_800_000_000 * 10**9


def lines_of(version: int, state: SessionState, snapshot: SnapshotLines | None = None) -> list[str]:
    snapshot = snapshot or SnapshotLines(config(version))
    return snapshot.lines(state.hosts, AT).decode().splitlines()


def config(version: int) -> Any:
    butler = {
        "influxdbConfig": {"version": version},
        "userEvents": {"tags": [{"name": "env", "value": "prod"}]},
    }
    own = {"sessions": {"virtualProxy": "hdr"}}
    return config_from_document({"Butler-SOS": butler, "senseflow": own}, {})


def state_with(*events: tuple[int, str, str]) -> SessionState:
    state = SessionState(86_400 * 10**9)
    for i, (action, host, user) in enumerate(events):
        state.apply(
            SessionEvent(
                AT - 10**9 + i, action, host, "LAB", user, "app-1" if action == OPEN else ""
            )
        )
    return state


def test_butler_sos_names_and_integer_types_per_version() -> None:
    state = state_with((START, "SENSE1", "ann"), (START, "SENSE1", "ann"), (OPEN, "SENSE1", "bob"))
    tags = (
        "host=SENSE1,user_session_host=SENSE1,user_session_virtual_proxy=hdr,"
        "source=user_events,env=prod"
    )
    listed = 'session_user_id_list="LAB\\\\ann,LAB\\\\bob"'
    ann = state.hosts["SENSE1"][next(iter(state.hosts["SENSE1"]))]
    ann_id = session_id("SENSE1", ann)
    assert lines_of(1, state)[:3] == [
        f"user_session_summary,{tags} session_count=3.0,{listed} {AT}",
        f"user_session_list,{tags} {listed} {AT}",
        f"user_session_details,{tags},user_session_id={ann_id},user_session_user_directory=LAB,"
        f'user_session_user_id=ann session_id="{ann_id}",user_directory="LAB",user_id="ann" {AT}',
    ]
    assert len(lines_of(1, state)) == 4  # bob's details too
    assert lines_of(2, state)[0] == f"user_session_summary,{tags} session_count=3u,{listed} {AT}"
    assert lines_of(2, state)[1] == f"user_session_list,{tags} session_count=3u,{listed} {AT}"
    assert lines_of(3, state)[0] == f"user_session_summary,{tags} session_count=3i,{listed} {AT}"


def test_a_host_whose_users_left_is_written_as_zero() -> None:
    snapshot = SnapshotLines(config(1))
    state = state_with((START, "SENSE1", "ann"), (START, "SENSE2", "bob"))
    assert len(lines_of(1, state, snapshot)) == 6
    state.apply(SessionEvent(AT, STOP, "SENSE2", "LAB", "bob"))
    lines = lines_of(1, state, snapshot)
    assert "user_session_summary,host=SENSE2," in lines[3]
    assert 'session_count=0.0,session_user_id_list=""' in lines[3]
    assert len(lines) == 5


def test_the_session_id_stays_while_the_user_stays_on() -> None:
    state = state_with((START, "SENSE1", "ann"))
    (entry,) = state.hosts["SENSE1"].values()
    first = session_id("SENSE1", entry)
    state.apply(SessionEvent(AT, OPEN, "SENSE1", "LAB", "ann", "app-1"))
    assert session_id("SENSE1", entry) == first
    state.apply(SessionEvent(AT + 1, STOP, "SENSE1", "LAB", "ann"))
    state.apply(SessionEvent(AT + 2, START, "SENSE1", "LAB", "ann"))
    (again,) = state.hosts["SENSE1"].values()
    assert session_id("SENSE1", again) != first


def test_ends_are_recorded_numbered_kept_in_the_checkpoint_and_written_at_their_time() -> None:
    state = SessionState(3600 * 10**9)
    s = 10**9
    for at, action, user, app in [
        (0, START, "ann", ""),
        (1, OPEN, "ann", "app-1"),
        (2, OPEN, "ann", "app-1"),
        (3, OPEN, "ann", "app-2"),
        (5, CLOSE, "ann", "app-2"),  # one connection closed: open 2 s
        (9, STOP, "ann", ""),  # the session ends, and app-1's two connections with it
        (10, START, "bob", ""),
        (5000, START, "cid", ""),  # bob expired: his session ends at his last event
    ]:
        state.apply(SessionEvent(AT + at * s, action, "S1", "LAB", user, app, app.upper()))
    expected = [
        Ended(0, AT + 5 * s, AT + 3 * s, "S1", "LAB", "ann", "app-2", "APP-2", 1),
        Ended(1, AT + 9 * s, AT + 1 * s, "S1", "LAB", "ann", "app-1", "APP-1", 2),
        Ended(2, AT + 9 * s, AT, "S1", "LAB", "ann"),
        Ended(3, AT + 10 * s, AT + 10 * s, "S1", "LAB", "bob"),
    ]
    assert state.ended == expected
    restored = SessionState.restore(state.checkpoint())
    assert (restored.ended, restored.ended_seq) == (expected, 4)
    lines = ended_lines(expected[1:3], [("env", "prod")], integers=False).decode().splitlines()
    assert lines == [
        "user_connection_ended,host=S1,user=LAB\\ann,app=app-1,source=user_events,env=prod "
        f'duration_seconds=8.0,connections=2.0,app_name="APP-1" {AT + 9 * s}',
        "user_session_ended,host=S1,user=LAB\\ann,source=user_events,env=prod "
        f"duration_seconds=9.0 {AT + 9 * s}",
    ]


def test_a_large_snapshot_is_posted_in_chunks_of_whole_lines() -> None:
    body = b"".join(b"m f=%d %d\n" % (i, i) for i in range(12))
    assert b"".join(chunks(body, 5)) == body
    assert [len(c.splitlines()) for c in chunks(body, 5)] == [5, 5, 2]
    assert chunks(b"", 5) == []


def test_a_snapshot_after_a_new_session_names_the_new_session_and_forgets_the_old() -> None:
    snapshot = SnapshotLines(config(1))
    state = state_with((START, "SENSE1", "ann"), (START, "SENSE1", "bob"))
    (ann,) = [e for e in state.hosts["SENSE1"].values() if e.user_id == "ann"]
    old_id = session_id("SENSE1", ann)
    assert any(old_id in line for line in lines_of(1, state, snapshot))
    state.apply(SessionEvent(AT + 1, STOP, "SENSE1", "LAB", "ann"))
    state.apply(SessionEvent(AT + 2, START, "SENSE1", "LAB", "ann"))
    (ann,) = [e for e in state.hosts["SENSE1"].values() if e.user_id == "ann"]
    new_id = session_id("SENSE1", ann)
    details = [line for line in lines_of(1, state, snapshot) if "user_session_details" in line]
    assert new_id != old_id and len(details) == 2
    assert any(f'session_id="{new_id}"' in line for line in details)
    assert not any(old_id in line for line in details)
    assert lines_of(1, state, snapshot) == lines_of(1, state)  # remembered == built afresh
    assert len(snapshot.detail_text) == 2  # only the sessions on now are remembered
