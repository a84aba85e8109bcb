"""Where the counts live: one shared state, or (naive mode) each worker's own."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from shared_core import AsyncSharedState

from .settings import APP_NAME, Settings


class Counters(Protocol):
    async def incr(self, key: str, by: int) -> int: ...
    async def get(self, key: str) -> int: ...
    async def reset(self, key: str) -> None: ...
    async def ping(self) -> None: ...


class SharedCounters:
    """Counts in the shared state: one atomic ``incr`` on the state server."""

    def __init__(self, state: AsyncSharedState) -> None:
        self.state = state

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


@asynccontextmanager
async def attach_counters(
    settings: Settings,
) -> AsyncIterator[tuple[Counters, Callable[[], Awaitable[str]]]]:
    """Yield the counters, and how to get the session secret, for one worker's life."""
    if settings.mode == "naive":
        # The bug of seed 004: every worker makes up its own key.
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
