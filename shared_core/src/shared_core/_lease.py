"""Leases: one holder of a named role at a time, with a fencing token.

A lease is what leader election needs: a worker acquires it, renews it while
it works, and releases it; the others see who holds it. Each new holder gets
a fencing token, a number larger than every earlier holder's, so that a
store can refuse the late writes of a holder that lost the lease without
knowing (a paused process): :meth:`Lease.fenced_set`.

How a holder that dies loses it depends on the engine:

- embedded and PostgreSQL: the lease is a lock of the engine, freed the
  moment the holder's connection ends (its process died); the ttl only
  bounds how long its record (``holder()``) outlives it. A holder that is
  alive but frozen keeps it.
- Redis: the lease is a record with the ttl, renewed in the background every
  ttl/3; a holder that dies or freezes loses it when the ttl runs out.

A holder learns that it lost the lease at its next renewal (``held`` turns
False): until then it may still act, which is what fencing is for.

Keys used: ``shared_core:lease:NAME`` (the record) and
``shared_core:lease:NAME:token`` (the token counter, never expires; a missing
one, after ``clear()`` say, starts again from the clock in microseconds, so
tokens keep growing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ._checks import check_key, check_timeout, check_ttl
from ._errors import FencedError, LockTimeout, StateError

if TYPE_CHECKING:
    from ._aio import AsyncSharedState
    from ._state import SharedState

log = logging.getLogger("shared_core.lease")

PREFIX = "shared_core:lease:"
FENCE = "fencing_token"  # the field of a fenced value that holds its writer's token
POLL = 0.05  # seconds between tries of a lease held elsewhere (Redis)
MAX_POLL = 0.5


class _Common:
    """What both leases share: names, the record, the fencing rules."""

    def __init__(self, name: str, ttl: float, by_lock: bool) -> None:
        check_key(name)
        checked = check_ttl(ttl)
        if checked is None:
            raise ValueError("a lease needs a ttl (seconds > 0)")
        self.name = name
        self.ttl = checked
        self._by_lock = by_lock
        self._record_key = f"{PREFIX}{name}"
        self._token_key = f"{PREFIX}{name}:token"
        self._lock_name = f"{PREFIX}{name}"
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._token: int | None = None
        self._handle: Any = None
        self._lost = False
        self._pid = 0  # of the process that acquired it: a forked child holds nothing

    @property
    def token(self) -> int | None:
        """The fencing token of this holder (None if it never held the lease).

        It stays set after the lease is lost or released, so that a late
        :meth:`fenced_set` is refused rather than unfenced."""
        return self._token

    @property
    def held(self) -> bool:
        """Whether this object holds the lease, as far as it knows (a renewal
        that found another holder, or failed for a whole ttl, clears it)."""
        return (
            self._token is not None
            and self._handle is not None
            and not self._lost
            and self._pid == os.getpid()
        )

    def _forget_if_forked(self) -> bool:
        """In a child forked while the lease was held: forget it (the parent
        holds it) and say so."""
        if self._handle is not None and self._pid != os.getpid():
            self._handle, self._lost = None, True
            return True
        return False

    def _record(self, token: int) -> dict[str, Any]:
        return {
            "holder": self._owner,
            "token": token,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
        }

    def _mine(self, record: Any) -> bool:
        return (
            isinstance(record, dict)
            and record.get("holder") == self._owner
            and record.get("token") == self._token
        )

    @staticmethod
    def _free(record: Any) -> bool:
        return not isinstance(record, dict) or record.get("holder") is None

    def _fence(self, current: Any, key: str) -> int:
        """The token to write ``key`` with; FencedError if a newer holder wrote it."""
        if self._token is None:
            raise StateError(f"lease {self.name!r} was never acquired: no token to write with")
        seen = current.get(FENCE) if isinstance(current, dict) else None
        if isinstance(seen, int) and seen > self._token:
            raise FencedError(
                f"{key!r} was written by a newer holder of lease {self.name!r} "
                f"(token {seen} > {self._token})"
            )
        return self._token

    def _check_newer(self, record: Any) -> None:
        newer = record.get("token") if isinstance(record, dict) else None
        if isinstance(newer, int) and self._token is not None and newer > self._token:
            raise FencedError(
                f"lease {self.name!r} has a newer holder (token {newer} > {self._token})"
            )

    @staticmethod
    def _unwrap(stored: Any, default: Any) -> Any:
        if isinstance(stored, dict) and FENCE in stored:
            return stored.get("value", default)
        return default if stored is None else stored

    def _gave_up(self, ok_at: float, exc: StateError) -> bool:
        """After a failed renewal: lost once none succeeded for a whole ttl."""
        if time.monotonic() - ok_at < self.ttl:
            return False
        log.warning("lease %r could not be renewed for its ttl: %s", self.name, exc)
        self._lost = True
        return True

    def _claim_of(self, record: Any) -> Any:
        """``record`` if it is this object's claim (no token yet), else None."""
        if isinstance(record, dict) and record.get("holder") == self._owner:
            return record if record.get("token") is None else None
        return None

    def _claim(self) -> dict[str, Any]:
        # The record won before the token is drawn (Redis): a later holder
        # then always draws a larger token than an earlier one.
        return {**self._record(0), "token": None}

    def _released(self) -> dict[str, Any]:
        return {"holder": None, "token": self._token}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} token={self._token} held={self.held}>"


