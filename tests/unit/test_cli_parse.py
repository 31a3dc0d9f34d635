"""`senseflow parse` end to end: datagrams in (file or stdin), one line out per line in."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from senseflow.cli import main
from shared import exitcodes

ROOT = Path(__file__).resolve().parents[2]
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36"
)
SAFARI_MACOS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Safari/605.1.15"
)
SALES = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
HR = "0c4e1d2a-9b7f-4e3c-8a51-7d2f6e9b1c04"

SESSION_START = (
    f"/qseow-proxy-session/;sense1;Start session;LAB;anna;AppAccess;/app/{SALES};"
    f"Start session for user 'LAB\\anna'; UserAgent: {CHROME_WINDOWS}"
)
CONNECTION_OPEN = (
    f"/proxy-user-event/;sense2;Qlik.Sense.Proxy;/app/{HR}/sheet/x;"
    f"Opening connection for user 'EXT\\bo' UserAgent: '{SAFARI_MACOS}'"
)
HUB_STOP = "/qseow-proxy-connection/;sense1;Close connection;LAB;anna;Hub;/hub/;no agent here"
EXCLUDED = "/qseow-proxy-session/;sense1;Stop session;internal;SA_SCHEDULER;o;c;m"
TOO_FEW = "/qseow-proxy-session/;sense1;Start session"
UNKNOWN = "hello world"
NO_USER = "/qseow-proxy-session/;sense1;Start session;LAB;  ;o;c;m"

INPUT = [SESSION_START, CONNECTION_OPEN, HUB_STOP, EXCLUDED, TOO_FEW, UNKNOWN, NO_USER, ""]

REQUIRED_KEYS = {
    "messageType",
    "host",
    "command",
    "userDir",
    "userId",
    "origin",
    "context",
    "message",
    "tags",
    "timestamp",
}
OPTIONAL_KEYS = {
    "appId",
    "appName",
    "uaBrowserName",
    "uaBrowserMajorVersion",
    "uaOsName",
    "uaOsVersion",
}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def config_file(tmp_path: Path, app_names_file: Path | None = None) -> Path:
    text = (
        "Butler-SOS:\n"
        "  userEvents:\n"
        "    excludeUser:\n"
        "      - directory: INTERNAL\n"
        "        userId: sa_scheduler\n"
        "    tags:\n"
        "      - name: env\n"
        "        value: PROD\n"
        "      - name: dc\n"
        "        value: Lund 1\n"
    )
    if app_names_file is not None:
        text += f"senseflow:\n  appNamesFile: {app_names_file}\n"
    path = tmp_path / "butler-sos.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def app_names_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "apps.yaml"
    path.write_text(f"{SALES}: Sales dashboard\n'{HR.upper()}': 'HR: overview'\n", encoding="utf-8")
    return path


def input_file(tmp_path: Path, lines: list[str], newline: str = "\n") -> Path:
    path = tmp_path / "datagrams.txt"
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def check_timestamp(timestamp: str, before: float, after: float) -> None:
    assert ISO_UTC.match(timestamp), timestamp
    moment = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%f%z")
    assert moment.tzinfo == UTC
    assert before - 0.001 <= moment.timestamp() <= after + 0.001


# -- JSON ----------------------------------------------------------------------------------


def test_json_from_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, app_names_yaml(tmp_path))
    before = time.time()
    code, lines, err = run(
        ["parse", "--config", str(config), str(input_file(tmp_path, INPUT))], capsys
    )
    after = time.time()
    assert (code, err) == (exitcodes.OK, "")
    assert len(lines) == len(INPUT)
    out = [json.loads(line) for line in lines]
    assert all(set(o) == {"outcome", "reason", "event"} for o in out)

    start, open_, stop = (o["event"] for o in out[:3])
    assert [o["outcome"] for o in out[:3]] == ["event"] * 3
    assert [o["reason"] for o in out[:3]] == [None] * 3

    assert set(start) == REQUIRED_KEYS | OPTIONAL_KEYS
    assert {k: v for k, v in start.items() if k != "timestamp"} == {
        "messageType": "qseow-proxy-session",
        "host": "sense1",
        "command": "Start session",
        "userDir": "LAB",
        "userId": "anna",
        "origin": "AppAccess",
        "context": f"/app/{SALES}",
        "message": f"Start session for user 'LAB\\anna'; UserAgent: {CHROME_WINDOWS}",
        "tags": {"env": "PROD", "dc": "Lund 1"},
        "appId": SALES,
        "appName": "Sales dashboard",
        "uaBrowserName": "Chrome",
        "uaBrowserMajorVersion": "119",
        "uaOsName": "Windows",
        "uaOsVersion": "10",
    }
    check_timestamp(start["timestamp"], before, after)

    assert set(open_) == REQUIRED_KEYS | OPTIONAL_KEYS
    assert open_["messageType"] == "proxy-user-event"
    assert (open_["command"], open_["userDir"], open_["userId"]) == ("Open connection", "EXT", "bo")
    assert open_["origin"] == "Qlik.Sense.Proxy"
    assert (open_["appId"], open_["appName"]) == (HR, "HR: overview")
    assert (open_["uaBrowserName"], open_["uaBrowserMajorVersion"]) == ("Safari", "17")
    assert (open_["uaOsName"], open_["uaOsVersion"]) == ("Mac OS X", "10.15.7")
    check_timestamp(open_["timestamp"], before, after)

    # no app, no agent: those keys are left out, not sent empty
    assert set(stop) == REQUIRED_KEYS
    assert stop["command"] == "Close connection"
    assert stop["tags"] == {"env": "PROD", "dc": "Lund 1"}

    assert out[3:] == [
        {"outcome": "excluded", "reason": None, "event": None},
        {"outcome": "invalid", "reason": "too_few_fields", "event": None},
        {"outcome": "invalid", "reason": "unknown_source", "event": None},
        {"outcome": "invalid", "reason": "missing_user_id", "event": None},
        {"outcome": "invalid", "reason": "unknown_source", "event": None},
    ]
    assert start["timestamp"] <= open_["timestamp"] <= stop["timestamp"]


def test_json_from_stdin_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(("\n".join(INPUT[:3]) + "\n").encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, lines, _ = run(["parse", "--config", str(config_file(tmp_path))], capsys)
    assert code == exitcodes.OK
    out = [json.loads(line) for line in lines]
    assert [o["event"]["command"] for o in out] == [
        "Start session",
        "Open connection",
        "Close connection",
    ]
    # no appNamesFile: the app id is known, its name is not
    assert out[0]["event"]["appId"] == SALES
    assert "appName" not in out[0]["event"]


def test_json_from_stdin_subprocess(tmp_path: Path) -> None:
    config = config_file(tmp_path, app_names_yaml(tmp_path))
    data = ("\n".join(INPUT) + "\n").encode()
    result = subprocess.run(
        [sys.executable, "-m", "senseflow.cli", "parse", "--config", str(config)],
        cwd=ROOT,
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    out = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [o["outcome"] for o in out] == ["event"] * 3 + ["excluded"] + ["invalid"] * 4
    assert out[0]["event"]["appName"] == "Sales dashboard"


def test_default_format_is_json_and_no_config_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines, _ = run(["parse", str(input_file(tmp_path, [SESSION_START, EXCLUDED]))], capsys)
    assert code == exitcodes.OK
    first, second = (json.loads(line) for line in lines)
    assert first["event"]["tags"] == {}
    assert second["outcome"] == "event"  # nothing excluded without a config


# -- line protocol -------------------------------------------------------------------------


def test_line_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, app_names_yaml(tmp_path))
    args = ["parse", "--format", "line-protocol", "--config", str(config)]
    code, lines, err = run([*args, str(input_file(tmp_path, INPUT))], capsys)
    assert (code, err) == (exitcodes.OK, "")
    assert len(lines) == len(INPUT)
    start, open_, stop = lines[:3]
    series, rest = re.split(r"(?<!\\) ", start, maxsplit=1)
    fields, stamp = rest.rsplit(" ", 1)
    assert series == (
        "user_events,host=sense1,event_action=Start\\ session,userFull=LAB\\anna,"
        f"userDirectory=LAB,userId=anna,origin=AppAccess,appId={SALES},"
        "appName=Sales\\ dashboard,qs_uaBrowserName=Chrome,qs_uaBrowserMajorVersion=119,"
        "qs_uaOsName=Windows,qs_uaOsVersion=10,env=PROD,dc=Lund\\ 1"
    )
    assert fields == (
        'userFull_field="LAB\\\\anna",userId_field="anna",'
        f'appId_field="{SALES}",appName_field="Sales dashboard"'
    )
    assert abs(int(stamp) - time.time_ns()) < 60 * 10**9
    assert "appName=HR:\\ overview" in open_
    assert "qs_uaBrowserName=Safari,qs_uaBrowserMajorVersion=17,qs_uaOsName=Mac\\ OS\\ X" in open_
    assert "appId" not in stop and "qs_ua" not in stop
    assert lines[3:] == [
        "# excluded",
        "# invalid: too_few_fields",
        "# invalid: unknown_source",
        "# invalid: missing_user_id",
        "# invalid: unknown_source",
    ]
    stamps = [int(line.rsplit(" ", 1)[1]) for line in lines[:3]]
    assert stamps[0] < stamps[1] < stamps[2]  # strictly increasing: no overwritten points


def test_line_protocol_from_stdin(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "senseflow.cli", "parse", "--format", "line-protocol"],
        cwd=ROOT,
        input=f"{HUB_STOP}\n{UNKNOWN}\n".encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.decode().splitlines()
    assert first.startswith("user_events,host=sense1,event_action=Close\\ connection,")
    assert second == "# invalid: unknown_source"


# -- one line out per line in --------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["json", "line-protocol"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_one_output_line_per_input_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output_format: str, newline: str
) -> None:
    lines = [SESSION_START, "", "   ", UNKNOWN, HUB_STOP, "\x00\x01", TOO_FEW, ""]
    path = input_file(tmp_path, lines, newline)
    code, out, _ = run(["parse", "--format", output_format, str(path)], capsys)
    assert code == exitcodes.OK
    assert len(out) == len(lines)
    if output_format == "json":
        assert json.loads(out[0])["event"]["message"].endswith("Safari/537.36")  # no \r
        assert [json.loads(line)["outcome"] for line in out] == [
            "event",
            "invalid",
            "invalid",
            "invalid",
            "event",
            "invalid",
            "invalid",
            "invalid",
        ]


def test_last_line_without_newline_and_bad_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(
        b"/qseow-proxy-session/;sense\xff1;Start session;LAB;anna;o;c;m\n" + UNKNOWN.encode()
    )
    code, lines, _ = run(["parse", str(path)], capsys)
    assert code == exitcodes.OK
    assert len(lines) == 2
    assert json.loads(lines[0])["event"]["host"] == "sense\ufffd1"


def test_empty_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert run(["parse", str(path)], capsys)[:2] == (exitcodes.OK, [])


# -- app names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("apps.yaml", f"{SALES}: Sales dashboard\n{HR}: 'HR: overview'\n"),
        (
            "apps.yml",
            f"- id: {SALES}\n  name: Sales dashboard\n- id: {HR}\n  name: 'HR: overview'\n",
        ),
        ("apps.csv", f"id,name\n{SALES},Sales dashboard\n{HR},HR: overview\n"),
        ("apps.csv", f"# exported from QMC\n{SALES},Sales dashboard\n{HR.upper()},HR: overview\n"),
        ("apps.CSV", f'id,name\n{SALES},"Sales dashboard"\n{HR},"HR: overview"\n'),
    ],
    ids=["yaml mapping", "yaml list", "csv with header", "csv no header", "csv quoted"],
)
def test_app_names_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str
) -> None:
    names = tmp_path / name
    names.write_text(text, encoding="utf-8")
    config = config_file(tmp_path, names)
    path = input_file(tmp_path, [SESSION_START, CONNECTION_OPEN, HUB_STOP])
    code, lines, err = run(["parse", "--config", str(config), str(path)], capsys)
    assert (code, err) == (exitcodes.OK, "")
    events = [json.loads(line)["event"] for line in lines]
    assert events[0]["appName"] == "Sales dashboard"
    assert events[1]["appName"] == "HR: overview"
    assert "appName" not in events[2]


def test_app_name_unknown_id_is_omitted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = tmp_path / "apps.yaml"
    names.write_text(f"{HR}: HR overview\n", encoding="utf-8")
    config = config_file(tmp_path, names)
    path = input_file(tmp_path, [SESSION_START])
    _, lines, _ = run(
        ["parse", "--format", "line-protocol", "--config", str(config), str(path)], capsys
    )
    assert f"appId={SALES}" in lines[0]
    assert "appName" not in lines[0]


@pytest.mark.parametrize(
    ("name", "text"),
    [("apps.yaml", "just a string\n"), ("apps.yaml", "- id: x\n"), ("missing.yaml", None)],
    ids=["not a mapping", "list item without name", "missing"],
)
def test_bad_app_names_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str | None
) -> None:
    names = tmp_path / name
    if text is not None:
        names.write_text(text, encoding="utf-8")
    config = config_file(tmp_path, names)
    code, lines, err = run(
        [
            "parse",
            "--config",
            str(config),
            str(input_file(tmp_path, [])),
        ],
        capsys,
    )
    assert code == exitcodes.CONFIG_ERROR
    assert lines == []
    [line] = err.splitlines()
    assert line.startswith(f"senseflow: config: senseflow.appNamesFile: cannot load {names}: ")


# -- errors --------------------------------------------------------------------------------


def test_missing_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-file.txt"
    code, lines, err = run(["parse", str(missing)], capsys)
    assert code != exitcodes.OK
    assert code == exitcodes.FAILURE
    assert lines == []
    assert err.splitlines() == [f"senseflow: parse: no such file: {missing}"]


def test_missing_input_file_subprocess(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file.txt"
    result = subprocess.run(
        [sys.executable, "-m", "senseflow.cli", "parse", str(missing)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == exitcodes.FAILURE
    assert result.stderr.decode().splitlines() == [f"senseflow: parse: no such file: {missing}"]
    assert result.stdout == b""


def test_unknown_format_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["parse", "--format", "csv"])
    assert exited.value.code == 2
    assert "invalid choice: 'csv'" in capsys.readouterr().err
