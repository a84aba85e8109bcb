"""Where the counts live: one shared state, or (naive mode) each worker's own."""

from __future__ import annotations

import asyncio
from typing import Protocol

from shared_core import AsyncSharedState


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
