"""CPU hogs: a loaded machine on demand (`benchmarks.suite --hog N`).

Each hog is a child Python process running a plain busy loop (no sockets, no files), at
the default priority, so it competes for the cores as another job on the machine would.
They are stopped by their PIDs when the `with` block ends.
"""

from __future__ import annotations

import subprocess
import sys
from types import TracebackType

BUSY_LOOP = "while True:\n    pass\n"


class Hogs:
    """`count` busy-loop processes while the `with` block runs (0: nothing at all)."""

    def __init__(self, count: int) -> None:
        if count < 0:
            raise ValueError(f"hog count must be >= 0, got {count}")
        self.count = count
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Hogs:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        for _ in range(self.count - len(self.processes)):
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", BUSY_LOOP],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait(timeout=10)
        self.processes.clear()
