"""SPEC 2: a Butler SOS config file loads; every mistake is one clear line; secrets stay out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from senseflow.cli import main
from shared import exitcodes
from shared.config import (
    Config,
    ConfigError,
    Pipeline,
    config_from_document,
    load_config,
    redact,
    secrets,
)

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = Path(__file__).parent / "data" / "butler-sos-production.yaml"


def problems_of(document: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_document(document, env or {})
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def butler(**sections: Any) -> dict[str, Any]:
    return {"Butler-SOS": sections}


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- a real Butler SOS file ----------------------------------------------------------------


def test_production_template_loads() -> None:
    config = load_config(PRODUCTION, env={})
    user_events = config.butler.user_events
    assert user_events.enable is True
    assert [(u.directory, u.user_id) for u in user_events.exclude_user or []] == [
        ("LAB", "testuser1"),
        ("LAB", "testuser2"),
    ]
    udp = user_events.udp_server_config
    assert (udp.server_host, udp.port_user_activity_events) == ("0.0.0.0", 9997)
    assert (udp.message_queue.max_size, udp.rate_limit.max_messages_per_minute) == (200, 600)
    assert udp.max_message_size == 65507
    assert udp.allowed_sources == ["sense-server-01.mydomain.com"]
    assert [(t.name, t.value) for t in user_events.tags or []] == [("qs_env", "dev")]
    post_to = user_events.send_to_mqtt.post_to
    assert user_events.send_to_mqtt.enable is True
    assert post_to.everything_topic.topic == "qliksense/userevent"
    assert post_to.session_start_topic.topic == "qliksense/userevent/session/start"
    assert post_to.connection_open_topic.enable is False
    assert user_events.send_to_influxdb.enable is True
    assert user_events.send_to_new_relic.destination_account == ["First NR account"]
    assert user_events.send_to_new_relic.scramble is True

    influx = config.butler.influxdb_config
    assert (influx.enable, influx.host, influx.port, influx.version) == (
        True,
        "influxdb.lab.example.com",
        8086,
        2,
    )
    assert (influx.v2_config.org, influx.v2_config.bucket) == ("myorg", "mybucket")
    assert influx.v2_config.token == "v2-token-0123456789abcdef"
    assert influx.v1_config.retention_policy.name == "10d"
    assert influx.v3_config.database == "mydatabase"
    mqtt = config.butler.mqtt_config
    assert (mqtt.enable, mqtt.broker_host, mqtt.broker_port) == (True, "mqtt.lab.example.com", 1883)
    new_relic = config.butler.new_relic
    assert new_relic.enable is True
    assert new_relic.event.url == "https://insights-collector.eu01.nr-data.net"
    assert new_relic.event.header is None
    assert [(a.name, a.value) for a in new_relic.event.attribute.static or []] == [
        ("qs_env", "dev"),
        ("service", "butler-sos"),
    ]
    accounts = config.butler.third_party_tools_credentials.new_relic or []
    assert [(a.account_name, a.account_id) for a in accounts] == [
        ("First NR account", "1234567"),
        ("Second NR account", "7654321"),
    ]
    # Butler SOS's own key spellings, and the Docker variant's empty passphrase
    assert config.butler.cert.client_cert_ca == "/nodeapp/config/certificate/root.pem"
    assert config.butler.cert.client_cert_passphrase is None
    assert config.butler.app_names.host_ip == "sense-server-01.mydomain.com"
    # no `senseflow` section: all our own settings are defaults
    assert config.pipeline == Config().pipeline


def test_unrelated_sections_and_keys_are_ignored() -> None:
    document = yaml.safe_load(PRODUCTION.read_text(encoding="utf-8"))
    butler_section = document["Butler-SOS"]
    for ignored in ("logEvents", "serversToMonitor", "uptimeMonitor", "prometheus", "heartbeat"):
        assert ignored in butler_section  # the fixture really has them
    butler_section["userEvents"]["someFutureKey"] = {"anything": [1, 2]}
    butler_section["influxdbConfig"]["includeFields"]["brandNew"] = "x"
    butler_section["logEvents"] = "not even a mapping"
    document["SomeOtherTool"] = {"port": "not checked"}
    config = config_from_document(document, {})
    assert config.butler.user_events.udp_server_config.port_user_activity_events == 9997


def test_empty_file_and_no_file_give_defaults(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    assert load_config(write(tmp_path, ""), env={}) == Config()
    assert load_config(write(tmp_path, "---\n# only a comment\n"), env={}) == Config()


def test_own_section(tmp_path: Path) -> None:
    text = PRODUCTION.read_text(encoding="utf-8") + (
        "senseflow:\n"
        "    workers: 4\n"
        "    batchSize: 2000\n"
        "    logFormat: json\n"
        "    appNamesFile: /etc/senseflow/apps.yaml\n"
        "    mqtt:\n"
        "        qos: 2\n"
        "        tls:\n"
        "            enable: true\n"
    )
    config = load_config(write(tmp_path, text), env={})
    assert (config.pipeline.workers, config.pipeline.batch_size) == (4, 2000)
    assert config.pipeline.log_format == "json"
    assert config.pipeline.app_names_file == "/etc/senseflow/apps.yaml"
    assert (config.pipeline.mqtt.qos, config.pipeline.mqtt.tls.enable) == (2, True)
    assert config.pipeline.readers == 1  # untouched keys keep their defaults


def test_numbers_and_booleans_written_as_strings_are_accepted() -> None:
    config = config_from_document(
        butler(
            influxdbConfig={"version": "3", "port": "8181"},
            userEvents={"enable": "false"},
        ),
        {},
    )
    assert (config.butler.influxdb_config.version, config.butler.influxdb_config.port) == (3, 8181)
    assert config.butler.user_events.enable is False


# -- one line per mistake: key path, expected, found ---------------------------------------


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        pytest.param(
            butler(userEvents={"udpServerConfig": {"portUserActivityEvents": "nine"}}),
            "Butler-SOS.userEvents.udpServerConfig.portUserActivityEvents: "
            "expected an integer, found string 'nine'",
            id="wrong type: integer",
        ),
        pytest.param(
            butler(userEvents={"enable": "maybe"}),
            "Butler-SOS.userEvents.enable: expected true or false, found string 'maybe'",
            id="wrong type: boolean",
        ),
        pytest.param(
            butler(userEvents=["enable"]),
            "Butler-SOS.userEvents: expected a mapping, found list",
            id="wrong type: mapping",
        ),
        pytest.param(
            butler(userEvents={"excludeUser": {"directory": "LAB"}}),
            "Butler-SOS.userEvents.excludeUser: expected a list, found mapping",
            id="wrong type: list",
        ),
        pytest.param(
            butler(userEvents={"tags": [{"name": "env", "value": ["a"]}]}),
            "Butler-SOS.userEvents.tags[0].value: expected a string, found list",
            id="wrong type: string in a list item",
        ),
        pytest.param(
            butler(influxdbConfig={"version": 4}),
            "Butler-SOS.influxdbConfig.version: expected one of 1, 2, 3, found integer 4",
            id="bad literal: InfluxDB version",
        ),
        pytest.param(
            {"senseflow": {"logLevel": "verbose"}},
            "senseflow.logLevel: expected one of 'debug', 'error', 'info', 'warning', "
            "found string 'verbose'",
            id="bad literal: log level",
        ),
        pytest.param(
            {"senseflow": {"mqtt": {"qos": 3}}},
            "senseflow.mqtt.qos: expected one of 0, 1, 2, found integer 3",
            id="bad literal: qos",
        ),
        pytest.param(
            butler(
                userEvents={
                    "excludeUser": [{"directory": "LAB", "userId": "a"}, {"directory": "LAB"}]
                }
            ),
            "Butler-SOS.userEvents.excludeUser[1].userId: expected a value, found nothing",
            id="missing required key in a list item",
        ),
        pytest.param(
            butler(
                thirdPartyToolsCredentials={"newRelic": [{"accountName": "A", "accountId": "1"}]}
            ),
            "Butler-SOS.thirdPartyToolsCredentials.newRelic[0].insertApiKey: "
            "expected a value, found nothing",
            id="missing insertApiKey",
        ),
        pytest.param(
            butler(userEvents={"sendToNewRelic": {"destinationAccount": [7]}}),
            "Butler-SOS.userEvents.sendToNewRelic.destinationAccount[0]: "
            "expected a string, found integer 7",
            id="wrong type in a list of strings",
        ),
        pytest.param(
            {"senseflow": {"wokers": 4}},
            "senseflow.wokers: unknown key (expected one of "
            + ", ".join(sorted(f.encode_name for f in msgspec.structs.fields(Pipeline)))
            + ")",
            id="unknown key in our own section",
        ),
        pytest.param(
            {"senseflow": {"mqtt": {"tls": {"cafile": "x"}}}},
            "senseflow.mqtt.tls.cafile: unknown key "
            "(expected one of caFile, certFile, enable, insecure, keyFile, keyPassword)",
            id="unknown key nested in our own section",
        ),
        pytest.param(
            {"senseflow": {"workers": 0}},
            "senseflow.workers: expected an integer >= 1, found 0",
            id="out of range: workers",
        ),
        pytest.param(
            {"senseflow": {"heartbeatTimeout": 0.5}},
            "senseflow.heartbeatTimeout: expected 0 (off) or at least 2 seconds, found 0.5",
            id="out of range: heartbeat timeout",
        ),
        pytest.param(
            butler(userEvents={"udpServerConfig": {"portUserActivityEvents": 99999}}),
            "Butler-SOS.userEvents.udpServerConfig.portUserActivityEvents: "
            "expected a port 0-65535, found 99999",
            id="out of range: port",
        ),
        pytest.param(
            butler(
                newRelic={"enable": True},
                userEvents={"sendToNewRelic": {"enable": True, "destinationAccount": ["Nope"]}},
                thirdPartyToolsCredentials={
                    "newRelic": [
                        {"accountName": "First", "insertApiKey": "k" * 8, "accountId": "1"}
                    ]
                },
            ),
            "Butler-SOS.userEvents.sendToNewRelic.destinationAccount: expected an accountName "
            "from thirdPartyToolsCredentials.newRelic, found 'Nope'",
            id="New Relic destination account not in credentials",
        ),
        pytest.param(
            butler(influxdbConfig={"v2Config": {"token": "${INFLUX_TOKEN}"}}),
            "Butler-SOS.influxdbConfig.v2Config.token: expected environment variable "
            "INFLUX_TOKEN to be set (or a default, as ${INFLUX_TOKEN:-value}), found it unset",
            id="missing environment variable",
        ),
        pytest.param(
            ["Butler-SOS"],
            "$: expected a mapping, found list",
            id="document is not a mapping",
        ),
    ],
)
def test_each_mistake_is_one_line(document: Any, problem: str) -> None:
    assert problems_of(document) == [problem]
    assert "\n" not in problem


def test_new_relic_accounts_only_checked_when_new_relic_is_used() -> None:
    send = {"sendToNewRelic": {"enable": True, "destinationAccount": ["Nope"]}}
    config_from_document(butler(newRelic={"enable": False}, userEvents=send), {})
    send["sendToNewRelic"]["enable"] = False
    config_from_document(butler(newRelic={"enable": True}, userEvents=send), {})


def test_several_mistakes_are_all_reported() -> None:
    document = {
        "Butler-SOS": {
            "userEvents": {
                "enable": "maybe",
                "excludeUser": [{"directory": "LAB"}, {"userId": "x"}],
                "udpServerConfig": {"portUserActivityEvents": "nine"},
            },
            "influxdbConfig": {"version": 5, "v3Config": {"token": "${NO_SUCH_TOKEN}"}},
        },
        "senseflow": {"wokers": 2, "logLevel": "loud"},
    }
    problems = problems_of(document)
    assert problems == [
        "Butler-SOS.influxdbConfig.v3Config.token: expected environment variable NO_SUCH_TOKEN "
        "to be set (or a default, as ${NO_SUCH_TOKEN:-value}), found it unset",
        "Butler-SOS.userEvents.enable: expected true or false, found string 'maybe'",
        "Butler-SOS.userEvents.excludeUser[0].userId: expected a value, found nothing",
        "Butler-SOS.userEvents.excludeUser[1].directory: expected a value, found nothing",
        "Butler-SOS.userEvents.udpServerConfig.portUserActivityEvents: "
        "expected an integer, found string 'nine'",
        "Butler-SOS.influxdbConfig.version: expected one of 1, 2, 3, found integer 5",
        problems[6],
        "senseflow.logLevel: expected one of 'debug', 'error', 'info', 'warning', "
        "found string 'loud'",
    ]
    assert problems[6].startswith("senseflow.wokers: unknown key (expected one of ")


def test_several_range_mistakes_are_all_reported() -> None:
    document = {
        "Butler-SOS": {
            "userEvents": {
                "udpServerConfig": {"portUserActivityEvents": -1},
                "sendToNewRelic": {"enable": True, "destinationAccount": ["A", "B"]},
            },
            "newRelic": {"enable": True},
        },
        "senseflow": {"workers": 0, "batchSize": -5},
    }
    assert problems_of(document) == [
        "senseflow.workers: expected an integer >= 1, found 0",
        "senseflow.batchSize: expected an integer >= 1, found -5",
        "Butler-SOS.userEvents.udpServerConfig.portUserActivityEvents: "
        "expected a port 0-65535, found -1",
        "Butler-SOS.userEvents.sendToNewRelic.destinationAccount: expected an accountName "
        "from thirdPartyToolsCredentials.newRelic, found 'A'",
        "Butler-SOS.userEvents.sendToNewRelic.destinationAccount: expected an accountName "
        "from thirdPartyToolsCredentials.newRelic, found 'B'",
    ]


# -- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("Butler-SOS:\n  userEvents: [\n", "line 3"),
        ("Butler-SOS:\n  userEvents:\n    enable: true\n   tags: x\n", "line 4"),
        ("Butler-SOS:\n\tuserEvents: {}\n", "line 2"),
        ("a: 'unterminated\n", "line"),
    ],
)
def test_bad_yaml(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: not valid YAML: ")
    assert where in problem
    assert "\n" not in problem


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, env={})
    assert caught.value.problems == [f"{tmp_path}: cannot read: Is a directory"]
    if os.geteuid() != 0:  # root reads anything
        path = write(tmp_path, "Butler-SOS: {}\n")
        path.chmod(0)
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert caught.value.problems == [f"{path}: cannot read: Permission denied"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    # e.g. saved as Windows-1252 by an editor on the Sense server
    path = tmp_path / "cp1252.yaml"
    path.write_bytes(
        b"Butler-SOS:\n  userEvents:\n    tags:\n      - name: site\n        value: Malm\xf6\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [
        f"{path}: line 5, column 20: expected UTF-8 text, found byte 0xf6"
    ]


# -- environment variables -----------------------------------------------------------------


def test_env_substitution() -> None:
    document = butler(
        influxdbConfig={
            "host": "${INFLUX_HOST}",
            "port": "${INFLUX_PORT:-8086}",
            "version": "${INFLUX_VERSION:-2}",
            "v2Config": {
                "org": "${INFLUX_ORG:-lab}",
                "bucket": "${ENV_NAME}-${BUCKET_SUFFIX:-events}",
                "token": "${INFLUX_TOKEN}",
            },
        },
        userEvents={
            "tags": [{"name": "env", "value": "${ENV_NAME}"}],
            "excludeUser": [
                {"directory": "${SVC_DIR:-INTERNAL}", "userId": "sa_${SVC:-repository}"}
            ],
        },
    )
    env = {
        "INFLUX_HOST": "influx.prod.example.com",
        "INFLUX_TOKEN": "tok-123456",
        "ENV_NAME": "PROD",
        "INFLUX_PORT": "8087",
    }
    config = config_from_document(document, env)
    influx = config.butler.influxdb_config
    assert (influx.host, influx.port, influx.version) == ("influx.prod.example.com", 8087, 2)
    assert influx.v2_config.org == "lab"
    assert influx.v2_config.bucket == "PROD-events"
    assert influx.v2_config.token == "tok-123456"
    assert config.butler.user_events.tags[0].value == "PROD"  # type: ignore[index]
    exclude = config.butler.user_events.exclude_user[0]  # type: ignore[index]
    assert (exclude.directory, exclude.user_id) == ("INTERNAL", "sa_repository")


def test_env_default_used_when_variable_empty_and_may_be_empty() -> None:
    document = butler(influxdbConfig={"v2Config": {"org": "${ORG:-lab}", "bucket": "${B:-}"}})
    config = config_from_document(document, {"ORG": ""})
    assert config.butler.influxdb_config.v2_config.org == "lab"
    assert config.butler.influxdb_config.v2_config.bucket == ""
    # set but empty, without a default: the empty value is what the operator asked for
    document = butler(influxdbConfig={"v2Config": {"token": "${TOKEN}"}})
    assert (
        config_from_document(document, {"TOKEN": ""}).butler.influxdb_config.v2_config.token == ""
    )


def test_env_value_is_not_substituted_again() -> None:
    document = butler(influxdbConfig={"v2Config": {"token": "${TOKEN}"}})
    config = config_from_document(document, {"TOKEN": "${OTHER}"})
    assert config.butler.influxdb_config.v2_config.token == "${OTHER}"


def test_env_value_of_wrong_type_is_reported_at_its_key() -> None:
    document = butler(influxdbConfig={"port": "${PORT}"})
    assert problems_of(document, {"PORT": "eighty"}) == [
        "Butler-SOS.influxdbConfig.port: expected an integer, found string 'eighty'"
    ]


def test_load_config_reads_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path, "Butler-SOS:\n  influxdbConfig:\n    v3Config:\n      token: ${SF_TEST_TOKEN}\n"
    )
    monkeypatch.setenv("SF_TEST_TOKEN", "from-the-environment")
    assert load_config(path).butler.influxdb_config.v3_config.token == "from-the-environment"
    monkeypatch.delenv("SF_TEST_TOKEN")
    with pytest.raises(ConfigError):
        load_config(path)


# -- secrets -------------------------------------------------------------------------------


def test_redact_hides_every_secret() -> None:
    config = load_config(PRODUCTION, env={})
    found = secrets(config)
    assert set(found) == {
        "v1-password-s3cret",
        "v2-token-0123456789abcdef",
        "v3-token-not-used-here",
        "NRII-first-0123456789abcdef0123456789abcd",
        "NRII-second-fedcba9876543210fedcba987654",
    }
    text = "connecting with " + ", ".join(found) + " to influxdb.lab.example.com"
    redacted = redact(text, config)
    for secret in found:
        assert secret not in redacted
    assert redacted.count("***") == len(found)
    assert "influxdb.lab.example.com" in redacted  # non-secrets stay readable


def test_redact_secrets_from_environment_and_own_section() -> None:
    document = {
        **butler(
            influxdbConfig={"v1Config": {"auth": {"enable": True, "password": "${INFLUX_PW}"}}},
            cert={"clientCertPassphrase": "${CERT_PASS}"},
        ),
        "senseflow": {"mqtt": {"username": "bob", "password": "${MQTT_PW}"}},
    }
    env = {"INFLUX_PW": "pw-from-env", "CERT_PASS": "cert-pass", "MQTT_PW": "mqtt-pw"}
    config = config_from_document(document, env)
    text = "auth pw-from-env cert-pass mqtt-pw user bob"
    assert redact(text, config) == "auth *** *** *** user bob"


def test_redact_a_secret_containing_another() -> None:
    config = config_from_document(
        butler(influxdbConfig={"v2Config": {"token": "abc"}, "v3Config": {"token": "abcdef"}}), {}
    )
    assert redact("t1=abcdef t2=abc", config) == "t1=*** t2=***"


def test_redact_ignores_empty_and_tiny_values() -> None:
    # An empty password (or a 1-2 character one) would otherwise star out half the log.
    config = config_from_document(butler(influxdbConfig={"v2Config": {"token": "a"}}), {})
    assert redact("a bad day", config) == "a bad day"
    assert redact("anything", Config()) == "anything"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (
            butler(influxdbConfig={"v1Config": {"auth": {"password": 31415926}}}),
            "Butler-SOS.influxdbConfig.v1Config.auth.password: expected a string, found integer",
        ),
        (
            butler(influxdbConfig={"v3Config": {"token": 27182818}}),
            "Butler-SOS.influxdbConfig.v3Config.token: expected a string, found integer",
        ),
        (
            butler(
                thirdPartyToolsCredentials={
                    "newRelic": [{"accountName": "A", "accountId": "1", "insertApiKey": 16180339}]
                }
            ),
            "Butler-SOS.thirdPartyToolsCredentials.newRelic[0].insertApiKey: "
            "expected a string, found integer",
        ),
        (
            {"senseflow": {"mqtt": {"password": 14142135}}},
            "senseflow.mqtt.password: expected a string, found integer",
        ),
    ],
    ids=["influx password", "influx token", "new relic key", "mqtt password"],
)
def test_config_error_never_shows_a_secret_value(document: Any, problem: str) -> None:
    # An unquoted numeric password is a type mistake; the message must not print it.
    assert problems_of(document) == [problem]


# -- the CLI -------------------------------------------------------------------------------


BAD_CONFIG = """\
Butler-SOS:
    userEvents:
        udpServerConfig:
            portUserActivityEvents: nine
        excludeUser:
            - directory: LAB
    influxdbConfig:
        version: 7
