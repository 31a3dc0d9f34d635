"""Where the spool lives and whom it belongs to (issue 12).

By default each service instance has its own spool under a state directory: systemd's
`$STATE_DIRECTORY`, else `/var/lib/senseflow` when we may write there, else the user's
`$XDG_STATE_HOME/senseflow` (`~/.local/state/senseflow`); inside it `spool-<key>`, the key a
hash of the destinations and the UDP address, so two services with different configs never
share a spool. Each segment also records the destinations it was written for
(workers/writer/segments.py), which catches a changed destination in a directory named in
the config.

The directory holds user data: it is 0700, must belong to us, and its files are 0600.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from shared.config import Config
from workers.writer.destinations import DESTINATIONS

log = logging.getLogger("senseflow.spool")

SYSTEM_STATE = Path("/var/lib/senseflow")


class SpoolDirectoryError(OSError):
    """A directory we must not keep user data in."""


def destination_identities(config: Config, names: list[str]) -> dict[str, str]:
    """What each destination writes to (its record's `identity`): a spool's records are for
    these and no others."""
    return {d.name: d.identity(config) for d in DESTINATIONS if d.name in names}


def instance_key(config: Config, identities: Mapping[str, str]) -> str:
    udp = config.butler.user_events.udp_server_config
    seed = {"destinations": identities, "udp": f"{udp.server_host}:{udp.port_user_activity_events}"}
    return hashlib.sha256(json.dumps(seed, sort_keys=True).encode()).hexdigest()[:12]


def state_base(env: Mapping[str, str], system: Path = SYSTEM_STATE) -> Path:
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if may_write(system):
        return system
    xdg = env.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "senseflow"


def may_write(directory: Path) -> bool:
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            return False
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def spool_directory(
    config: Config, identities: Mapping[str, str], env: Mapping[str, str] | None = None
) -> Path:
    """The configured `senseflow.spool.directory`, else this instance's default."""
    if config.pipeline.spool.directory:
        return Path(config.pipeline.spool.directory)
    base = state_base(os.environ if env is None else env)
    return base / f"spool-{instance_key(config, identities)}"


def prepare_directory(directory: Path) -> None:
    """Create it 0700; refuse one another user owns; tighten its mode if it is ours."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise SpoolDirectoryError(f"{directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise SpoolDirectoryError(
            f"{directory} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}): "
            "refusing to keep user data there; give it to this user or choose another "
            "senseflow.spool.directory"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        directory.chmod(0o700)
        log.info("spool: %s made private (mode 0700)", directory)
