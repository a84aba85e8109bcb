"""Broadcast: one ``publish`` reaches every subscribed worker.

Delivery: each subscriber that is subscribed when a message is published
receives it once, in publish order. A subscriber whose connection breaks
reconnects by itself; what was published while it was away is not delivered
(at most once). Keep the truth in the state and use messages as a nudge: on
``on_connect`` (after every (re)subscribe), catch up from the state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from ._codec import Codec
from ._errors import StateError, StateUnavailable
from .engines import AsyncEngine, Engine

log = logging.getLogger("shared_core.broadcast")

_WAIT = 1.0  # seconds one receive() may wait on the server
_MAX_BACKOFF = 2.0

Message = tuple[str, Any]


class Subscription:
    """Delivers messages to ``callback(channel, message)`` on a background thread.

    Made by :meth:`SharedState.subscribe`; ``close()`` stops it. The thread
    does not survive ``fork``: subscribe in each worker, not before the fork.
    """

    def __init__(
        self,
        engine: Engine,
        codec: Codec,
        channels: list[str],
        callback: Callable[[str, Any], None],
        on_connect: Callable[[], None] | None,
        timeout: float,
    ) -> None:
        self._engine, self._codec, self.channels = engine, codec, channels
        self._callback, self._on_connect = callback, on_connect
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"shared_core subscriber {channels}"
        )
        self._thread.start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise StateUnavailable(f"could not subscribe to {channels}: {self._error}")

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            handle = None
            try:
                handle = self._engine.subscribe(self.channels)
                self._subscribed.set()
                backoff = 0.05
                if self._on_connect is not None:
                    self._safely(self._on_connect)
                while not self._stop.is_set():
                    for channel, raw in self._engine.receive(handle, _WAIT):
                        self._deliver(channel, self._codec.decode(raw))
            except StateError as exc:
                self._error = exc
                log.warning("subscription to %s broke, resubscribing: %s", self.channels, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            finally:
                if handle is not None:
                    self._engine.unsubscribe(handle)

    def _deliver(self, channel: str, message: Any) -> None:
        try:
            self._callback(channel, message)
        except Exception:
            log.exception("a subscriber callback failed")

    @staticmethod
    def _safely(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("a subscriber callback failed")

    def close(self, timeout: float = 5.0) -> None:
        """Stop receiving; waits for the thread up to ``timeout`` seconds."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class AsyncSubscription:
    """An async iterator of ``(channel, message)``; use it with ``async with``.

    Made by :meth:`AsyncSharedState.subscribe`. It resubscribes by itself
    when its connection breaks, awaiting ``on_connect`` after each subscribe.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        codec: Codec,
        channels: list[str],
        on_connect: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._engine, self._codec, self.channels = engine, codec, channels
        self._on_connect = on_connect
        self._handle: Any = None
        self._pending: deque[Message] = deque()
        self._closed = False

    async def start(self) -> AsyncSubscription:
        """Subscribe now (``async with`` does it); StateUnavailable if it cannot."""
        self._handle = await self._engine.subscribe(self.channels)
        if self._on_connect is not None:
            try:
                await self._on_connect()
            except BaseException:
                # Out of ``async with`` (failed or cancelled), whose exit will
                # not run: close the connection here, or it leaks.
                await self._drop()
                raise
        return self

    async def __aenter__(self) -> AsyncSubscription:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Message:
        backoff = 0.05
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            try:
                if self._handle is None:
                    await self.start()
                    backoff = 0.05
                batch = await self._engine.receive(self._handle, _WAIT)
            except StateError as exc:
                log.warning("subscription to %s broke, resubscribing: %s", self.channels, exc)
                await self._drop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            self._pending.extend((c, self._codec.decode(raw)) for c, raw in batch)
        return self._pending.popleft()

    async def _drop(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                await self._engine.unsubscribe(handle)
            except Exception:  # already broken
                log.debug("unsubscribe of a broken subscription failed", exc_info=True)

    async def aclose(self) -> None:
        """Stop receiving and close the connection."""
        self._closed = True
        await self._drop()