def _live_holder(record: Any) -> dict[str, Any] | None:
    return None if _Common._free(record) else dict(record)


def _seed() -> int:
    """Where a missing token counter starts: the clock, in microseconds."""
    return time.time_ns() // 1000


class Lease(_Common):
    """A named lease of a :class:`~shared_core.SharedState` (see ``state.lease()``).

    Use it from the thread that acquired it: on the embedded engine the lock
    behind it lives on that thread's connection. While held, a daemon thread
    renews it every ttl/3.
    """

    def __init__(self, state: SharedState, name: str, ttl: float = 10.0) -> None:
        super().__init__(name, ttl, by_lock=not state._config.is_redis)
        self._state = state
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._thread: int | None = None  # that acquired the lock (embedded, PostgreSQL)

    def acquire(self, timeout: float | None = 0.0) -> bool:
        """Take the lease if it is free, waiting at most ``timeout`` seconds
        (0: try once; None: until it is free). Return whether this object holds it."""
        timeout = check_timeout(timeout)
        self._forget_if_forked()
        if self.held:
            return True
        if self._handle is not None:  # lost: let go of what is left (a lock) first
            with contextlib.suppress(StateError):
                self.release()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._by_lock:
            try:
                handle = self._state._engine.lock_acquire(self._lock_name, timeout)
            except RuntimeError:  # another lease object of this thread holds it
                return False
            if handle is None:
                return False
            try:
                token = self._next_token()
                self._state.set(self._record_key, self._record(token), ttl=self.ttl)
            except BaseException:
                self._state._engine.lock_release(handle, self._lock_name)
                raise
            self._token, self._handle = token, handle
            self._thread = threading.get_ident()
        else:
            pause = POLL
            while not self._try_record():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                time.sleep(pause if left is None else min(pause, left))
                pause = min(pause * 2, MAX_POLL)
            self._handle = True
        self._lost, self._pid = False, os.getpid()
        self._start_renewing()
        return True

    def _next_token(self) -> int:
        self._state.add(self._token_key, _seed())
        return self._state.incr(self._token_key)

    def _try_record(self) -> bool:
        record, version = self._state.get_versioned(self._record_key)
        if not self._free(record):
            return False
        if not self._state.set_if_version(self._record_key, self._claim(), version, self.ttl):
            return False  # another worker took it in between
        token = self._next_token()
        record, version = self._state.get_versioned(self._record_key)
        if self._claim_of(record) is None:
            return False  # it ran out meanwhile and another took it
        if self._state.set_if_version(self._record_key, self._record(token), version, self.ttl):
            self._token = token
            return True
        return False

    def renew(self) -> bool:
        """Extend the lease by its ttl; False (and no longer :attr:`held`) if
        another holder has it now."""
        if self._forget_if_forked() or not self.held or self._token is None:
            return False
        record, version = self._state.get_versioned(self._record_key)
        if self._mine(record) or (self._by_lock and record is None):
            mine = self._record(self._token)
            if self._state.set_if_version(self._record_key, mine, version, self.ttl):
                return True
        self._lost = True
        return False

    def release(self) -> None:
        """Give the lease up (nothing happens if this object does not hold it).

        RuntimeError from another thread than the one that acquired it, on
        the embedded engine and PostgreSQL (a lease backed by a lock belongs
        to the thread that took it, as the lock does on the embedded engine)."""
        if self._forget_if_forked():
            return
        if self._handle is not None and self._by_lock and self._thread != threading.get_ident():
            raise RuntimeError(f"lease {self.name!r}: release it from the thread that acquired it")
        self._stop_renewing()
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            record, version = self._state.get_versioned(self._record_key)
            if self._mine(record):
                self._state.set_if_version(self._record_key, self._released(), version, self.ttl)
        finally:
            if self._by_lock:
                self._state._engine.lock_release(handle, self._lock_name)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lease: ``{"holder", "token", "pid", "host", "since"}``,
        or None if nobody does. On the embedded engine and PostgreSQL a holder
        that died is named until its record's ttl runs out (the lease itself
        is free at once)."""
        return _live_holder(self._state.get(self._record_key))

    @contextlib.contextmanager
    def hold(self, timeout: float | None = None) -> Iterator[Lease]:
        """Hold the lease for a ``with`` block; LockTimeout if not acquired in time."""
        if not self.acquire(timeout):
            raise LockTimeout(f"lease {self.name!r} not acquired within {timeout}s")
        try:
            yield self
        finally:
            self.release()

    def fenced_set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Write ``value`` to ``key`` with this holder's token.

        FencedError, and nothing written, if the lease has a newer holder or
        ``key`` was written by one (a write with a lower token than the
        key's is refused atomically). Read it back with :meth:`fenced_get`.
        """
        check_key(key)
        self._check_newer(self._state.get(self._record_key))
        while True:
            current, version = self._state.get_versioned(key)
            token = self._fence(current, key)
            if self._state.set_if_version(key, {FENCE: token, "value": value}, version, ttl):
                return

    def fenced_get(self, key: str, default: Any = None) -> Any:
        """The value :meth:`fenced_set` stored under ``key``, or ``default``."""
        return self._unwrap(self._state.get(check_key(key)), default)

    def _start_renewing(self) -> None:
        self._stop = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_loop, args=(self._stop,), name=f"lease {self.name}", daemon=True
        )
        self._renewer.start()

    def _stop_renewing(self) -> None:
        self._stop.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=self._state._config.op_timeout + 1)

    def _renew_loop(self, stop: threading.Event) -> None:
        ok_at = time.monotonic()
        while not stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    log.warning("lease %r was lost to another holder", self.name)
                    return
                ok_at = time.monotonic()
            except StateError as exc:
                if self._gave_up(ok_at, exc):
                    return


