"""`senseflow send --sessions`: the simulation's ground truth is what the service's own
parsing and rules make of the datagrams it sends, and it is deterministic."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from senseflow.commands.sessionsim import Simulation, send_sessions
from shared.config import config_from_document
from shared.events import ACTIONS, UserEvent
from shared.sessions import SessionState, session_event
from workers.pipeline import EventPipeline


def without_client(document: Any) -> Any:
    if isinstance(document, dict):
        return {k: without_client(v) for k, v in document.items() if k not in ("browser", "os")}
    if isinstance(document, list):
        return [without_client(item) for item in document]
    return document


def test_the_truth_is_what_the_service_derives_from_the_datagrams() -> None:
    simulation = Simulation(users=40, seed=7)
    sent = list(simulation.datagrams(4000))
    pipeline = EventPipeline(config_from_document({}, {}), {})  # no app names, as in e2e
    derived = SessionState(86_400 * 10**9)
    for index, (_, data) in enumerate(sent):
        event = pipeline.event_or_reason(data, index)
        assert isinstance(event, UserEvent), event
        derived.apply(session_event(event, ACTIONS.index(event.command)))
    truth = simulation.truth
    assert without_client(derived.snapshot(4000)) == without_client(truth.snapshot(4000))
    assert derived.counters == truth.counters
    assert all(count for name, count in truth.counters.items() if name != "sessions.expired")
    assert [h for h, _ in sent] == [h for h, _ in Simulation(40, 7).datagrams(4000)]


def test_send_writes_a_truth_line_every_k_datagrams(tmp_path: Path) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    truth = tmp_path / "truth.jsonl"
    try:
        sent = send_sessions(receiver.getsockname(), Simulation(20, 3), 250, 0, 100, str(truth))
    finally:
        receiver.close()
    lines = [json.loads(line) for line in truth.read_text().splitlines()]
    assert sent == 250 and [line["sent"] for line in lines] == [100, 200, 250]
    assert set(lines[-1]) == {"sent", "at", "state", "counters"}
    again = Simulation(20, 3)
    list(again.datagrams(250))
    assert lines[-1]["state"]["totals"] == again.checkpoint(0)["state"]["totals"]
