"""The embedded engine's sync client: one request, one reply, one round trip.

It speaks the protocol of ``protocol.py`` to the store the server registers
at a fixed id, with no proxies in between (a proxy made before a fork shares
its socket with the child; CPython issue 101320). The threads of a process
share a pool of at most ``max_connections`` connections (the server runs a
thread per connection, and a round trip is too short for more to help), which
a forked child forgets. Every wait has a deadline: ``connect_timeout``
to connect, ``op_timeout`` for each reply (a lock's wait is cut into slices
of at most ``op_timeout``, so a frozen server is noticed there too).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any, Protocol

from ..._codec import PickleCodec, Raw
from ..._config import DEFAULT_MAX_CONNECTIONS, Config
from ..._errors import LockTimeout, StateUnavailable
from ..._near import NearCache
from .lifecycle import connect
from .near import near_cache
from .protocol import frame_at, frame_size, request, result, set_timeouts

LOST = "connection to the state server lost"
# Seconds a sync lock wait holds a pooled connection before giving it back
# and asking again (an async one has a connection of its own).
LOCK_SLICE = 0.5


def encode(message: Any) -> bytes:
    """``message`` pickled, for ``Connection.send_bytes``.

    Not ``Connection.send``: it pickles into a memoryview of a BytesIO, and
    CPython 3.12.1 crashed (SIGSEGV in the garbage collector, freeing such a
    memoryview with its BytesIO) after a lock's connection broke mid-call.
    """
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


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


class _Link:
    """One connection of the pool, and what reads its replies."""

    __slots__ = ("__weakref__", "_buf", "_fd", "conn", "generation", "poller")

    _CHUNK = 1 << 13

    def __init__(self, conn: Connection, generation: int, unix: bool) -> None:
        self.conn = conn
        self.generation = generation
        self._fd = conn.fileno()
        self._buf = bytearray(self._CHUNK)
        # TCP only: a request sent on a connection the server closed may be
        # taken by the kernel and lost; on a Unix socket the send fails
        # (EPIPE), and the caller sends it again on a new connection.
        self.poller: Any = None
        if not unix:
            self.poller = select.poll()
            self.poller.register(self._fd, select.POLLIN)

    def stale(self) -> bool:
        # Readable before we asked anything: the server closed it (it died or
        # restarted), so a request sent on it now would be lost.
        return self.poller is not None and bool(self.poller.poll(0))

    def recv(self) -> Any:
        """The next reply, read into this link's buffer: one read for a small
        reply (``Connection.recv`` makes two, the length and then the rest)."""
        buf, end = self._buf, 0
        while (bounds := frame_at(buf, 0, end)) is None:
            need = frame_size(buf, 0, end) if end >= 4 else 4
            if need > len(buf):
                grown = bytearray(need)
                grown[:end] = buf[:end]
                buf = self._buf = grown
            # Bounded by the socket's receive timeout (set_timeouts).
            got = os.readv(self._fd, [memoryview(buf)[end:]])
            if got == 0:
                raise EOFError("the state server closed the connection")
            end += got
        first, past = bounds
        try:
            return pickle.loads(memoryview(buf)[first:past])  # noqa: S301 - authenticated server
        finally:
            if len(buf) > self._CHUNK:
                self._buf = bytearray(self._CHUNK)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()


class _Waiter:
    """A thread waiting for a connection: it is handed one, in turn."""

    __slots__ = ("link", "ready")

    def __init__(self) -> None:
        self.link: _Link | None = None  # None when handed a free slot instead
        self.ready = threading.Lock()
        self.ready.acquire()


class _Pool:
    """At most ``size`` connections, lent to one thread at a time.

    A plain call borrows one for its round trip; a held lock or mutation
    keeps its own until released (the server ties them to the connection).
    The most recently returned connection is lent first, so a quiet process
    keeps using few of them; a new one is opened only when none is idle.
    Threads that find none wait in line and are handed one in turn, so none
    waits longer than its share however many threads there are; plain calls
    go before lock waits, which hold a connection for a short slice only.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self.size = config.max_connections or DEFAULT_MAX_CONNECTIONS
        # Idle connections. list.pop() and list.append() are atomic, so lending
        # and giving back take no lock while nobody waits.
        self._idle: list[_Link] = []
        # Threads waiting for a connection, under _mutex: plain calls are
        # served before lock waits, which only ask the server again.
        self._calls: deque[_Waiter] = deque()
        self._lock_waits: deque[_Waiter] = deque()
        self.open = 0  # idle and lent; under _mutex
        self._mutex = threading.Lock()
        self._all: weakref.WeakSet[_Link] = weakref.WeakSet()
        self._generation = 0  # close() starts a new one

    def _waiting(self) -> bool:
        return bool(self._calls or self._lock_waits)

    def take(self, wait: float | None, *, for_lock: bool = False) -> _Link | None:
        """An idle connection, a new one, or one given back within ``wait`` seconds
        (None: however long it takes); None if none was. ``for_lock``: a lock
        wait, served after the plain calls waiting at the time."""
        if not self._waiting():  # else: behind them
            try:
                link = self._idle.pop()
            except IndexError:
                pass
            else:
                if not link.stale():
                    return link
                self.discard(link)
        return self._take_in_turn(wait, self._lock_waits if for_lock else self._calls)

    def _take_in_turn(self, wait: float | None, line: deque[_Waiter]) -> _Link | None:
        with self._mutex:
            while self._idle and not self._waiting():
                link = self._idle.pop()
                if not link.stale():
                    return link
                link.close()
                self.open -= 1
            if self.open < self.size and not self._waiting():
                self.open += 1
                waiter = None
            else:
                waiter = _Waiter()
                # In line first, then served from what is idle: a give() that
                # came just before either left its connection there or saw us.
                line.append(waiter)
                self._hand_over()
        if waiter is None:
            return self._open()  # connecting takes time: not under the mutex
        try:
            served = waiter.ready.acquire(timeout=-1 if wait is None else wait)
        except BaseException:  # interrupted (a signal): leave the line
            with self._mutex:
                if waiter in line:
                    line.remove(waiter)
                    raise
            if waiter.link is None:
                self.discard(None)
            else:
                self.give(waiter.link)
            raise
        if not served:
            with self._mutex:
                if waiter in line:
                    line.remove(waiter)
                    return None
            # Served between the timeout and the mutex: take it.
        if waiter.link is None:
            return self._open()
        if waiter.link.stale():
            waiter.link.close()
            return self._open()  # in the slot it held
        return waiter.link

    def _next_in_line(self) -> _Waiter:
        return (self._calls or self._lock_waits).popleft()

    def _open(self) -> _Link:
        """Connect, in a slot already counted in ``open``."""
        try:
            link = _Link(
                connect(self._config), self._generation, isinstance(self._config.address, str)
            )
        except BaseException:
            self.discard(None)
            raise
        self._all.add(link)
        return link

    def _hand_over(self) -> None:
        # Under _mutex: the first in line get the idle connections.
        while self._idle and self._waiting():
            waiter = self._next_in_line()
            waiter.link = self._idle.pop()
            waiter.ready.release()

    def busy(self) -> StateUnavailable:
        wait = self._config.connect_timeout
        return StateUnavailable(
            f"all {self.size} connections of this state to the state server stayed "
            f"busy for connect_timeout={wait:g}s (raise max_connections= in the state URL?)"
        )

    def give(self, link: _Link) -> None:
        if link.generation != self._generation:  # lent before close()
            self.discard(link)
            return
        self._idle.append(link)
        if self._waiting():
            with self._mutex:
                self._hand_over()

    def discard(self, link: _Link | None) -> None:
        """Close a connection that may be broken, or give up a slot never filled."""
        if link is not None:
            link.close()
        with self._mutex:
            if self._waiting():
                # The slot goes to the first in line, who connects anew.
                waiter = self._next_in_line()
                waiter.link = None
                waiter.ready.release()
            else:
                self.open -= 1

    def close(self) -> None:
        """Close the idle connections now, those lent when they come back."""
        with self._mutex:
            self._generation += 1
            while self._idle:
                self._idle.pop().close()
                self.open -= 1

    def forget(self) -> None:
        """In a forked child: close this process's copies of the parent's sockets."""
        for link in list(self._all):
            link.close()


