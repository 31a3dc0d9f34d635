"""deploy/senseflow.service: the hardening issue 12 asks for, checked by systemd itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "senseflow.service"
EXEC = "ExecStart=/opt/senseflow/.venv/bin/senseflow"
REQUIRED = {
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "StateDirectory": "senseflow",
    "StateDirectoryMode": "0700",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
}
MAX_EXPOSURE = 20  # systemd-analyze's 0-100 scale: 2.0 or lower ("OK")


def directives() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_unit_carries_the_hardening_directives() -> None:
    found = directives()
    assert {k: found.get(k) for k in REQUIRED} == REQUIRED
    assert "TasksMax" in found and "MemoryMax" in found
    assert "ProcSubset" not in found  # it would hide /proc/net/udp (the kernel's drop count)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit_and_rates_it_ok(tmp_path: Path) -> None:
    program = tmp_path / "senseflow"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    unit = tmp_path / "senseflow.service"
    text = UNIT.read_text()
    assert EXEC in text
    unit.write_text(text.replace(EXEC, f"ExecStart={program}"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (verify.returncode, verify.stderr) == (0, "")
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--threshold={MAX_EXPOSURE}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout.splitlines()[-1:]
