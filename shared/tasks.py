"""Background tasks whose failure is never silent.

An asyncio task that dies with an exception nobody awaits is reported only when it is
garbage collected, if ever; a sink whose send loop died would then hang its `flush()`
forever. `spawn` hands such a failure straight to the loop's exception handler, which the
process sets to log the traceback and stop (the supervisor restarts it; the spool
replays what was not delivered).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def spawn(coroutine: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(_report_failure)
    return task


def _report_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        task.get_loop().call_exception_handler(
            {"message": f"task {task.get_name()} failed", "exception": error, "task": task}
        )


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel background tasks and wait until they have all ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def readable(fd: int, timeout: float) -> bool:
    """Wait until `fd` can be read, at most `timeout` s, on the loop itself (no thread):
    an idle process sleeps in epoll rather than waking a thread to poll."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
