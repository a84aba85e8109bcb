"""The embedded engine's sync client: one request, one reply, one round trip.

It speaks the protocol of ``protocol.py`` to the store the server registers
at a fixed id, with no proxies in between (a proxy made before a fork shares
its socket with the child; CPython issue 101320). One connection per thread,
forgotten in a forked child. Every wait has a deadline: ``connect_timeout``
to connect, ``op_timeout`` for each reply (a lock's wait is cut into slices
of at most ``op_timeout``, so a frozen server is noticed there too).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any, Protocol

from ..._codec import PickleCodec, Raw
from ..._config import Config
from ..._errors import LockTimeout, StateUnavailable
from .lifecycle import connect
from .protocol import request, result, set_timeouts

LOST = "connection to the state server lost"


def lock_slices(timeout: float | None, op_timeout: float) -> Iterator[float]:
    """Split a lock wait into waits of at most ``op_timeout`` each.

    Each slice is one request whose reply is due within slice + op_timeout,
    so a frozen server is noticed even by a lock that waits for ever.
    """
    step = op_timeout
    if timeout is None:
        while True:
            yield step
    deadline = time.monotonic() + timeout
    while True:
        remaining = max(0.0, deadline - time.monotonic())
        yield min(step, remaining)
        if remaining <= step:
            return


def reply_wait(wait: float, op_timeout: float) -> float:
    return wait + op_timeout


def mutate_timeout(key: str, timeout: float | None) -> LockTimeout:
    return LockTimeout(f"mutate({key!r}): another mutation held it for {timeout}s")


class EmbeddedEngine:
    """Sync client; safe to share between threads and across fork."""

    codec = PickleCodec()

    def __init__(self, config: Config) -> None:
        self._config = config
        self._local = threading.local()
        self._conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        ENGINES.add(self)

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
        except BlockingIOError as exc:
            # The server stopped reading (frozen): it has at most part of it.
            self._drop(conn)
            raise StateUnavailable("the state server did not take the request in time") from exc
        except OSError:
            # The server never read it (it is gone): resend on a new connection.
            self._drop(conn)
            conn = self._connection()
            try:
                conn.send(request)
            except OSError as exc:
                self._drop(conn)
                raise StateUnavailable(f"{LOST}: {exc}") from exc
        return conn

    def _reply(self, conn: Connection, method: str) -> Any:
        try:
            reply = conn.recv()
        except (OSError, EOFError) as exc:
            self._drop(conn)
            if isinstance(exc, BlockingIOError):
                raise StateUnavailable(f"no reply to {method} in time") from exc
            raise StateUnavailable(f"{LOST} during {method}: {exc!r}") from exc
        return result(reply, method)

    def _reply_within(self, conn: Connection, method: str, wait: float) -> Any:
        """Wait ``wait`` seconds for a reply (a lock slice and more), not ``op_timeout``."""
        set_timeouts(conn.fileno(), wait)
        value = self._reply(conn, method)
        set_timeouts(conn.fileno(), self._config.op_timeout)
        return value

    def call(self, method: str, *args: Any) -> Any:
        """Run ``method(*args)`` on the store: one round trip."""
        conn = self._send(request(method, args))
        return self._reply(conn, method)

    # One method per operation, as the Engine protocol has them.

    def get(self, key: str) -> Raw | None:
        return self.call("get", key)  # type: ignore[no-any-return]

    def get_versioned(self, key: str) -> tuple[Raw | None, int | None]:
        return self.call("get_versioned", key)  # type: ignore[no-any-return]

    def get_many(self, keys: list[str]) -> dict[str, Raw]:
        return self.call("get_many", keys)  # type: ignore[no-any-return]

    def set(self, key: str, raw: Raw, ttl: float | None) -> None:
        self.call("set", key, raw, ttl)

    def set_many(self, items: dict[str, Raw], ttl: float | None) -> None:
        self.call("set_many", items, ttl)

    def set_if_version(self, key: str, raw: Raw, version: int | None, ttl: float | None) -> bool:
        return bool(self.call("set_if_version", key, raw, version, ttl))

    def add(self, key: str, raw: Raw, ttl: float | None) -> bool:
        return bool(self.call("add", key, raw, ttl))

    def delete(self, key: str) -> bool:
        return bool(self.call("delete", key))

    def delete_many(self, keys: list[str]) -> int:
        return int(self.call("delete_many", keys))

    def incr(self, key: str, amount: int, ttl: float | None) -> int:
        return int(self.call("incr", key, amount, ttl))

    def setdefault(self, key: str, raw: Raw) -> Raw:
        return self.call("setdefault", key, raw)  # type: ignore[no-any-return]

    def expire(self, key: str, ttl: float | None) -> bool:
        return bool(self.call("expire", key, ttl))

    def ttl(self, key: str) -> float | None:
        return self.call("ttl", key)  # type: ignore[no-any-return]

    def keys(self, prefix: str) -> list[str]:
        return list(self.call("keys", prefix))

    def clear(self, prefix: str) -> int:
        return int(self.call("clear", prefix))

    def secret(self, name: str, nbytes: int) -> str:
        return str(self.call("secret", name, nbytes))

    def rotate_secret(self, name: str, nbytes: int) -> str:
        return str(self.call("rotate_secret", name, nbytes))

    def publish(self, channel: str, raw: Raw) -> int:
        return int(self.call("publish", channel, raw))

    def info(self) -> dict[str, Any]:
        return dict(self.call("info"))

    # Locks and mutations are owned by the connection that took them.

    def _call_on(self, handle: Connection, method: str, *args: Any) -> Any:
        if getattr(self._local, "conn", None) is not handle:
            raise StateUnavailable(f"{LOST} while a lock was held; it was released")
        try:
            handle.send(request(method, args))
        except OSError as exc:
            self._drop(handle)
            raise StateUnavailable(f"{LOST} while a lock was held: {exc}") from exc
        return self._reply(handle, method)

    def lock_acquire(self, name: str, timeout: float | None) -> Connection | None:
        op = self._config.op_timeout
        for wait in lock_slices(timeout, op):
            conn = self._send(request("lock_acquire", (name, wait)))
            if self._reply_within(conn, "lock_acquire", reply_wait(wait, op)):
                return conn
        return None

    def lock_release(self, handle: Connection, name: str) -> None:
        self._call_on(handle, "lock_release", name)

    def mutate_begin(self, key: str, timeout: float | None) -> tuple[Connection, Any]:
        op = self._config.op_timeout
        for wait in lock_slices(timeout, op):
            conn = self._send(request("mutate_begin", (key, wait)))
            try:
                return conn, self._reply_within(conn, "mutate_begin", reply_wait(wait, op))
            except LockTimeout:
                continue
        raise mutate_timeout(key, timeout)

    def mutate_end(self, handle: Connection, key: str, value: Any, commit: bool) -> None:
        self._call_on(handle, "mutate_end", key, value, commit)

    # Broadcast: a subscriber has a connection of its own, since receive()
    # waits on the server for messages.

    def subscribe(self, channels: list[str]) -> Connection:
        conn = connect(self._config)
        try:
            conn.send(request("subscribe", (channels,)))
            result(conn.recv(), "subscribe")
        except (OSError, EOFError) as exc:
            conn.close()
            raise StateUnavailable(f"{LOST} during subscribe: {exc!r}") from exc
        return conn

    def receive(self, handle: Connection, timeout: float) -> list[tuple[str, Any]]:
        try:
            handle.send(request("receive", (timeout,)))
            if not handle.poll(reply_wait(timeout, self._config.op_timeout)):
                raise TimeoutError("no answer to receive() in time")
            return list(result(handle.recv(), "receive"))
        except (OSError, EOFError) as exc:
            handle.close()
            raise StateUnavailable(f"{LOST} during receive: {exc!r}") from exc

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


class _ForkAware(Protocol):
    def _after_fork(self) -> None: ...


# Every client of this process, so that a forked child forgets their
# connections (they are the parent's) instead of sharing them.
ENGINES: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for engine in list(ENGINES):
        engine._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
