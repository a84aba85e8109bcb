"""Where the counts live: one shared state, or (naive mode) each worker's own.

Besides the counts, each worker keeps something of its own, as real apps do
(a loaded config, a cache, a model): here, the config ``generation`` it has
acted on. ``reload()`` tells every worker to act, through a broadcast.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from shared_core import AsyncSharedState, LockTimeout, StateUnavailable

from .settings import APP_NAME, Settings

log = logging.getLogger(__name__)


class Counters(Protocol):
    generation: int

    async def incr(self, key: str, by: int) -> int: ...
    async def get(self, key: str) -> int: ...
    async def reset(self, key: str) -> None: ...
    async def ping(self) -> None: ...
    async def listen(self) -> None: ...
    async def reload(self) -> int: ...
    async def run_job(self, seconds: int) -> bool: ...
    async def job_holder(self) -> int | None: ...


class SharedCounters:
    """Counts in the shared state: one atomic ``incr`` on the state server."""

    def __init__(self, state: AsyncSharedState) -> None:
        self.state = state
        self.generation = 0  # of the config this worker has loaded

    async def listen(self) -> None:
        """Act on reload broadcasts; run it as a task for the worker's life."""
        while True:
            try:
                async with self.state.subscribe("reload", on_connect=self._catch_up) as messages:
                    async for _, message in messages:
                        self.generation = max(self.generation, int(message["generation"]))
            except StateUnavailable as exc:  # not even the first subscribe worked
                log.warning("cannot subscribe to reloads yet: %s", exc)
                await asyncio.sleep(1)

    async def reload(self) -> int:
        """Make every worker load the next config generation."""
        generation = await self.state.incr("config:generation")
        await self.state.publish("reload", {"generation": generation})
        return generation

    async def run_job(self, seconds: int) -> bool:
        """Run the report job here unless a worker is already running it."""
        try:
            async with self.state.lock("job:report", timeout=0):
                await self.state.set("job:report:holder", os.getpid())
                await asyncio.sleep(seconds)  # the work; a worker killed here frees the lock
                return True
        except LockTimeout:
            return False

    async def job_holder(self) -> int | None:
        """The pid of the worker that last started the job."""
        holder = await self.state.get("job:report:holder")
        return None if holder is None else int(holder)

    async def _catch_up(self) -> None:
        # Broadcasts sent while this worker was not subscribed are missed:
        # the generation in the state is the truth.
        stored = int(await self.state.get("config:generation", 0))
        self.generation = max(self.generation, stored)

    async def incr(self, key: str, by: int) -> int:
        return await self.state.incr(f"count:{key}", by)

    async def get(self, key: str) -> int:
        return int(await self.state.get(f"count:{key}", 0))

    async def reset(self, key: str) -> None:
        await self.state.set(f"count:{key}", 0)

    async def ping(self) -> None:
        await self.state.get("count:counter")


class NaiveCounters:
    """The bug, kept on purpose: a global per worker, read and written apart."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.generation = 0
        self.holder: int | None = None
        self._job = asyncio.Lock()

    async def incr(self, key: str, by: int) -> int:
        value = self.counts.get(key, 0) + by
        await asyncio.sleep(0)  # another request may run between read and write
        self.counts[key] = value
        return value

    async def get(self, key: str) -> int:
        return self.counts.get(key, 0)

    async def reset(self, key: str) -> None:
        self.counts[key] = 0

    async def ping(self) -> None:
        pass

    async def listen(self) -> None:
        pass

    async def reload(self) -> int:
        # Reaches only the worker that got the request: the other workers never hear of it.
        self.generation += 1
        return self.generation

    async def run_job(self, seconds: int) -> bool:
        # A lock per worker: other workers run the "only once" job too.
        if self._job.locked():
            return False
        async with self._job:
            self.holder = os.getpid()
            await asyncio.sleep(seconds)
            return True

    async def job_holder(self) -> int | None:
        return self.holder


@asynccontextmanager
async def attach_counters(
    settings: Settings,
) -> AsyncIterator[tuple[Counters, Callable[[], Awaitable[str]]]]:
    """Yield the counters, and how to get the session secret, for one worker's life."""
    if settings.mode == "naive":
        # The usual bug: every worker makes up its own key, so a session cookie
        # signed by one worker is rejected by the others.
        key = secrets.token_hex(32)

        async def own_key() -> str:
            return key

        yield NaiveCounters(), own_key
        return
    state = AsyncSharedState(settings.state_url, app=APP_NAME)

    async def shared_key() -> str:
        # Made once for the whole deployment: a session signed by one worker
        # is valid on every other.
        return await state.secret("SECRET_KEY")

    try:
        yield SharedCounters(state), shared_key
    finally:
        await state.aclose()
