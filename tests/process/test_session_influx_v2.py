"""Session snapshots and ends to InfluxDB 2.x and 3.x (a recording stand-in: they cannot run
here): the v2 write API, the token, and Butler SOS's integer types per version."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from senseflow.sessions import LiveSessionsReader
from senseflow.sessionsinflux import SessionSnapshots
from shared.sessionlive import encode_live, write_atomically
from shared.sessions import CLOSE, OPEN, START, SessionEvent, SessionState
from tests.process.test_influx_sink import CONFIGS, StandIn, StandInServer


@pytest.fixture
def recorder() -> Iterator[StandIn]:
    recorder = StandIn()
    server = StandInServer(recorder)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(("version", "integer"), [(2, "u"), (3, "i")])
def test_snapshots_and_ends_go_to_the_v2_write_api_with_butler_sos_types(
    recorder: StandIn, tmp_path: Path, version: int, integer: str
) -> None:
    config = CONFIGS[version](recorder.port)
    config = msgspec.structs.replace(
        config,
        pipeline=msgspec.structs.replace(
            config.pipeline,
            spool=msgspec.structs.replace(config.pipeline.spool, directory=str(tmp_path)),
        ),
    )
    now = time.time_ns()
    state = SessionState(86_400 * 10**9)
    for i, (action, app) in enumerate([(START, ""), (START, ""), (OPEN, "a1"), (CLOSE, "a1")]):
        state.apply(SessionEvent(now - 10**9 + i, action, "SENSE1", "LAB", "ann", app))
    reader = LiveSessionsReader.of(config)
    write_atomically(reader.path, encode_live(state, [], now))

    exporter = SessionSnapshots(config, reader)
    exporter.write()
    exporter.write_ended()

    writes = recorder.writes()
    assert [(w.method, w.path) for w in writes] == [("POST", "/api/v2/write")] * 2
    token = config.butler.influxdb_config
    expected_token = token.v2_config.token if version == 2 else token.v3_config.token
    assert all(w.headers["Authorization"] == f"Token {expected_token}" for w in writes)
    snapshot = writes[0].body.decode().splitlines()
    assert snapshot[0].startswith("user_session_summary,host=SENSE1,user_session_host=SENSE1,")
    assert f"session_count=2{integer}," in snapshot[0]
    assert f"session_count=2{integer}," in snapshot[1]
    assert snapshot[2].startswith("user_session_details,")
    (ended,) = writes[1].body.decode().splitlines()
    assert ended.startswith("user_connection_ended,host=SENSE1,user=LAB\\ann,app=a1,")
    assert "connections=1i" in ended and ended.endswith(f" {now - 10**9 + 3}")