class AsyncLease(_Common):
    """The async twin of :class:`Lease` (see ``AsyncSharedState.lease()``):
    renewed by a task of the event loop it was acquired on."""

    def __init__(self, state: AsyncSharedState, name: str, ttl: float = 10.0) -> None:
        super().__init__(name, ttl, by_lock=not state._config.is_redis)
        self._state = state
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self, timeout: float | None = 0.0) -> bool:
        """See :meth:`Lease.acquire`."""
        timeout = check_timeout(timeout)
        self._forget_if_forked()
        if self.held:
            return True
        if self._handle is not None:  # lost: let go of what is left (a lock) first
            with contextlib.suppress(StateError):
                await self.release()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._by_lock:
            handle = await self._state._engine.lock_acquire(self._lock_name, timeout)
            if handle is None:
                return False
            try:
                token = await self._next_token()
                await self._state.set(self._record_key, self._record(token), ttl=self.ttl)
            except BaseException:
                await self._state._engine.lock_release(handle, self._lock_name)
                raise
            self._token, self._handle = token, handle
        else:
            pause = POLL
            while not await self._try_record():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                await asyncio.sleep(pause if left is None else min(pause, left))
                pause = min(pause * 2, MAX_POLL)
            self._handle = True
        self._lost, self._pid = False, os.getpid()
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"lease {self.name}")
        return True

    async def _next_token(self) -> int:
        await self._state.add(self._token_key, _seed())
        return await self._state.incr(self._token_key)

    async def _try_record(self) -> bool:
        record, version = await self._state.get_versioned(self._record_key)
        if not self._free(record):
            return False
        claim = self._claim()
        if not await self._state.set_if_version(self._record_key, claim, version, self.ttl):
            return False
        token = await self._next_token()
        record, version = await self._state.get_versioned(self._record_key)
        if self._claim_of(record) is None:
            return False
        mine = self._record(token)
        if await self._state.set_if_version(self._record_key, mine, version, self.ttl):
            self._token = token
            return True
        return False

    async def renew(self) -> bool:
        """See :meth:`Lease.renew`."""
        if self._forget_if_forked() or not self.held or self._token is None:
            return False
        record, version = await self._state.get_versioned(self._record_key)
        if self._mine(record) or (self._by_lock and record is None):
            mine = self._record(self._token)
            if await self._state.set_if_version(self._record_key, mine, version, self.ttl):
                return True
        self._lost = True
        return False

    async def release(self) -> None:
        """See :meth:`Lease.release` (any task of the loop may release it).
        A cancellation of the caller does not stop it half-way: it finishes
        (bounded by ``op_timeout``), then the cancellation goes on."""
        if self._forget_if_forked():
            return
        # Else a worker stopping (its tasks cancelled) would leave the lock
        # held on a connection that nobody gives back.
        cleanup = asyncio.ensure_future(self._release())
        try:
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:
            await asyncio.wait([cleanup], timeout=self._state._config.op_timeout + 1)
            raise

    async def _release(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not asyncio.current_task():
            renewer.cancel()
            # wait(), not await: a cancellation of the caller still reaches it.
            # Bounded: a renewer whose cancellation a client lost stops at
            # its next turn anyway (it is no longer self._renewer).
            await asyncio.wait([renewer], timeout=self._state._config.op_timeout + 1)
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            record, version = await self._state.get_versioned(self._record_key)
            if self._mine(record):
                released = self._released()
                await self._state.set_if_version(self._record_key, released, version, self.ttl)
        finally:
            if self._by_lock:
                await self._state._engine.lock_release(handle, self._lock_name)

    async def holder(self) -> dict[str, Any] | None:
        """See :meth:`Lease.holder`."""
        return _live_holder(await self._state.get(self._record_key))

    @contextlib.asynccontextmanager
    async def hold(self, timeout: float | None = None) -> AsyncIterator[AsyncLease]:
        """See :meth:`Lease.hold`."""
        if not await self.acquire(timeout):
            raise LockTimeout(f"lease {self.name!r} not acquired within {timeout}s")
        try:
            yield self
        finally:
            await self.release()

    async def fenced_set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """See :meth:`Lease.fenced_set`."""
        check_key(key)
        self._check_newer(await self._state.get(self._record_key))
        while True:
            current, version = await self._state.get_versioned(key)
            token = self._fence(current, key)
            wrapped = {FENCE: token, "value": value}
            if await self._state.set_if_version(key, wrapped, version, ttl):
                return

    async def fenced_get(self, key: str, default: Any = None) -> Any:
        """See :meth:`Lease.fenced_get`."""
        return self._unwrap(await self._state.get(check_key(key)), default)

    async def _renew_loop(self) -> None:
        ok_at = time.monotonic()
        while True:
            await asyncio.sleep(self.ttl / 3)
            if self._renewer is not asyncio.current_task():
                return  # released, or replaced by a later acquire's renewer
            try:
                if not await self.renew():
                    log.warning("lease %r was lost to another holder", self.name)
                    return
                ok_at = time.monotonic()
            except StateError as exc:
                if self._gave_up(ok_at, exc):
                    return
