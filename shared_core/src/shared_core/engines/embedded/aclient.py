"""The embedded engine's async client; it never blocks the event loop.

Plain calls share one pipelined connection (the server answers each
connection's requests in order, so replies match requests by position);
each held lock or ``mutate`` has a connection of its own, because a lock's
owner is the connection that took it. Connecting runs in a thread, bounded by
``connect_timeout``; each reply is due within ``op_timeout``, checked by one
timer per connection rather than one per call.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import time
from collections import deque
from typing import Any, cast

from ..._codec import PickleCodec, Raw
from ..._config import Config
from ..._errors import LockTimeout, StateError, StateUnavailable
from .client import ENGINES, LOST, lock_slices, mutate_timeout, reply_wait
from .lifecycle import connect
from .protocol import frame, request, result, unframe

_WATCHDOG = 0.5  # seconds between checks of a pipe's oldest deadline


class _Pipe(asyncio.Protocol):
    """A connection whose replies come back in the order of the requests."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self._deadlines: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while (payload := unframe(buf)) is not None:
            fut = self._waiters.popleft()
            if fut.done():  # its caller was cancelled or timed out
                continue
            try:
                fut.set_result(pickle.loads(payload))  # noqa: S301 - authenticated server
            except Exception as exc:
                fut.set_exception(StateError(f"unreadable reply: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(StateUnavailable(f"{LOST}: {exc or 'closed'}"))

    def request(self, request: tuple[Any, ...], timeout: float | None) -> asyncio.Future[Any]:
        if self.closed or self._transport is None:
            raise StateUnavailable(LOST)
        self._transport.write(frame(request))
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters.append(fut)
        if timeout is not None:
            self._deadlines.append((fut, loop.time() + timeout))
            if self._watchdog is None:
                self._watchdog = loop.call_later(_WATCHDOG, self._watch)
        return fut

    def _watch(self) -> None:
        # One timer per connection, not one per call: replies come in order,
        # so only the oldest pending deadline can have passed first.
        self._watchdog = None
        deadlines = self._deadlines
        now = asyncio.get_running_loop().time()
        while deadlines and deadlines[0][0].done():
            deadlines.popleft()
        if deadlines and deadlines[0][1] <= now:
            fut = deadlines[0][0]
            fut.set_exception(StateUnavailable("no reply from the state server in time"))
            self.abort()  # later replies could no longer be matched
            return
        if deadlines and not self.closed:
            self._watchdog = asyncio.get_running_loop().call_later(_WATCHDOG, self._watch)

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


class AsyncEmbeddedEngine:
    """Async client; never blocks the event loop (connecting runs in a thread)."""

    _SPARE = 8
    codec = PickleCodec()

    def __init__(self, config: Config) -> None:
        self._config = config
        self._reset()
        ENGINES.add(self)

    def _reset(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: _Pipe | None = None
        self._spare: list[_Pipe] = []
        self._opening: asyncio.Lock | None = None
        # When the last attempt to open the main pipe failed, and why: callers
        # that queued behind it fail with it instead of each waiting anew.
        self._failed: tuple[float, StateUnavailable] | None = None

    async def _open(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        # connect() is bounded by connect_timeout; the extra second covers an
        # executor whose threads are all busy, so the caller's wait is bounded too.
        bound = self._config.connect_timeout + 1.0
        try:
            conn = await asyncio.wait_for(loop.run_in_executor(None, connect, self._config), bound)
        except asyncio.TimeoutError:
            raise StateUnavailable(f"could not connect within {bound:g}s") from None
        try:
            sock = socket.socket(fileno=os.dup(conn.fileno()))
        finally:
            conn.close()
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            _, pipe = await loop.create_unix_connection(_Pipe, sock=sock)
        else:
            _, pipe = await loop.create_connection(_Pipe, sock=sock)
        return pipe

    async def _main_pipe(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Transports belong to the loop that made them.
            self._reset()
            self._loop = loop
        if self._opening is None:
            self._opening = asyncio.Lock()
        asked = time.monotonic()
        async with self._opening:
            if self._main is None or self._main.closed:
                if self._failed is not None and self._failed[0] >= asked:
                    raise self._failed[1]
                try:
                    self._main = await self._open()
                except StateUnavailable as exc:
                    self._failed = (time.monotonic(), exc)
                    raise
            return self._main

    async def call(self, method: str, *args: Any) -> Any:
        """Run ``method(*args)`` on the store: one round trip, pipelined."""
        pipe = self._main
        if pipe is None or pipe.closed or self._loop is not asyncio.get_running_loop():
            pipe = await self._main_pipe()
        reply = await pipe.request(request(method, args), self._config.op_timeout)
        return result(reply, method)

    # One method per operation, as the AsyncEngine protocol has them.

    async def get(self, key: str) -> Raw | None:
        return await self.call("get", key)  # type: ignore[no-any-return]

    async def get_versioned(self, key: str) -> tuple[Raw | None, int | None]:
        return await self.call("get_versioned", key)  # type: ignore[no-any-return]

    async def get_many(self, keys: list[str]) -> dict[str, Raw]:
        return await self.call("get_many", keys)  # type: ignore[no-any-return]

    async def set(self, key: str, raw: Raw, ttl: float | None) -> None:
        await self.call("set", key, raw, ttl)

    async def set_many(self, items: dict[str, Raw], ttl: float | None) -> None:
        await self.call("set_many", items, ttl)

    async def set_if_version(
        self, key: str, raw: Raw, version: int | None, ttl: float | None
    ) -> bool:
        return bool(await self.call("set_if_version", key, raw, version, ttl))

    async def add(self, key: str, raw: Raw, ttl: float | None) -> bool:
        return bool(await self.call("add", key, raw, ttl))

    async def delete(self, key: str) -> bool:
        return bool(await self.call("delete", key))

    async def delete_many(self, keys: list[str]) -> int:
        return int(await self.call("delete_many", keys))

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        return int(await self.call("incr", key, amount, ttl))

    async def setdefault(self, key: str, raw: Raw) -> Raw:
        return await self.call("setdefault", key, raw)  # type: ignore[no-any-return]

    async def expire(self, key: str, ttl: float | None) -> bool:
        return bool(await self.call("expire", key, ttl))

    async def ttl(self, key: str) -> float | None:
        return await self.call("ttl", key)  # type: ignore[no-any-return]

    async def keys(self, prefix: str) -> list[str]:
        return list(await self.call("keys", prefix))

    async def clear(self, prefix: str) -> int:
        return int(await self.call("clear", prefix))

    async def secret(self, name: str, nbytes: int) -> str:
        return str(await self.call("secret", name, nbytes))

    async def rotate_secret(self, name: str, nbytes: int) -> str:
        return str(await self.call("rotate_secret", name, nbytes))

    async def publish(self, channel: str, raw: Raw) -> int:
        return int(await self.call("publish", channel, raw))

    async def info(self) -> dict[str, Any]:
        return dict(await self.call("info"))

    async def _checkout(self) -> _Pipe:
        await self._main_pipe()  # binds to this loop
        while self._spare:
            pipe = self._spare.pop()
            if not pipe.closed:
                return pipe
        return await self._open()

    def _checkin(self, pipe: _Pipe) -> None:
        if not pipe.closed and len(self._spare) < self._SPARE:
            self._spare.append(pipe)
        else:
            pipe.abort()

    async def _pinned(
        self, pipe: _Pipe, method: str, args: tuple[Any, ...], wait: float | None
    ) -> Any:
        try:
            return result(await pipe.request(request(method, args), wait), method)
        except BaseException as exc:
            if isinstance(exc, StateUnavailable) or not isinstance(exc, Exception):
                # Broken or cancelled mid-call: the server frees what it holds.
                pipe.abort()
            raise

    async def lock_acquire(self, name: str, timeout: float | None) -> _Pipe | None:
        pipe = await self._checkout()
        op = self._config.op_timeout
        for wait in lock_slices(timeout, op):
            if await self._pinned(pipe, "lock_acquire", (name, wait), reply_wait(wait, op)):
                return pipe
        self._checkin(pipe)
        return None

    async def lock_release(self, handle: _Pipe, name: str) -> None:
        await self._pinned(handle, "lock_release", (name,), self._config.op_timeout)
        self._checkin(handle)

    async def mutate_begin(self, key: str, timeout: float | None) -> tuple[_Pipe, Any]:
        pipe = await self._checkout()
        op = self._config.op_timeout
        for wait in lock_slices(timeout, op):
            try:
                value = await self._pinned(pipe, "mutate_begin", (key, wait), reply_wait(wait, op))
            except LockTimeout:
                continue
            except StateError:
                self._checkin(pipe)
                raise
            return pipe, value
        self._checkin(pipe)
        raise mutate_timeout(key, timeout)

    async def mutate_end(self, handle: _Pipe, key: str, value: Any, commit: bool) -> None:
        await self._pinned(handle, "mutate_end", (key, value, commit), self._config.op_timeout)
        self._checkin(handle)

    async def subscribe(self, channels: list[str]) -> _Pipe:
        await self._main_pipe()  # binds to this loop
        pipe = await self._open()
        await self._pinned(pipe, "subscribe", (channels,), self._config.op_timeout)
        return pipe

    async def receive(self, handle: _Pipe, timeout: float) -> list[tuple[str, Any]]:
        wait = reply_wait(timeout, self._config.op_timeout)
        return list(await self._pinned(handle, "receive", (timeout,), wait))

    async def unsubscribe(self, handle: _Pipe) -> None:
        handle.abort()

    async def aclose(self) -> None:
        for pipe in [self._main, *self._spare]:
            if pipe is not None:
                pipe.abort()
        self._reset()

    def _after_fork(self) -> None:
        self._reset()
