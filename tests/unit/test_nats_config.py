"""`senseflow.nats` (issue 16): defaults, one clear line per mistake, secrets kept out."""

from __future__ import annotations

from typing import Any

import pytest

from shared.config import ConfigError, config_from_document, redact


def problems_of(nats: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_document({"senseflow": {"nats": nats}}, {})
    return caught.value.problems


def test_defaults() -> None:
    nats = config_from_document({}, {}).pipeline.nats
    assert not nats.enable
    assert nats.servers == ["nats://127.0.0.1:4222"]
    assert (nats.stream, nats.subject_prefix) == ("QLIKSENSE_USER_EVENTS", "qliksense.userevent")
    assert (nats.replicas, nats.max_pending, nats.duplicate_window) == (1, 10_000, 120.0)


def test_every_mistake_is_one_line() -> None:
    assert problems_of(
        {
            "enable": True,
            "servers": ["http://nats:4222", "nats://ok:4222"],
            "subjectPrefix": "qlik sense.*",
            "stream": "A.B",
            "replicas": 7,
            "maxPending": 0,
            "ackTimeout": 0,
            "user": "u",
            "token": "secret-token",
        }
    ) == [
        "senseflow.nats.maxPending: expected an integer >= 1, found 0",
        "senseflow.nats.replicas: expected an integer 1-5, found 7",
        "senseflow.nats.ackTimeout: expected a number > 0, found 0",
        "senseflow.nats.servers[0]: expected nats://host:port or tls://host:port, "
        "found 'http://nats:4222'",
        "senseflow.nats.subjectPrefix: expected dot-separated tokens without spaces, * or >, "
        "found 'qlik sense.*'",
        "senseflow.nats.stream: expected a stream name of letters, digits, _ and -, found 'A.B'",
        "senseflow.nats.token: expected one of user/password, token or credsFile",
    ]


def test_unknown_key_and_a_numeric_secret() -> None:
    problems = problems_of({"sever": "x", "password": 31415926})
    assert problems[0].startswith("senseflow.nats.sever: unknown key (expected one of ")
    assert problems[1:] == ["senseflow.nats.password: expected a string, found integer"]
    assert "31415926" not in "".join(problems)


def test_secrets_from_the_environment_are_redacted() -> None:
    document = {"senseflow": {"nats": {"password": "${NATS_PW}", "token": "${NATS_TOKEN}"}}}
    config = config_from_document(document, {"NATS_PW": "pw-nats", "NATS_TOKEN": "tok-nats"})
    assert config.pipeline.nats.password == "pw-nats"
    assert redact("login pw-nats tok-nats", config) == "login *** ***"
