"""Live sessions out of the service (issue 13): `/api/sessions`, InfluxDB snapshots in Butler
SOS's measurements (and its dashboard query), retained MQTT summaries for a late
subscriber, and `who --at` a past moment, all against the ground truth of a simulation
sent at a few thousand events/s to a service with two workers (real influxd, mosquitto).

One reader, one source socket: receive order is sending order, so the ground truth (the
same events applied in sending order) is well defined. A quiet gap separates the halves.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from senseflow.commands.who import sessions_at
from shared.config import load_config
from shared.sessions import SessionState
from tests.e2e.harness import SENSEFLOW, PacedSender, Service, Subscriber
from tests.e2e.test_sessions import HOSTS, ends_written, simulation, wait_until, without_times
from tests.localservers import InfluxServer, MosquittoServer, free_ports

pytestmark = pytest.mark.slow

StartService = Callable[..., Service]
HALF = 3000


def api_sessions(port: int, query: str = "") -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/sessions{query}", timeout=10) as r:
        answer: dict[str, Any] = json.loads(r.read())
    return answer


def expected(truth: SessionState) -> Any:
    return without_times(truth.snapshot(truth.clock_ns + 1))


def send(service: Service, datagrams: list[bytes], total: int) -> None:
    PacedSender(service.udp_port, datagrams, rate=3000, sources=1).run()  # type: ignore[attr-defined]
    service.wait_counter("written.influxdb", total)


def last_snapshot(influx: InfluxServer, database: str) -> dict[str, tuple[float, str]]:
    answer = influx.query(
        'SELECT last("session_count"), last("session_user_id_list") FROM "user_session_summary"'
        ' WHERE "source" = \'user_events\' GROUP BY "host"',
        db=database,
    )
    return {
        s["tags"]["host"]: (s["values"][0][1], s["values"][0][2])
        for s in answer["results"][0].get("series", [])
    }


def truth_summary(truth: SessionState) -> dict[str, tuple[float, str]]:
    summary = {}
    for host in HOSTS:
        users = sorted(truth.hosts.get(host, {}).values(), key=lambda e: e.user_id.casefold())
        listed = ",".join(f"{e.directory}\\{e.user_id}" for e in users)
        summary[host] = (float(sum(e.sessions for e in users)), listed)
    return summary


def retained_summaries(broker: MosquittoServer, path: Path) -> dict[str, tuple[float, str]]:
    """What a subscriber arriving now gets on the per-host summary topics, as
    `truth_summary` shows it."""
    late = Subscriber(broker, "qliksense/userevent/#", path)
    try:
        messages = late.messages()
    finally:
        late.stop()
    retained = {}
    # The session's broker is shared: only our hosts count. Other tests' hosts may hold
    # spaces (the fuzz test's do), which `mosquitto_sub -v` prints unquoted: such a line
    # splits inside its topic, and its "payload" is no JSON object.
    for topic, payload in messages:
        host = topic.removeprefix("qliksense/userevent/sessions/")
        if host in HOSTS and payload.startswith("{"):
            got = json.loads(payload)
            retained[host] = (float(got["sessions"]), ",".join(got["userList"]))
    return retained


def test_sessions_reach_http_influxdb_mqtt_and_who(
    start_service: StartService,
    influx_server: InfluxServer,
    influx_db: str,
    mosquitto_server: MosquittoServer,
    tmp_path: Path,
) -> None:
    datagrams, truth = simulation(2 * HALF, seed=31)
    _, half_truth = simulation(HALF, seed=31)  # the same first half
    (port,) = free_ports()
    running = start_service(workers=2, httpPort=port, sessions={"snapshotInterval": 1})

    send(running, datagrams[:HALF], HALF)
    wait_until(lambda: without_times(api_sessions(port)) == expected(half_truth), "first half")
    time.sleep(1.1)  # the quiet gap: `past` lies after the first half, before the second
    past = time.time_ns()
    time.sleep(1.1)

    send(running, datagrams[HALF:], 2 * HALF)
    wait_until(lambda: without_times(api_sessions(port)) == expected(truth), "the whole run")
    stable = time.time_ns()
    shown = api_sessions(port, "?host=sense2&app=" + "5c3e1f0a-1111-4a2b-9c3d-0123456789ab")
    assert without_times(shown) == without_times(
        truth.snapshot(truth.clock_ns + 1, "sense2", None, "5c3e1f0a-1111-4a2b-9c3d-0123456789ab")
    )

    summary = truth_summary(truth)
    wait_until(lambda: last_snapshot(influx_server, influx_db) == summary, "the last snapshot")
    wait_until(lambda: time.time_ns() > stable + 1_500_000_000, "a snapshot after `stable`")
    dashboard = influx_server.query(  # Butler SOS's panel, $timeFilter and $interval filled in
        f'SELECT mean("session_count") FROM "user_session_summary" WHERE time >= {stable}'
        ' GROUP BY time(1h), "host" fill(none)',
        db=influx_db,
    )
    means = {
        s["tags"]["host"]: [v[1] for v in s["values"]] for s in dashboard["results"][0]["series"]
    }
    assert means == {host: [count] for host, (count, _) in summary.items()}
    details = influx_server.query(
        'SELECT "user_directory", "user_id" FROM "user_session_details"'
        f' WHERE time >= {stable} GROUP BY "host"',
        db=influx_db,
    )
    for series in details["results"][0]["series"]:
        users = {f"{v[1]}\\{v[2]}" for v in series["values"]}
        assert users == set(summary[series["tags"]["host"]][1].split(","))

    # Summaries are checked every sessionsmqtt.CHECK_SECONDS: a late subscriber sees the
    # final state once the last check after the run published it.
    wait_until(
        lambda: retained_summaries(mosquitto_server, tmp_path / "late.txt") == summary,
        "the retained MQTT summaries",
    )

    ends_written(influx_server, influx_db, truth)
    config = load_config(next(Path(running.log_path).parent.glob("config-0.yaml")))
    assert without_times(sessions_at(config, past, None, None, None)) == expected(half_truth)
    assert running.terminate() == 0


def test_send_session_mode_ground_truth_is_what_the_service_serves(
    start_service: StartService, tmp_path: Path
) -> None:
    """`senseflow send --sessions N --truth FILE` at a few thousand events/s, two workers."""
    (port,) = free_ports()
    running = start_service(mqtt=False, workers=2, httpPort=port)
    truth_file = tmp_path / "truth.jsonl"
    command = [*SENSEFLOW, "send", "--port", str(running.udp_port), "--sessions", "60"]  # type: ignore[attr-defined]
    options = ["--count", "5000", "--rate", "3000", "--truth", str(truth_file)]
    subprocess.run([*command, *options], check=True, timeout=60, capture_output=True)
    running.wait_counter("written.influxdb", 5000)
    checkpoints = [json.loads(line) for line in truth_file.read_text().splitlines()]
    assert [c["sent"] for c in checkpoints] == [1000, 2000, 3000, 4000, 5000]
    final = checkpoints[-1]
    assert final["state"]["totals"]["users"] > 10 and final["counters"]["sessions.implicit_start"]
    wait_until(
        lambda: without_times(api_sessions(port)) == without_times(final["state"]),
        "/api/sessions equal to the truth of `senseflow send --sessions`",
    )
    assert running.terminate() == 0