class EmbeddedEngine:
    """Sync client; safe to share between threads and across fork.

    A process opens at most ``max_connections`` connections however many
    threads it runs (see :class:`_Pool`), plus one per subscription.
    """

    codec = PickleCodec()

    def __init__(self, config: Config) -> None:
        self._config = config
        self._pool = _Pool(config)
        # The connection this thread's held locks and mutations live on, and
        # how many it holds: its other calls go there too, so a thread that
        # holds a lock never waits for a connection another thread holds.
        self._local = threading.local()
        # Reads of the near cache's keys: no round trip while they are current.
        self.near: NearCache | None = near_cache(config, self.codec.decode)
        ENGINES.add(self)

    def _pinned(self) -> _Link | None:
        return getattr(self._local, "link", None)

    def _send(self, request: tuple[Any, ...], link: _Link | None = None) -> _Link:
        """Send ``request`` on a borrowed connection (``link``, or one taken
        within ``connect_timeout``) and return it."""
        # Pickled first: a request that cannot be costs no connection.
        payload = encode(request)
        if link is None:
            link = self._pool.take(self._config.connect_timeout)
            if link is None:
                raise self._pool.busy()
        try:
            link.conn.send_bytes(payload)
        except BlockingIOError as exc:
            # The server stopped reading (frozen): it has at most part of it.
            self._pool.discard(link)
            raise StateUnavailable("the state server did not take the request in time") from exc
        except OSError:
            # The server never read it (it is gone): resend on a new connection.
            # The other connections to that server are gone too (a Unix socket
            # has no poll() before a call to see it): a new generation of them.
            self._pool.discard(link)
            self._pool.close()
            link = self._pool.take(self._config.connect_timeout)
            if link is None:
                raise self._pool.busy() from None
            try:
                link.conn.send_bytes(payload)
            except BaseException as exc:
                self._pool.discard(link)
                if isinstance(exc, OSError):
                    raise StateUnavailable(f"{LOST}: {exc}") from exc
                raise
        except BaseException:
            # Interrupted mid-write (a signal): the stream may be torn.
            self._pool.discard(link)
            raise
        return link

    def _reply(self, link: _Link, method: str) -> Any:
        """The reply's content; the connection is discarded if it broke."""
        try:
            return link.recv()
        except BaseException as exc:
            # Broken, timed out, interrupted or unreadable: it cannot be trusted.
            self._pool.discard(link)
            if isinstance(exc, BlockingIOError):
                raise StateUnavailable(f"no reply to {method} in time") from exc
            if isinstance(exc, (OSError, EOFError)):
                raise StateUnavailable(f"{LOST} during {method}: {exc!r}") from exc
            raise

    def call(self, method: str, *args: Any) -> Any:
        """Run ``method(*args)`` on the store: one round trip."""
        pinned = self._pinned()
        if pinned is not None:
            return self._call_on(pinned, method, *args)
        link = self._send(request(method, args))
        reply = self._reply(link, method)
        self._pool.give(link)
        return result(reply, method)

    # One method per operation, as the Engine protocol has them.

    def get(self, key: str) -> Raw | None:
        near = self.near
        # The state's get found no current value kept (see NearCache.read);
        # with no table (no listener yet, an older server), a plain get.
        if near is None or not key.startswith(near.prefixes) or (mark := near.mark(key)) is None:
            return self.call("get", key)  # type: ignore[no-any-return]
        raw, deadline = self.call("get_near", key)
        near.keep(key, mark, raw, deadline)
        return raw  # type: ignore[no-any-return]

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

    def _call_on(self, handle: _Link, method: str, *args: Any, wait: float | None = None) -> Any:
        """A call on the connection of this thread's locks; ``wait``: its reply's bound."""
        if self._pinned() is not handle:
            raise StateUnavailable(f"{LOST} while a lock was held; it was released")
        conn = handle.conn
        try:
            conn.send_bytes(encode(request(method, args)))
            if wait is not None:
                set_timeouts(conn.fileno(), wait)
            reply = conn.recv()
            if wait is not None:
                set_timeouts(conn.fileno(), self._config.op_timeout)
        except (OSError, EOFError) as exc:
            # The server frees every lock of a connection that ends.
            self._unpin(broken=True)
            why = "no reply in time" if isinstance(exc, BlockingIOError) else repr(exc)
            raise StateUnavailable(f"{LOST} while a lock was held ({method}: {why})") from exc
        return result(reply, method)

    def _hold(self, method: str, name: str, timeout: float | None) -> tuple[_Link, Any] | None:
        """Ask for a lock (or a mutation) in slices; once granted, pin its connection.

        A slice takes a pooled connection for at most ``LOCK_SLICE`` seconds
        and gives it back before the next one, so that threads waiting for a
        lock do not keep the others' plain calls from the pool for long.
        """
        op = self._config.op_timeout
        pinned = self._pinned()
        deadline = None if timeout is None else time.monotonic() + timeout
        for wait in lock_slices(timeout, min(op, LOCK_SLICE)):
            if pinned is not None:
                # Its other locks live on this connection: so does this one.
                link = pinned
                try:
                    value = self._call_on(link, method, name, wait, wait=reply_wait(wait, op))
                except LockTimeout:
                    continue
            else:
                # Waiting for a connection is part of waiting for the lock.
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                borrowed = self._pool.take(left, for_lock=True)
                if borrowed is None:
                    return None
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                link = self._send(request(method, (name, wait)), borrowed)
                set_timeouts(link.conn.fileno(), reply_wait(wait, op))
                reply = self._reply(link, method)
                set_timeouts(link.conn.fileno(), op)
                try:
                    value = result(reply, method)
                except BaseException as exc:
                    self._pool.give(link)
                    if isinstance(exc, LockTimeout):
                        continue
                    raise
            if method == "lock_acquire" and not value:
                if pinned is None:
                    self._pool.give(link)
                continue
            self._local.link = link
            self._local.holds = getattr(self._local, "holds", 0) + 1
            return link, value
        return None

    def _unpin(self, *, broken: bool = False) -> None:
        link = self._pinned()
        if link is None:
            return
        self._local.holds -= 1
        if broken:
            # Every lock on it is gone with it (the server frees them).
            self._local.holds = 0
        if self._local.holds == 0:
            del self._local.link
            if broken:
                self._pool.discard(link)
            else:
                self._pool.give(link)

    def lock_acquire(self, name: str, timeout: float | None) -> _Link | None:
        held = self._hold("lock_acquire", name, timeout)
        return None if held is None else held[0]

    def lock_release(self, handle: _Link, name: str) -> None:
        self._let_go(handle, "lock_release", name)

    def _let_go(self, handle: _Link, method: str, *args: Any) -> None:
        # Let go even when the server answered with an error: it released what
        # it held (see Store.mutate_end). A broken connection was unpinned already.
        try:
            self._call_on(handle, method, *args)
        finally:
            self._unpin()

    def mutate_begin(self, key: str, timeout: float | None) -> tuple[_Link, Any]:
        held = self._hold("mutate_begin", key, timeout)
        if held is None:
            raise mutate_timeout(key, timeout)
        return held

    def mutate_end(self, handle: _Link, key: str, value: Any, commit: bool) -> None:
        self._let_go(handle, "mutate_end", key, value, commit)

    # Broadcast: a subscriber has a connection of its own, outside the pool,
    # since receive() waits on the server for messages.

    def subscribe(self, channels: list[str]) -> Connection:
        conn = connect(self._config)
        try:
            conn.send_bytes(encode(request("subscribe", (channels,))))
            result(conn.recv(), "subscribe")
        except (OSError, EOFError) as exc:
            conn.close()
            raise StateUnavailable(f"{LOST} during subscribe: {exc!r}") from exc
        return conn

    def receive(self, handle: Connection, timeout: float) -> list[tuple[str, Any]]:
        try:
            handle.send_bytes(encode(request("receive", (timeout,))))
            if not handle.poll(reply_wait(timeout, self._config.op_timeout)):
                raise TimeoutError("no answer to receive() in time")
            return list(result(handle.recv(), "receive"))
        except (OSError, EOFError) as exc:
            handle.close()
            raise StateUnavailable(f"{LOST} during receive: {exc!r}") from exc

    def unsubscribe(self, handle: Connection) -> None:
        handle.close()

    def close(self) -> None:
        self._pool.close()

    def _after_fork(self) -> None:
        # Close only this process's copies of the parent's sockets; a lock
        # the parent held stays the parent's.
        self._pool.forget()
        self._pool = _Pool(self._config)
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
