"""The embedded engine's async client; it never blocks the event loop.

Plain calls of an event loop share one pipelined connection (the server
answers each connection's requests in order, so replies match requests by
position); each loop has its own, so one client may serve loops in several
threads. Each held lock or ``mutate`` has a connection of its own, because a
lock's owner is the connection that took it: at most ``max_connections`` at
once per loop, the others wait for one. Connecting runs in a thread, bounded by
``connect_timeout``; each reply is due within ``op_timeout``, checked by one
timer per connection rather than one per call.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import threading
import time
import weakref
from collections import deque
from typing import Any, cast

from ..._codec import PickleCodec, Raw
from ..._config import DEFAULT_MAX_CONNECTIONS, Config
from ..._errors import LockTimeout, StateError, StateUnavailable
from ..._near import NearCache
from .client import ENGINES, LOST, lock_slices, mutate_timeout, reply_wait
from .lifecycle import connect
from .near import near_cache
from .protocol import frame, frame_at, frame_size, request, result

_WATCHDOG = 0.5  # seconds between checks of a pipe's oldest deadline


class _Pipe(asyncio.BufferedProtocol):
    """A connection whose replies come back in the order of the requests.

    Replies are read into one buffer the pipe keeps (a buffered protocol):
    a plain protocol would have the transport allocate its 256 KiB read
    size on every reply, which the allocator maps and unmaps each time.
    """

    _CHUNK = 1 << 16

    def __init__(self) -> None:
        self._buf = bytearray(self._CHUNK)
        self._end = 0  # the bytes received are self._buf[:self._end]
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False
        self.lender: _Pipes | None = None  # whose slot a lock's connection holds
        self.sock: socket.socket | None = None  # to close it once its loop has ended

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()

    def get_buffer(self, sizehint: int) -> memoryview:
        buf, end = self._buf, self._end
        need = end + 4096
        if end >= 4:  # room for the whole of the frame being received
            need = max(need, frame_size(buf, 0, end))
        if need > len(buf):
            grown = bytearray(max(need, 2 * len(buf)))
            grown[:end] = buf[:end]
            self._buf = buf = grown
        return memoryview(buf)[end:]

    def buffer_updated(self, nbytes: int) -> None:
        buf = self._buf
        end = self._end = self._end + nbytes
        start = 0
        while (bounds := frame_at(buf, start, end)) is not None:
            first, start = bounds
            fut = self._waiters.popleft()
            if fut.done():  # its caller was cancelled or timed out
                continue
            try:
                fut.set_result(pickle.loads(memoryview(buf)[first:start]))  # noqa: S301 - authenticated server
            except Exception as exc:
                fut.set_exception(StateError(f"unreadable reply: {exc!r}"))
        if start:  # keep what is left of a frame at the front
            buf[: end - start] = buf[start:end]
            self._end = end - start
        if len(buf) > self._CHUNK and self._end == 0:  # a big reply has gone
            self._buf = bytearray(self._CHUNK)

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
        loop = cast(asyncio.AbstractEventLoop, self._loop)
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


class _Pipes:
    """The connections of one event loop (transports belong to the loop that made them)."""

    __slots__ = ("failed", "lent", "main", "opening", "slots", "spare")

    def __init__(self, size: int) -> None:
        self.main: _Pipe | None = None
        self.spare: list[_Pipe] = []
        self.opening = asyncio.Lock()
        # Connections lent to held locks and mutations (the main one aside).
        self.slots = asyncio.Semaphore(size)
        # Those lent now: a loop that ends while a task holds a lock (a task
        # never stopped) leaves them to _forget_ended_loops.
        self.lent: set[_Pipe] = set()
        # When the last attempt to open the main pipe failed, and why: callers
        # that queued behind it fail with it instead of each waiting anew.
        self.failed: tuple[float, StateUnavailable] | None = None

    def abort(self) -> None:
        for pipe in [self.main, *self.spare]:
            if pipe is not None:
                pipe.abort()
        self.main, self.spare = None, []


class AsyncEmbeddedEngine:
    """Async client; never blocks the event loop (connecting runs in a thread).

    One instance may serve several event loops, each in its own thread: each
    loop has its own connections, one pipelined for plain calls plus one per
    held lock or mutation, at most ``max_connections`` of those.
    """

    _SPARE = 8
    codec = PickleCodec()

    def __init__(self, config: Config) -> None:
        self._config = config
        self._size = config.max_connections or DEFAULT_MAX_CONNECTIONS
        self._reset()
        # Reads of the near cache's keys: no round trip while they are current.
        self.near: NearCache | None = near_cache(config, self.codec.decode)
        ENGINES.add(self)

    def _reset(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pipes] = (
            weakref.WeakKeyDictionary()
        )
        self._by_loop_mutex = threading.Lock()
        # The loop of the last call and its pipes, read as one tuple: the
        # common case (one loop) costs no lookup.
        self._last: tuple[asyncio.AbstractEventLoop, _Pipes] | None = None

    def _pipes(self) -> _Pipes:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        with self._by_loop_mutex:
            pipes = self._by_loop.get(loop)
            if pipes is None:
                self._forget_ended_loops()
                pipes = self._by_loop[loop] = _Pipes(self._size)
        self._last = (loop, pipes)
        return pipes

    def _forget_ended_loops(self) -> None:
        # Under _by_loop_mutex. A loop that ended without aclose() left its
        # connections open (and their server threads); its transports can no
        # longer close them, their sockets can.
        for loop in [loop for loop in self._by_loop if loop.is_closed()]:
            pipes = self._by_loop.pop(loop)
            for pipe in [pipes.main, *pipes.spare, *pipes.lent]:
                if pipe is not None and pipe.sock is not None:
                    pipe.closed = True
                    pipe.sock.close()

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
        try:
            if sock.family == socket.AF_UNIX:
                _, pipe = await loop.create_unix_connection(_Pipe, sock=sock)
            else:
                _, pipe = await loop.create_connection(_Pipe, sock=sock)
        except BaseException:
            # Cancelled (a task stopped at shutdown) or failed: close it here,
            # nothing else will.
            sock.close()
            raise
        pipe.sock = sock
        return pipe

    async def _main_pipe(self, pipes: _Pipes) -> _Pipe:
        asked = time.monotonic()
        async with pipes.opening:
            if pipes.main is None or pipes.main.closed:
                if pipes.failed is not None and pipes.failed[0] >= asked:
                    raise pipes.failed[1]
                try:
                    pipes.main = await self._open()
                except StateUnavailable as exc:
                    pipes.failed = (time.monotonic(), exc)
                    raise
            return pipes.main

    async def call(self, method: str, *args: Any) -> Any:
        """Run ``method(*args)`` on the store: one round trip, pipelined."""
        pipes = self._pipes()
        pipe = pipes.main
        if pipe is None or pipe.closed:
            pipe = await self._main_pipe(pipes)
        reply = await pipe.request(request(method, args), self._config.op_timeout)
        return result(reply, method)

    # One method per operation, as the AsyncEngine protocol has them.

    async def get(self, key: str) -> Raw | None:
        near = self.near
        # The state's get found no current value kept (see NearCache.read);
        # with no table (no listener yet, an older server), a plain get.
        if near is None or not key.startswith(near.prefixes) or (mark := near.mark(key)) is None:
            return await self.call("get", key)  # type: ignore[no-any-return]
        raw, deadline = await self.call("get_near", key)
        near.keep(key, mark, raw, deadline)
        return raw  # type: ignore[no-any-return]

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

    async def _checkout(self, wait: float | None) -> _Pipe | None:
        """A connection for a lock or a mutation, within this loop's
        ``max_connections``; None if none was free within ``wait`` seconds."""
        pipes = self._pipes()
        if pipes.slots.locked():
            try:
                await asyncio.wait_for(pipes.slots.acquire(), wait)
            except asyncio.TimeoutError:
                return None
        else:
            await pipes.slots.acquire()  # free: no wait (wait_for(..., 0) would time out)
        try:
            while pipes.spare:
                pipe = pipes.spare.pop()
                if not pipe.closed:
                    break
            else:
                pipe = await self._open()
            pipe.lender = pipes
            pipes.lent.add(pipe)
            return pipe
        except BaseException:
            pipes.slots.release()
            raise

    def _checkin(self, pipe: _Pipe) -> None:
        """Give back what ``_checkout`` lent (a broken or cancelled one is closed)."""
        pipes, pipe.lender = pipe.lender, None
        assert pipes is not None
        pipes.lent.discard(pipe)
        # Kept for the loop's next lock unless aclose() came meanwhile.
        if pipes is self._pipes() and not pipe.closed and len(pipes.spare) < self._SPARE:
            pipes.spare.append(pipe)
        else:
            pipe.abort()
        pipes.slots.release()

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

    async def _hold(
        self, method: str, name: str, timeout: float | None
    ) -> tuple[_Pipe, Any] | None:
        """Ask for a lock or a mutation in slices, on a connection of its own;
        None if not granted within ``timeout``."""
        started = time.monotonic()
        # Waiting for a connection is part of waiting for the lock.
        pipe = await self._checkout(timeout)
        if pipe is None:
            return None
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - started))
        op = self._config.op_timeout
        try:
            for wait in lock_slices(timeout, op):
                try:
                    value = await self._pinned(pipe, method, (name, wait), reply_wait(wait, op))
                except LockTimeout:
                    continue
                if method != "lock_acquire" or value:
                    return pipe, value
        except BaseException:
            self._checkin(pipe)
            raise
        self._checkin(pipe)
        return None

    async def _let_go(self, handle: _Pipe, method: str, args: tuple[Any, ...]) -> None:
        try:
            await self._pinned(handle, method, args, self._config.op_timeout)
        finally:
            self._checkin(handle)

    async def lock_acquire(self, name: str, timeout: float | None) -> _Pipe | None:
        held = await self._hold("lock_acquire", name, timeout)
        return None if held is None else held[0]

    async def lock_release(self, handle: _Pipe, name: str) -> None:
        await self._let_go(handle, "lock_release", (name,))

    async def mutate_begin(self, key: str, timeout: float | None) -> tuple[_Pipe, Any]:
        held = await self._hold("mutate_begin", key, timeout)
        if held is None:
            raise mutate_timeout(key, timeout)
        return held

    async def mutate_end(self, handle: _Pipe, key: str, value: Any, commit: bool) -> None:
        await self._let_go(handle, "mutate_end", (key, value, commit))

    async def subscribe(self, channels: list[str]) -> _Pipe:
        pipe = await self._open()
        await self._pinned(pipe, "subscribe", (channels,), self._config.op_timeout)
        return pipe

    async def receive(self, handle: _Pipe, timeout: float) -> list[tuple[str, Any]]:
        wait = reply_wait(timeout, self._config.op_timeout)
        return list(await self._pinned(handle, "receive", (timeout,), wait))

    async def unsubscribe(self, handle: _Pipe) -> None:
        handle.abort()

    async def aclose(self) -> None:
        """Close this event loop's connections (each loop closes its own, since
        transports belong to their loop); the next call opens new ones."""
        loop = asyncio.get_running_loop()
        with self._by_loop_mutex:
            pipes = self._by_loop.pop(loop, None)
            last = self._last
            if last is not None and last[0] is loop:
                self._last = None
        if pipes is not None:
            pipes.abort()

    def _after_fork(self) -> None:
        self._reset()
