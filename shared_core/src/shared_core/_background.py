"""Per-worker background tasks of an async app (a broadcast listener, ...).

Shared by the Quart and Starlette integrations: started by the serving hooks
or the lifespan, or on the first request where the server ran none; a task
that fails is logged and started again; stopped (cancelled, then awaited for
a bounded time) when the worker stops serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ._aio import AsyncSharedState
from ._errors import StateUnavailable

log = logging.getLogger("shared_core.background")

TaskFunc = Callable[[], Awaitable[None]]
STOP_TIMEOUT = 5.0  # seconds a cancelled task may take to finish


class Worker:
    """What one app runs in one worker: its state and its background tasks."""

    def __init__(self, state: AsyncSharedState) -> None:
        self.state = state
        self.funcs: list[tuple[TaskFunc, float]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, func: TaskFunc, retry_delay: float) -> None:
        self.funcs.append((func, retry_delay))

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.tasks = [
            asyncio.create_task(_keep_running(func, delay), name=_name(func))
            for func, delay in self.funcs
        ]

    def start_late(self, why: str) -> None:
        """Start on a request, if no serving hook or lifespan did (``why`` is logged)."""
        if self.funcs and self.loop is not asyncio.get_running_loop():
            log.warning("%s: background tasks start on the first request instead", why)
            self.start()

    async def stop(self) -> None:
        """Cancel the tasks, wait for them (bounded), then close the state."""
        tasks, self.tasks, self.loop = self.tasks, [], None
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in pending:
                log.error("background task %s ignored its cancellation", task.get_name())
        await self.state.aclose()


async def _keep_running(func: TaskFunc, retry_delay: float) -> None:
    while True:
        try:
            await func()
            return
        except StateUnavailable as exc:
            log.warning("%s: the shared state is unavailable (%s)", _name(func), exc)
        except Exception:
            log.exception("background task %s failed", _name(func))
        await asyncio.sleep(retry_delay)


def _name(func: TaskFunc) -> str:
    return getattr(func, "__qualname__", repr(func))
