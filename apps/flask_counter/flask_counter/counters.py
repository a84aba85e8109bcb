"""Where the counts live: one shared state, or (naive mode) each worker's own."""

from __future__ import annotations

import time
from typing import Protocol

from shared_core import SharedState


class Counters(Protocol):
    def incr(self, key: str, by: int) -> int: ...
    def get(self, key: str) -> int: ...
    def reset(self, key: str) -> None: ...
    def ping(self) -> None: ...


class SharedCounters:
    """Counts in the shared state: one atomic ``incr`` on the state server."""

    def __init__(self, state: SharedState) -> None:
        self.state = state

    def incr(self, key: str, by: int) -> int:
        return self.state.incr(f"count:{key}", by)

    def get(self, key: str) -> int:
        return int(self.state.get(f"count:{key}", 0))

    def reset(self, key: str) -> None:
        self.state.set(f"count:{key}", 0)

    def ping(self) -> None:
        self.state.get("count:counter")


class NaiveCounters:
    """The bug, kept on purpose: a global per worker, read and written apart."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def incr(self, key: str, by: int) -> int:
        value = self.counts.get(key, 0) + by
        time.sleep(0)  # let another thread in between the read and the write
        self.counts[key] = value
        return value

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)

    def reset(self, key: str) -> None:
        self.counts[key] = 0

    def ping(self) -> None:
        pass
