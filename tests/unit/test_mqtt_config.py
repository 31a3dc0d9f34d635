"""MQTT settings a broker would refuse are config errors at load (exit 2, one line each).

Before, a topic with a wildcard, a NUL or nothing in it was accepted: mosquitto dropped
the connection on the first PUBLISH, the sink resent it, forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from senseflow.cli import main
from shared import exitcodes
from shared.config import ConfigError, config_from_document, redact, secrets

POST_TO = "Butler-SOS.userEvents.sendToMQTT.postTo"


def document(topics: dict[str, Any] | None = None, mqtt_enabled: bool = True, **mqtt: Any) -> Any:
    post_to = {key: {"topic": topic} for key, topic in (topics or {}).items()}
    return {
        "Butler-SOS": {
            "mqttConfig": {"enable": mqtt_enabled},
            "userEvents": {"sendToMQTT": {"enable": True, "postTo": post_to}},
        },
        "senseflow": {"mqtt": mqtt},
    }


def problems(doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as error:
        config_from_document(doc, {})
    return error.value.problems


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("qliksense/#", "a topic name without the wildcards + and #, found 'qliksense/#'"),
        (
            "qliksense/+/start",
            "a topic name without the wildcards + and #, found 'qliksense/+/start'",
        ),
        ("#", "a topic name without the wildcards + and #, found '#'"),
        ("a\x00b", "a topic name without the character U+0000, found 'a\\x00b'"),
        ("", "a topic name (or enable: false), found ''"),
    ],
)
def test_a_topic_a_broker_refuses_is_a_config_error(topic: str, expected: str) -> None:
    assert problems(document({"sessionStopTopic": topic})) == [
        f"{POST_TO}.sessionStopTopic.topic: expected {expected}"
    ]


def test_a_topic_of_more_than_65535_bytes_is_a_config_error() -> None:
    assert config_from_document(document({"everythingTopic": "é" * 32767}), {})  # 65534 bytes
    [line] = problems(document({"everythingTopic": "é" * 32768}))
    assert line.startswith(
        f"{POST_TO}.everythingTopic.topic: expected a topic name of at most 65535 bytes in "
        "UTF-8, found 'ééé"
    )


def test_every_bad_topic_gets_its_own_line() -> None:
    lines = problems(document({"everythingTopic": "a/#", "connectionOpenTopic": "+"}))
    assert [line.split(":")[0] for line in lines] == [
        f"{POST_TO}.everythingTopic.topic",
        f"{POST_TO}.connectionOpenTopic.topic",
    ]


def test_topics_are_not_checked_when_mqtt_or_the_topic_is_off() -> None:
    config_from_document(document({"everythingTopic": "a/#"}, mqtt_enabled=False), {})
    doc = document()
    doc["Butler-SOS"]["userEvents"]["sendToMQTT"]["postTo"] = {
        "everythingTopic": {"enable": False, "topic": ""}
    }
    config_from_document(doc, {})


@pytest.mark.parametrize("key", ["maxInflight", "maxPending"])
@pytest.mark.parametrize("value", [0, -5])
def test_windows_hold_at_least_one_message(key: str, value: int) -> None:
    doc = document()
    doc["senseflow"]["mqtt"][key] = value
    assert problems(doc) == [f"senseflow.mqtt.{key}: expected an integer >= 1, found {value}"]


def test_qos_is_0_1_or_2() -> None:
    assert problems(document(qos=3)) == [
        "senseflow.mqtt.qos: expected one of 0, 1, 2, found integer 3"
    ]


def test_the_tls_key_password_is_a_secret() -> None:
    doc = document(tls={"keyPassword": "${KEY_PW}"})
    config = config_from_document(doc, {"KEY_PW": "hunter2-key"})
    assert config.pipeline.mqtt.tls.key_password == "hunter2-key"
    assert "hunter2-key" in secrets(config)
    assert redact("decrypt hunter2-key failed", config) == "decrypt *** failed"
    [line] = problems(document(tls={"keyPassword": 12345}))
    assert line == "senseflow.mqtt.tls.keyPassword: expected a string, found integer"


def test_check_config_exits_2_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    doc = document({"everythingTopic": "all/#", "sessionStartTopic": ""}, maxInflight=0)
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert main(["check-config", str(path)]) == exitcodes.CONFIG_ERROR == 2
    assert capsys.readouterr().out.splitlines() == [
        "config: FAILED: senseflow.mqtt.maxInflight: expected an integer >= 1, found 0",
        f"config: FAILED: {POST_TO}.everythingTopic.topic: expected a topic name without the "
        "wildcards + and #, found 'all/#'",
        f"config: FAILED: {POST_TO}.sessionStartTopic.topic: expected a topic name "
        "(or enable: false), found ''",
    ]
