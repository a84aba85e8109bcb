"""Clients of the manager engine: one request, one reply, one round trip.

They speak the ``multiprocessing.managers`` protocol to the store object the
server registers at a fixed id, with no proxies in between (a proxy made
before a fork shares its socket with the child; CPython issue 101320).

Sync: one connection per thread, forgotten in a forked child.
Async: one pipelined connection for plain calls (the server answers each
connection's requests in order), plus a dedicated connection for each held
lock or ``mutate``, because a lock's owner is the connection that took it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import select
import socket
import struct
import threading
import weakref
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, cast

from ._codec import PickleCodec
from ._config import Config
from ._errors import StateError, StateUnavailable
from ._lifecycle import connect
from ._server import STORE_ID

_LOST = "connection to the state server lost"
_WATCHDOG = 0.5  # seconds between checks of a pipe's oldest deadline


def decode(reply: Any, method: str) -> Any:
    """Return the result of a manager reply, or raise the error it carries."""
    kind, result = reply
    if kind == "#RETURN":
        return result
    if kind == "#ERROR":
        raise result
    raise StateError(f"{method} failed in the state server:\n{result}")


def _lock_wait(timeout: float | None, op_timeout: float | None) -> float | None:
    if timeout is None or op_timeout is None:
        return None
    return timeout + op_timeout


class ManagerEngine:
    """Sync client; safe to share between threads and across fork."""

    codec = PickleCodec()

    def __init__(self, config: Config) -> None:
        self._config = config
        self._local = threading.local()
        self._conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        _ENGINES.add(self)

    def _connection(self) -> Connection:
        local = self._local
        conn: Connection | None = getattr(local, "conn", None)
        if conn is not None:
            if not local.poller.poll(0):
                return conn
            # Readable before we asked anything: the server closed it (it
            # died or restarted), so a request sent now would be lost.
            self._drop(conn)
        conn = connect(self._config)
        _set_recv_timeout(conn, self._config.op_timeout)
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        local.conn, local.poller = conn, poller
        self._conns.add(conn)
        return conn

    def _drop(self, conn: Connection) -> None:
        if getattr(self._local, "conn", None) is conn:
            del self._local.conn
        self._conns.discard(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def _send(self, request: tuple[Any, ...]) -> Connection:
        conn = self._connection()
        try:
            conn.send(request)
        except OSError:
            # The server never read it (it is gone): resend on a new connection.
            self._drop(conn)
            conn = self._connection()
            try:
                conn.send(request)
            except OSError as exc:
                self._drop(conn)
                raise StateUnavailable(f"{_LOST}: {exc}") from exc
        return conn

    def _reply(self, conn: Connection, method: str) -> Any:
        try:
            reply = conn.recv()
        except (OSError, EOFError) as exc:
            self._drop(conn)
            if isinstance(exc, BlockingIOError):
                raise StateUnavailable(f"no reply to {method} in time") from exc
            raise StateUnavailable(f"{_LOST} during {method}: {exc!r}") from exc
        return decode(reply, method)

    def _reply_within(self, conn: Connection, method: str, wait: float | None) -> Any:
        """Wait ``wait`` seconds (None: forever) for a reply, not ``op_timeout``."""
        _set_recv_timeout(conn, wait)
        result = self._reply(conn, method)
        _set_recv_timeout(conn, self._config.op_timeout)
        return result

    def call(self, method: str, *args: Any) -> Any:
        conn = self._send((STORE_ID, method, args, {}))
        return self._reply(conn, method)

    # Locks and mutations are owned by the connection that took them.

    def _call_on(self, handle: Connection, method: str, *args: Any) -> Any:
        if getattr(self._local, "conn", None) is not handle:
            raise StateUnavailable(f"{_LOST} while a lock was held; it was released")
        try:
            handle.send((STORE_ID, method, args, {}))
        except OSError as exc:
            self._drop(handle)
            raise StateUnavailable(f"{_LOST} while a lock was held: {exc}") from exc
        return self._reply(handle, method)

    def lock_acquire(self, name: str, timeout: float | None) -> Connection | None:
        conn = self._send((STORE_ID, "lock_acquire", (name, timeout), {}))
        wait = _lock_wait(timeout, self._config.op_timeout)
        return conn if self._reply_within(conn, "lock_acquire", wait) else None

    def lock_release(self, handle: Connection, name: str) -> None:
        self._call_on(handle, "lock_release", name)

    def mutate_begin(self, key: str, timeout: float | None) -> tuple[Connection, Any]:
        conn = self._send((STORE_ID, "mutate_begin", (key, timeout), {}))
        wait = _lock_wait(timeout, self._config.op_timeout)
        return conn, self._reply_within(conn, "mutate_begin", wait)

    def mutate_end(self, handle: Connection, key: str, value: Any, commit: bool) -> None:
        self._call_on(handle, "mutate_end", key, value, commit)

    # Broadcast: a subscriber has a connection of its own, since receive()
    # waits on the server for messages.

    def subscribe(self, channels: list[str]) -> Connection:
        conn = connect(self._config)
        try:
            conn.send((STORE_ID, "subscribe", (channels,), {}))
            decode(conn.recv(), "subscribe")
        except (OSError, EOFError) as exc:
            conn.close()
            raise StateUnavailable(f"{_LOST} during subscribe: {exc!r}") from exc
        return conn

    def receive(self, handle: Connection, timeout: float) -> list[tuple[str, Any]]:
        try:
            handle.send((STORE_ID, "receive", (timeout,), {}))
            wait = timeout + (self._config.op_timeout or 0)
            if wait and not handle.poll(wait):
                raise TimeoutError("no answer to receive()")
            return list(decode(handle.recv(), "receive"))
        except (OSError, EOFError) as exc:
            handle.close()
            raise StateUnavailable(f"{_LOST} during receive: {exc!r}") from exc

    def unsubscribe(self, handle: Connection) -> None:
        handle.close()

    def close(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)
        self._local = threading.local()

    def _after_fork(self) -> None:
        # Close only this process's copies of the parent's sockets.
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.close()
        self._conns = weakref.WeakSet()
        self._local = threading.local()


def _set_recv_timeout(conn: Connection, seconds: float | None) -> None:
    # A kernel receive timeout costs nothing per call, unlike a poll() before
    # each read; an expired one makes the read fail with EAGAIN.
    sec = int(seconds or 0)
    usec = int(((seconds or 0) - sec) * 1_000_000)
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
    finally:
        sock.detach()


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
        while len(buf) >= 4:
            (size,) = struct.unpack_from("!i", buf)
            start = 4
            if size == -1:  # frames over 2 GiB carry an 8-byte size
                if len(buf) < 12:
                    return
                (size,) = struct.unpack_from("!Q", buf, 4)
                start = 12
            end = start + size
            if len(buf) < end:
                return
            payload = buf[start:end]
            del buf[:end]
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
                fut.set_exception(StateUnavailable(f"{_LOST}: {exc or 'closed'}"))

    def request(self, request: tuple[Any, ...], timeout: float | None) -> asyncio.Future[Any]:
        if self.closed or self._transport is None:
            raise StateUnavailable(_LOST)
        data = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
        size = len(data)
        header = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        self._transport.write(header + data)
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


class AsyncManagerEngine:
    """Async client; never blocks the event loop (connecting runs in a thread)."""

    _SPARE = 8
    codec = PickleCodec()

    def __init__(self, config: Config) -> None:
        self._config = config
        self._reset()
        _ENGINES.add(self)

    def _reset(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: _Pipe | None = None
        self._spare: list[_Pipe] = []
        self._opening: asyncio.Lock | None = None

    async def _open(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(None, connect, self._config)
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
        async with self._opening:
            if self._main is None or self._main.closed:
                self._main = await self._open()
            return self._main

    async def call(self, method: str, *args: Any) -> Any:
        pipe = self._main
        if pipe is None or pipe.closed or self._loop is not asyncio.get_running_loop():
            pipe = await self._main_pipe()
        reply = await pipe.request((STORE_ID, method, args, {}), self._config.op_timeout)
        return decode(reply, method)

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
            return decode(await pipe.request((STORE_ID, method, args, {}), wait), method)
        except BaseException as exc:
            if isinstance(exc, StateUnavailable) or not isinstance(exc, Exception):
                # Broken or cancelled mid-call: the server frees what it holds.
                pipe.abort()
            raise

    async def lock_acquire(self, name: str, timeout: float | None) -> _Pipe | None:
        pipe = await self._checkout()
        wait = _lock_wait(timeout, self._config.op_timeout)
        if await self._pinned(pipe, "lock_acquire", (name, timeout), wait):
            return pipe
        self._checkin(pipe)
        return None

    async def lock_release(self, handle: _Pipe, name: str) -> None:
        await self._pinned(handle, "lock_release", (name,), self._config.op_timeout)
        self._checkin(handle)

    async def mutate_begin(self, key: str, timeout: float | None) -> tuple[_Pipe, Any]:
        pipe = await self._checkout()
        wait = _lock_wait(timeout, self._config.op_timeout)
        try:
            value = await self._pinned(pipe, "mutate_begin", (key, timeout), wait)
        except StateError:
            self._checkin(pipe)
            raise
        return pipe, value

    async def mutate_end(self, handle: _Pipe, key: str, value: Any, commit: bool) -> None:
        await self._pinned(handle, "mutate_end", (key, value, commit), self._config.op_timeout)
        self._checkin(handle)

    async def subscribe(self, channels: list[str]) -> _Pipe:
        await self._main_pipe()  # binds to this loop
        pipe = await self._open()
        await self._pinned(pipe, "subscribe", (channels,), self._config.op_timeout)
        return pipe

    async def receive(self, handle: _Pipe, timeout: float) -> list[tuple[str, Any]]:
        wait = timeout + (self._config.op_timeout or 0)
        return list(await self._pinned(handle, "receive", (timeout,), wait or None))

    async def unsubscribe(self, handle: _Pipe) -> None:
        handle.abort()

    async def aclose(self) -> None:
        for pipe in [self._main, *self._spare]:
            if pipe is not None:
                pipe.abort()
        self._reset()

    def _after_fork(self) -> None:
        self._reset()


_ENGINES: weakref.WeakSet[ManagerEngine | AsyncManagerEngine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for engine in list(_ENGINES):
        engine._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
