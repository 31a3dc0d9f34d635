"""Making sure a child the supervisor takes for dead is dead.

A child forked by the fork server (`startMethod: forkserver`) has its exit status reported
by the fork server. If the fork server itself is killed, every child looks dead (exit code
255) while it still runs: restarting it then would put two writers on one spool and two
workers on one counter block. So before a child is settled and restarted, the supervisor
SIGKILLs it through a pidfd opened when it started (a pidfd names that process only, never
one that reuses its pid) and waits until it has exited. For a child that did die it is a
no-op.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal

EXIT_WAIT_SECONDS = 5.0


class ExitWatch:
    def __init__(self, pid: int | None) -> None:
        self._fd: int | None = None
        if pid is not None:
            with contextlib.suppress(OSError):  # no pidfds (Linux < 5.3): nothing to watch
                self._fd = os.pidfd_open(pid)

    def make_sure_gone(self, timeout: float = EXIT_WAIT_SECONDS) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            poller = select.poll()
            poller.register(fd, select.POLLIN)  # readable once the process has exited
            poller.poll(int(timeout * 1000))
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