senseflow:
    wokers: 2
"""
BAD_LINES = [
    "senseflow: config: Butler-SOS.userEvents.excludeUser[0].userId: "
    "expected a value, found nothing",
    "senseflow: config: Butler-SOS.userEvents.udpServerConfig.portUserActivityEvents: "
    "expected an integer, found string 'nine'",
    "senseflow: config: Butler-SOS.influxdbConfig.version: "
    "expected one of 1, 2, 3, found integer 7",
]


def test_cli_bad_config_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD_CONFIG)
    assert main(["parse", "--config", str(path), str(write(tmp_path, "", "in.txt"))]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[:3] == BAD_LINES
    assert lines[3].startswith("senseflow: config: senseflow.wokers: unknown key")
    assert len(lines) == 4
    assert captured.out == ""


def test_cli_bad_config_subprocess(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_CONFIG)
    result = subprocess.run(
        [sys.executable, "-m", "senseflow.cli", "parse", "--config", str(path)],
        cwd=ROOT,
        input=b"/qseow-proxy-session/;h;Start session;LAB;u;o;c;m\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == exitcodes.CONFIG_ERROR == 2
    lines = result.stderr.decode().splitlines()
    assert lines[:3] == BAD_LINES
    assert len(lines) == 4
    assert "Traceback" not in result.stderr.decode()
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Butler-SOS: [\n", "not valid YAML"),
        (None, "cannot read: No such file or directory"),
    ],
    ids=["bad yaml", "missing file"],
)
def test_cli_unloadable_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, expected: str
) -> None:
    path = write(tmp_path, text) if text is not None else tmp_path / "missing.yaml"
    assert main(["parse", "--config", str(path)]) == exitcodes.CONFIG_ERROR
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"senseflow: config: {path}: {expected}")


def test_cli_missing_env_var(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SF_MISSING_TOKEN", raising=False)
    path = write(
        tmp_path,
        "Butler-SOS:\n  influxdbConfig:\n    v2Config:\n      token: ${SF_MISSING_TOKEN}\n",
    )
    assert main(["parse", "--config", str(path)]) == exitcodes.CONFIG_ERROR
    assert capsys.readouterr().err.splitlines() == [
        "senseflow: config: Butler-SOS.influxdbConfig.v2Config.token: expected environment "
        "variable SF_MISSING_TOKEN to be set (or a default, as ${SF_MISSING_TOKEN:-value}), "
        "found it unset"
    ]


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        ([{"name": "host", "value": "x"}], "found 'host'"),
        ([{"name": "time", "value": "x"}], "found 'time'"),
        ([{"name": "env", "value": "a"}, {"name": "env", "value": "b"}], "found 'env' again"),
        ([{"name": " ", "value": "a"}], "expected a non-empty name"),
    ],
)
def test_configured_tags_cannot_break_the_point(tags: list[dict[str, str]], problem: str) -> None:
    (found,) = problems_of(butler(userEvents={"tags": tags}))
    assert found.startswith("Butler-SOS.userEvents.tags[")
    assert problem in found


def test_children_start_from_the_fork_server_unless_told_otherwise() -> None:
    from senseflow.cli import apply_run_flags, build_parser
    from shared.config import Config

    parser = build_parser()
    assert Config().pipeline.start_method == "forkserver"
    spawned = config_from_document({"senseflow": {"startMethod": "spawn"}}, {})
    assert spawned.pipeline.start_method == "spawn"
    for flag in ("spawn", "forkserver"):
        args = parser.parse_args(["run", "--start-method", flag])
        assert apply_run_flags(spawned, args).pipeline.start_method == flag
    assert apply_run_flags(spawned, parser.parse_args(["run"])).pipeline.start_method == "spawn"
