"""Retrying until a deadline, with exponential backoff: one helper for every loop."""

from __future__ import annotations

import asyncio
import time


class Backoff:
    """Delays between tries that double from ``first`` up to ``cap``,
    never past ``deadline`` (a ``time.monotonic()`` value; None: no deadline)::

        retry = Backoff(deadline)
        while True:
            try:
                return attempt()
            except OSError:
                if not retry.sleep():
                    raise
    """

    __slots__ = ("cap", "deadline", "delay")

    def __init__(self, deadline: float | None, first: float = 0.01, cap: float = 0.25) -> None:
        self.deadline, self.delay, self.cap = deadline, first, cap

    def _next(self) -> float | None:
        delay = self.delay
        if self.deadline is not None and time.monotonic() + delay > self.deadline:
            return None
        self.delay = min(delay * 2, self.cap)
        return delay

    def sleep(self) -> bool:
        """Wait before the next try; False (at once) when none fits before the deadline."""
        delay = self._next()
        if delay is None:
            return False
        time.sleep(delay)
        return True

    async def asleep(self) -> bool:
        """The async twin of :meth:`sleep`."""
        delay = self._next()
        if delay is None:
            return False
        await asyncio.sleep(delay)
        return True
