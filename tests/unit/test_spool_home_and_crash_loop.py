"""Issue 12, section 2: where the spool lives by default, the way out of a destination
mismatch, and a crash loop the supervisor's backoff would hide."""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from senseflow.cli import apply_run_flags, build_parser
from senseflow.metrics import telemetry_metrics
from senseflow.telemetry import Telemetry
from shared.backoff import Backoff
from shared.config import Config, config_from_document
from shared.counters import SharedCounters, new_block
from shared.ipc import STOP, Channels, Flag, MessageChannel, drain_reports
from tests.unit.test_crash_counting import batch
from tests.unit.test_observability import FakeClock
from workers.writer import spool as spool_module
from workers.writer.process import Writer
from workers.writer.segments import write_all
from workers.writer.spool import Spool
from workers.writer.spooldir import destination_identities, spool_directory, state_base

CONTEXT = multiprocessing.get_context("spawn")


def influx_config(database: str, udp_port: int = 9997, spool: str = "") -> Config:
    butler = {
        "influxdbConfig": {"enable": True, "version": 1, "v1Config": {"dbName": database}},
        "userEvents": {"udpServerConfig": {"portUserActivityEvents": udp_port}},
    }
    own = {"spool": {"directory": spool}} if spool else {}
    return config_from_document({"Butler-SOS": butler, "senseflow": own}, {})


def default_directory(config: Config, env: dict[str, str]) -> Path:
    return spool_directory(config, destination_identities(config, ["influxdb"]), env)


# -- the default directory -----------------------------------------------------------------


def test_default_spool_is_per_instance_under_the_state_directory(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": str(tmp_path / "state")}
    first = default_directory(influx_config("senseops"), env)
    assert first.parent == tmp_path / "state" and first.name.startswith("spool-")
    assert default_directory(influx_config("senseops"), env) == first  # stable
    assert default_directory(influx_config("other"), env) != first  # other destinations
    assert default_directory(influx_config("senseops", udp_port=9998), env) != first
    explicit = influx_config("senseops", spool=str(tmp_path / "mine"))
    assert default_directory(explicit, env) == tmp_path / "mine"


def test_state_base_falls_back_to_the_users_state_directory(tmp_path: Path) -> None:
    unwritable = tmp_path / "a-file" / "senseflow"
    (tmp_path / "a-file").write_text("not a directory")
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert state_base(env, system=unwritable) == tmp_path / "xdg" / "senseflow"
    assert state_base({}, system=tmp_path / "var-lib") == tmp_path / "var-lib"


# -- refusing a backlog written for another destination -------------------------------------


def make_writer(config: Config) -> tuple[Writer, list[Any]]:
    channels = Channels(
        raw=MessageChannel(1 << 16),
        encoded=MessageChannel(1 << 16),
        reports=MessageChannel(1 << 16),
        stop=Flag(CONTEXT),
    )
    writer = Writer(config, channels, SharedCounters(new_block(CONTEXT)))
    return writer, [channels.raw, channels.encoded, channels.reports]


def test_writer_refuses_a_backlog_for_another_database_unless_told(tmp_path: Path) -> None:
    spool = str(tmp_path / "spool")
    first = influx_config("senseops", spool=spool)
    previous = Spool(spool, ["influxdb"], identities=destination_identities(first, ["influxdb"]))
    previous.append(b"x", 7)
    previous.close()

    moved = influx_config("fresh", spool=spool)
    writer, channels = make_writer(moved)
    assert not writer.open_spool()
    ((_, kind, message),) = list(drain_reports(writer.channels.reports, 1.0))
    assert kind == "fatal" and "db=senseops" in message and "--spool-discard-mismatch" in message

    args = build_parser().parse_args(["run", "--spool-discard-mismatch"])
    told, _ = make_writer(apply_run_flags(moved, args))
    try:
        assert told.open_spool()
        told.count_spool_at_start()
        assert told.counters.visible() == {"dropped.spool_mismatch.influxdb": 7}
    finally:
        assert told.spool is not None
        told.spool.close()
        for channel in channels:
            channel.close()
        for channel in (told.channels.raw, told.channels.encoded, told.channels.reports):
            channel.close()


# -- crash loop ----------------------------------------------------------------------------


def test_a_crash_loop_is_unhealthy_logged_and_exposed_whatever_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    telemetry = Telemetry(Config(), [], clock)
    telemetry.observe_children([("writer", 1, True, True)])
    with caplog.at_level(logging.ERROR, "senseflow.supervisor"):
        for pid in range(2, 7):  # five restarts, 10 s apart: the capped backoff's pace
            clock.now += 10
            telemetry.observe_children([("writer", pid, True, True)])
    health = telemetry.health(False)
    assert health.reasons == ["writer is crash-looping (5 restarts in 300 s)"]
    assert "writer is crash-looping" in caplog.text
    assert crash_loop_metric(telemetry) == 1.0

    clock.now += 301  # up for the whole window since: no longer a loop
    assert telemetry.health(False).healthy
    assert crash_loop_metric(telemetry) == 0.0


def crash_loop_metric(telemetry: Telemetry) -> float:
    supervisor = SimpleNamespace(telemetry=telemetry, signals=[])
    for family in telemetry_metrics(supervisor, []):
        if family.name == "senseflow_child_crash_looping":
            (sample,) = family.samples
            return float(sample.value)
    raise AssertionError("no senseflow_child_crash_looping")


# -- a disk that refuses an append ----------------------------------------------------------


def test_writer_counts_and_retries_an_append_the_disk_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, channels = make_writer(influx_config("senseops", spool=str(tmp_path / "spool")))
    assert writer.open_spool()
    writer.count_spool_at_start()
    writer.disk_backoff = Backoff(base=0.001, cap=0.001)
    writer.channels.encoded.send(batch(0, 0, 5))
    writer.channels.encoded.send(STOP)
    refusals = [OSError(errno.ENOSPC, "No space left on device")] * 2

    def full_disk(out: Any, data: bytes) -> None:  # the real write once space is back
        if refusals:
            raise refusals.pop()
        write_all(out, data)

    monkeypatch.setattr(spool_module, "write_all", full_disk)
    try:
        asyncio.run(writer.consume())  # returns at STOP: the batch was taken after all
        assert writer.counters.visible() == {"spool.write_errors": 2, "events": 5}
        assert writer.spool is not None and list(writer.spool.pending("influxdb")) == [0]
    finally:
        assert writer.spool is not None
        writer.spool.close()
        for channel in channels:
            channel.close()
