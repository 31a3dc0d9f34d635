"""One record per destination (issue 11): the registry is what the worker, the writer and
`check-config` read, so "is this destination enabled" is decided in one place."""

from __future__ import annotations

from typing import Any

import pytest

from senseflow.commands.tools import check_destinations
from shared.config import Config, config_from_document
from workers.encode import EventEncoder
from workers.pipeline import EventPipeline
from workers.writer.destinations import DESTINATIONS, destination_names

SWITCHES = {
    "influxdb": ("influxdbConfig", "sendToInfluxdb"),
    "mqtt": ("mqttConfig", "sendToMQTT"),
    "newrelic": ("newRelic", "sendToNewRelic"),
}


def config_with(enabled: set[str]) -> Config:
    butler: dict[str, Any] = {"userEvents": {}}
    for name, (section, switch) in SWITCHES.items():
        butler[section] = {"enable": name in enabled}
        butler["userEvents"][switch] = {"enable": name in enabled}
    butler["userEvents"]["sendToNewRelic"]["destinationAccount"] = ["nr"]
    account = {"accountName": "nr", "accountId": "1", "insertApiKey": "key"}
    butler["thirdPartyToolsCredentials"] = {"newRelic": [account]}
    own = {"nats": {"enable": "nats" in enabled}}
    return config_from_document({"Butler-SOS": butler, "senseflow": own}, {})


NAMES = [*SWITCHES, "nats"]  # NATS is switched in our own section
ENCODED_FOR = {"influxdb": "line", "mqtt": "mqtt", "newrelic": "newrelic", "nats": "mqtt"}


def test_every_record_names_a_real_encoder_and_a_sink_of_its_name() -> None:
    assert [d.name for d in DESTINATIONS] == NAMES  # unique, in start order
    for destination in DESTINATIONS:
        assert callable(getattr(EventEncoder, destination.encoder))
        assert getattr(destination.sink(), "name", None) == destination.name


@pytest.mark.parametrize(
    "enabled", [set(), {"influxdb"}, {"mqtt", "newrelic"}, {"nats"}, {"mqtt", "nats"}, set(NAMES)]
)
def test_worker_writer_and_check_config_follow_the_records(enabled: set[str]) -> None:
    config = config_with(enabled)
    assert set(destination_names(config)) == enabled  # the writer's sinks and spool cursors
    pipeline = EventPipeline(config)
    encoders = dict(zip(("line", "mqtt", "newrelic"), pipeline.encoders, strict=True))
    wanted = {ENCODED_FOR[name] for name in enabled}  # NATS publishes the MQTT payloads
    assert {name for name, encoder in encoders.items() if encoder is not None} == wanted
    if not enabled:
        results = check_destinations(config, timeout=1.0)
        assert results == [(name, True, "disabled") for name in NAMES]
