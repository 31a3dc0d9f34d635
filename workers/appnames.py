"""Worker side of the app names the supervisor publishes (see `senseflow.appnames`).

Each worker's `AppNamesWatcher` stats the published file every report interval (0.5 s) and,
when it changed, reads it and swaps its pipeline's mapping.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

log = logging.getLogger("senseflow.appnames")

_MAPPING = msgspec.json.Decoder(dict[str, str])


def read_published(path: str | Path) -> dict[str, str]:
    return _MAPPING.decode(Path(path).read_bytes())


class AppNamesWatcher:
    """Worker side: notices a newly published mapping by the file's identity and mtime."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: tuple[int, int, int] | None = None

    def poll(self) -> dict[str, str] | None:
        """The published mapping if it changed since the last call, else None."""
        if not self.path:
            return None
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        identity = (status.st_mtime_ns, status.st_ino, status.st_size)
        if identity == self.seen:
            return None
        self.seen = identity
        try:
            mapping = read_published(self.path)
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("app names: cannot read %s: %s", self.path, exc)
            return None
        log.info("app names: %d app(s) now in use", len(mapping))
        return mapping
