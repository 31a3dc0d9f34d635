"""`cursors.json`, the spool's cursors on disk, saved from the loop's thread or from the
sync thread (workers/writer/spoolsync.py).

A save is write, fsync, rename, fsync of the directory: after a power loss the file is the
old one or the new one, never empty (policy `never`: no fsync). Each snapshot of the
cursors is numbered when it is taken; saves run one at a time, and a snapshot older than
the one on disk is not saved, so a slow sync thread never puts back cursors that the
loop's thread (at close) has already saved newer ones over.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from workers.writer.segments import fsync_directory, open_safely, read_file

CURSORS = "cursors.json"


class CursorFile:
    def __init__(self, directory: Path, fsync: bool) -> None:
        self.path = directory / CURSORS
        self.temporary = directory / (CURSORS + ".tmp")
        self.directory = directory
        self.fsync = fsync
        self._lock = threading.Lock()
        self._taken = 0  # snapshots numbered so far
        self._saved = 0  # the number of the snapshot on disk

    def snapshot(self, cursors: dict[str, int]) -> tuple[int, bytes]:
        """The cursors as they are now, numbered; in the loop's thread."""
        self._taken += 1
        return self._taken, json.dumps(cursors).encode()

    def save(self, snapshot: tuple[int, bytes]) -> None:
        """In any thread; a snapshot older than the saved one is dropped."""
        number, data = snapshot
        with self._lock:
            if number <= self._saved:
                return
            self.temporary.unlink(missing_ok=True)  # a link planted there is removed, not followed
            fd = open_safely(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                if self.fsync:
                    os.fsync(file.fileno())
            os.replace(self.temporary, self.path)
            if self.fsync:
                fsync_directory(self.directory)
            self._saved = number

    def read(self) -> dict[str, int] | None:
        """None when missing, empty or unreadable."""
        try:
            saved = json.loads(read_file(self.path))
            return {str(k): int(v) for k, v in saved.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return None
