"""The embedded engine's data: values, versions, expiry, eviction, locks, inboxes.

No sockets here: the server calls these methods, one call per request, from
the thread that serves the connection, after telling the store who that
connection is (:meth:`Store.connected`). That keeps expiry and eviction
testable without a server.

Values are stored as the clients encode them: an int as itself (so that
``incr`` can add to it), anything else as bytes that the store never decodes,
so it needs none of the apps' classes and runs none of their code.

Expiry: a deadline (Unix time, so that snapshots keep it across restarts) per
key that has one. Every call checks it, so an expired key is never returned;
its memory is reclaimed by :meth:`Store.sweep`, which samples a bounded number
of keys with a deadline at a time (as Redis does), never a full scan.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import secrets
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ..._errors import CapacityError, LockTimeout
from . import records

if TYPE_CHECKING:
    from .near import ServerTable

Value = int | bytes

# Locks taken by ``mutate`` live in the same table as named locks, in a
# namespace no user lock name can reach.
MUTATE_PREFIX: Final = "\x00mutate\x00"
EVICTION_POLICIES: Final = ("volatile-lru", "allkeys-lru", "noeviction")
_POLL: Final = 0.25  # seconds between checks that a waiting client is still there
_MISSING: Final = object()


class _Keep:
    """``ttl=KEEP``: leave the key's deadline as it is."""


KEEP: Final = _Keep()


class Store:
    """The shared values, secrets, locks and subscriber inboxes.

    Parameters:
        max_keys: the most keys it holds (None: no bound).
        eviction: what a write of a new key does at ``max_keys``:
            ``volatile-lru`` evicts the least recently used key that has a
            ttl, ``allkeys-lru`` the least recently used key, ``noeviction``
            evicts nothing; when nothing may be evicted the write raises
            :class:`CapacityError` and changes nothing.
        on_secrets: called (under the store's mutex) with every secret
            whenever one is made or rotated, to keep them in a file.
    """

    exposed: Final = frozenset(
        {
            "get", "get_versioned", "get_many", "set", "set_many", "set_if_version",
            "add", "delete", "delete_many", "incr", "setdefault", "expire", "ttl",
            "keys", "clear", "secret", "rotate_secret", "lock_acquire", "lock_release",
            "mutate_begin", "mutate_end", "info", "publish", "subscribe", "receive",
            "get_near",
        }
    )  # fmt: skip

    def __init__(
        self,
        *,
        max_keys: int | None = None,
        eviction: str = "volatile-lru",
        on_secrets: Callable[[dict[str, str]], None] | None = None,
    ) -> None:
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction={eviction!r}: use one of {', '.join(EVICTION_POLICIES)}")
        self._data: dict[str, Value] = {}
        self._versions: dict[str, int] = {}
        self._deadlines: dict[str, float] = {}
        # The same keys by when they expire, in buckets of 0.1 s, and a heap of
        # the buckets: the sweep finds what expired without looking at
        # anything else, and a key moves bucket when its deadline changes.
        self._buckets: dict[int, set[str]] = {}
        self._due: list[int] = []
        self._max_keys = max_keys
        self._eviction = eviction
        # Recency, only when bounded (a cost on every call otherwise): all
        # keys for allkeys-lru, keys with a ttl for volatile-lru.
        self._lru: OrderedDict[str, None] | None = (
            OrderedDict() if max_keys is not None and eviction != "noeviction" else None
        )
        self._lru_all = eviction == "allkeys-lru"
        self._secrets: dict[str, str] = {}
        self._on_secrets = on_secrets
        self._mutex = threading.Lock()
        # The version of the last write. Every write takes the next one, so a
        # key's version changes whenever it is written, deleted and written
        # again included. Starting from the clock in microseconds keeps
        # versions growing across restarts (a token from before a restart
        # never matches a value written after it).
        self.version = time.time_ns() // 1000
        self._peak = 0  # most keys held since the tables were last rebuilt
        self.expired = 0
        self.evicted = 0
        self._lock_cond = threading.Condition(threading.Lock())
        self._lock_owners: dict[str, int] = {}
        self._local = threading.local()
        self._clients_mutex = threading.Lock()
        # Broadcast: the queue of each subscribed connection, per channel.
        self._subs_cond = threading.Condition(threading.Lock())
        self._subscribers: dict[str, set[int]] = {}
        self._inboxes: dict[int, deque[tuple[str, Value]]] = {}
        self.clients = 0
        self.idle_since = time.monotonic()
        self.started = time.time()
        # The append-only log, when there is one: every write method hands it
        # one entry (the ops it did) before it lets go of the mutex, so the
        # log's order is the store's order.
        self._journal: Callable[[bytes], None] | None = None
        self._ops: list[bytes] = []
        # The near cache's table of write counters, when the server has one.
        self._touch: Callable[[str], None] | None = None

    def attach_table(self, table: ServerTable | None) -> None:
        """Count every write of a key in ``table`` from now on (None: stop)."""
        with self._mutex:
            self._touch = None if table is None else table.touch

    def attach_journal(self, append: Callable[[bytes], None] | None) -> None:
        """Hand every write's ops to ``append`` from now on (None: stop)."""
        with self._mutex:
            self._journal = append

    # connections -----------------------------------------------------------

    def connected(self, gone: Callable[[], bool]) -> None:
        """The calling thread serves one connection from now on; ``gone()``
        tells whether its client has left (so that waits can end early)."""
        self._local.gone = gone
        with self._clients_mutex:
            self.clients += 1

    def disconnected(self) -> None:
        """The calling thread's connection ended: free what it held."""
        me = threading.get_ident()
        with self._subs_cond:
            if self._inboxes.pop(me, None) is not None:
                for members in self._subscribers.values():
                    members.discard(me)
        with self._lock_cond:
            held = [name for name, owner in self._lock_owners.items() if owner == me]
            for name in held:
                del self._lock_owners[name]
            if held:
                self._lock_cond.notify_all()
        with self._clients_mutex:
            self.clients -= 1
            if self.clients == 0:
                self.idle_since = time.monotonic()

    def _client_gone(self) -> bool:
        gone: Callable[[], bool] | None = getattr(self._local, "gone", None)
        return gone is not None and gone()

    # internals (the mutex is held) ---------------------------------------------

    def _live(self, key: str, now: float) -> bool:
        """Whether ``key`` exists; an expired key is removed on the way."""
        if key not in self._data:
            return False
        deadline = self._deadlines.get(key)
        if deadline is not None and deadline <= now:
            self._remove(key, logged=False)  # the log has the deadline already
            self.expired += 1
            return False
        if self._lru is not None and key in self._lru:
            self._lru.move_to_end(key)
        return True

    def _put(self, key: str, value: Value, ttl: float | _Keep | None, now: float) -> int:
        if key not in self._data:
            if self._max_keys is not None and len(self._data) >= self._max_keys:
                self._make_room(now)
            if len(self._data) >= self._peak:
                self._peak = len(self._data) + 1
        self._data[key] = value
        self.version += 1
        self._versions[key] = self.version
        if self._touch is not None:
            self._touch(key)
        if ttl is None:
            self._drop_deadline(key)
        elif not isinstance(ttl, _Keep):
            self._set_deadline(key, now + ttl)
        if self._lru is not None and (self._lru_all or key in self._deadlines):
            self._lru[key] = None
            self._lru.move_to_end(key)
        if self._journal is not None:
            self._ops.append(records.put(key, value, self._deadlines.get(key)))
        return self.version

    def _remove(self, key: str, logged: bool = True) -> bool:
        if self._data.pop(key, _MISSING) is _MISSING:
            return False
        del self._versions[key]
        self._drop_deadline(key)
        if self._lru is not None:
            self._lru.pop(key, None)
        self.version += 1
        if self._touch is not None:
            self._touch(key)
        if logged and self._journal is not None:
            self._ops.append(records.delete(key))
        return True

    def _seal(self) -> None:
        """Hand the ops of this call to the log as one entry (the mutex is held)."""
        if self._ops and self._journal is not None:
            self._journal(b"".join(self._ops))
        self._ops.clear()

    def _set_deadline(self, key: str, deadline: float) -> None:
        old = self._deadlines.get(key)
        self._deadlines[key] = deadline
        bucket = _bucket(deadline)
        if old is not None:
            if _bucket(old) == bucket:
                return
            self._unbucket(key, old)
        keys = self._buckets.get(bucket)
        if keys is None:
            keys = self._buckets[bucket] = set()
            heapq.heappush(self._due, bucket)
        keys.add(key)

    def _unbucket(self, key: str, deadline: float) -> None:
        keys = self._buckets.get(_bucket(deadline))
        if keys is not None:
            keys.discard(key)

    def _drop_deadline(self, key: str) -> None:
        deadline = self._deadlines.pop(key, None)
        if deadline is None:
            return
        self._unbucket(key, deadline)
        if self._lru is not None and not self._lru_all:
            self._lru.pop(key, None)

    def _reclaim(self, now: float, batch: int) -> int:
        """Remove up to ``batch`` keys from the buckets that have fully passed."""
        due, buckets = self._due, self._buckets
        data, versions, deadlines, lru = self._data, self._versions, self._deadlines, self._lru
        limit = _bucket(now)  # buckets before this one hold only expired keys
        removed = 0
        while due and due[0] < limit and removed < batch:
            keys = buckets.get(due[0])
            if not keys:
                buckets.pop(heapq.heappop(due), None)
                continue
            # Inlined _remove: this loop is what a mass expiry costs.
            while keys and removed < batch:
                key = keys.pop()
                del data[key], versions[key], deadlines[key]
                if lru is not None:
                    lru.pop(key, None)
                if self._touch is not None:
                    self._touch(key)
                removed += 1
        if removed:
            self.expired += removed
            self.version += 1
        return removed

    def _make_room(self, now: float) -> None:
        # Expired keys go first, then the least recently used one the policy allows.
        self._reclaim(now, 16)
        current = self._buckets.get(_bucket(now), ())
        for key in [k for k in itertools.islice(current, 64) if self._deadlines[k] <= now]:
            self._remove(key, logged=False)
            self.expired += 1
        if len(self._data) < (self._max_keys or 0):
            return
        if self._lru:
            victim = next(iter(self._lru))
            self._remove(victim)
            self.evicted += 1
            return
        raise CapacityError(
            f"the state holds max_keys={self._max_keys} keys and eviction="
            f"{self._eviction} allows none to be evicted; nothing was written"
        )

    def _check_room(self, new: int) -> None:
        """Refuse a batch of ``new`` keys that could not all be stored, before
        anything is written (so that a batch is all or nothing)."""
        limit = self._max_keys or 0
        overflow = len(self._data) + new - limit
        if overflow <= 0:
            return
        evictable = 0 if self._lru is None else len(self._lru)
        if new > limit or overflow > evictable:
            raise CapacityError(
                f"{new} new keys do not fit under max_keys={limit} with eviction="
                f"{self._eviction}; nothing was written"
            )

    # values ----------------------------------------------------------------

    def get(self, key: str) -> Value | None:
        with self._mutex:
            value = self._data.get(key)
            if value is None:
                return None
            # The clock is read only for keys that have a deadline.
            deadline = self._deadlines.get(key)
            if deadline is not None and deadline <= time.time():
                self._remove(key, logged=False)
                self.expired += 1
                return None
            if self._lru is not None and key in self._lru:
                self._lru.move_to_end(key)
            return value

    def get_near(self, key: str) -> tuple[Value | None, float | None]:
        """The value of ``key`` and its deadline (``time.time()``), for a near cache."""
        with self._mutex:
            if not self._live(key, time.time()):
                return None, None
            return self._data[key], self._deadlines.get(key)

    def get_versioned(self, key: str) -> tuple[Value | None, int | None]:
        with self._mutex:
            if not self._live(key, time.time()):
                return None, None
            return self._data[key], self._versions[key]

    def get_many(self, keys: list[str]) -> dict[str, Value]:
        now = time.time()
        with self._mutex:
            return {k: self._data[k] for k in keys if self._live(k, now)}

    def set(self, key: str, value: Value, ttl: float | None = None) -> None:
        with self._mutex:
            self._put(key, value, ttl, time.time())
            self._seal()

    def set_many(self, items: dict[str, Value], ttl: float | None = None) -> None:
        now = time.time()
        with self._mutex:
            if self._max_keys is not None:
                self._reclaim(now, len(items))
                self._check_room(sum(1 for k in items if not self._live(k, now)))
            for key, value in items.items():
                self._put(key, value, ttl, now)
            self._seal()

    def set_if_version(
        self, key: str, value: Value, version: int | None, ttl: float | None = None
    ) -> bool:
        with self._mutex:
            now = time.time()
            live = self._live(key, now)
            if version is None:
                if live:
                    return False
            elif not live or self._versions[key] != version:
                return False
            self._put(key, value, ttl, now)
            self._seal()
            return True

    def add(self, key: str, value: Value, ttl: float | None = None) -> bool:
        with self._mutex:
            now = time.time()
            if self._live(key, now):
                return False
            self._put(key, value, ttl, now)
            self._seal()
            return True

    def delete(self, key: str) -> bool:
        with self._mutex:
            removed = self._live(key, time.time()) and self._remove(key)
            self._seal()
            return removed

    def delete_many(self, keys: list[str]) -> int:
        now = time.time()
        with self._mutex:
            removed = sum(1 for k in keys if self._live(k, now) and self._remove(k))
            self._seal()
            return removed

    def incr(self, key: str, amount: int, ttl: float | None = None) -> int:
        with self._mutex:
            value = self._data.get(key)
            if (
                type(value) is int
                and key not in self._deadlines
                and (self._lru is None or not self._lru_all)
            ):
                # The hot path: a counter without expiry (or LRU order to keep).
                value += amount
                self._data[key] = value
                self.version += 1
                self._versions[key] = self.version
                if self._touch is not None:
                    self._touch(key)
                if self._journal is not None:
                    self._journal(records.put(key, value, None))
                return value
            now = time.time()
            if self._live(key, now):
                value = self._data[key]
                if type(value) is not int:
                    raise TypeError(f"incr: the value of {key!r} is not an int")
                value += amount
                self._put(key, value, KEEP, now)
            else:
                value = amount
                self._put(key, value, ttl, now)
            self._seal()
        return value

    def setdefault(self, key: str, value: Value) -> Value:
        with self._mutex:
            now = time.time()
            if self._live(key, now):
                return self._data[key]
            self._put(key, value, None, now)
            self._seal()
            return value

    def expire(self, key: str, ttl: float | None) -> bool:
        with self._mutex:
            now = time.time()
            if not self._live(key, now):
                return False
            if ttl is None:
                self._drop_deadline(key)
            else:
                self._set_deadline(key, now + ttl)
            self.version += 1
            self._versions[key] = self.version
            if self._touch is not None:
                self._touch(key)
            if self._journal is not None:
                self._journal(records.expire(key, self._deadlines.get(key)))
            return True

    def ttl(self, key: str) -> float | None:
        """Seconds left; ``math.inf`` for a key without expiry; None if missing."""
        with self._mutex:
            now = time.time()
            if not self._live(key, now):
                return None
            deadline = self._deadlines.get(key)
            return math.inf if deadline is None else max(0.0, deadline - now)

    def keys(self, prefix: str) -> list[str]:
        now = time.time()
        with self._mutex:
            return sorted(
                k for k in list(self._data) if k.startswith(prefix) and self._live(k, now)
            )

    def clear(self, prefix: str) -> int:
        now = time.time()
        with self._mutex:
            doomed = [k for k in self._data if k.startswith(prefix)]
            removed = sum(1 for k in doomed if self._live(k, now) and self._remove(k, False))
            if removed and self._journal is not None:
                self._journal(records.clear(prefix))
            return removed

    # expiry and memory ---------------------------------------------------------

    def sweep(self, batch: int = 128) -> int:
        """Remove up to ``batch`` expired keys; return how many it removed.

        Only keys whose deadline has passed are looked at, so a call costs
        what it removes; the caller calls again while it removes a full batch.
        """
        with self._mutex:
            return self._reclaim(time.time(), batch)

    def compact(self) -> bool:
        """Rebuild the tables once they hold a quarter of their peak or less.

        A dict never shrinks when keys leave it; a copy is sized to what is
        left, so memory comes back after a mass expiry. The copy is of the
        remaining keys only, so it is short when it is worth doing.
        """
        with self._mutex:
            if self._peak < 4096 or len(self._data) * 4 > self._peak:
                return False
            self._data = dict(self._data)
            self._versions = dict(self._versions)
            self._deadlines = dict(self._deadlines)
            self._buckets = {b: set(keys) for b, keys in self._buckets.items() if keys}
            self._due = sorted(self._buckets)
            if self._lru is not None:
                self._lru = OrderedDict(self._lru)
            self._peak = len(self._data)
            return True

    # secrets ---------------------------------------------------------------

    def secret(self, name: str, nbytes: int) -> str:
        with self._mutex:
            value = self._secrets.get(name)
            if value is None:
                value = self._new_secret(name, nbytes)
        return value

    def rotate_secret(self, name: str, nbytes: int) -> str:
        with self._mutex:
            return self._new_secret(name, nbytes)

    def _new_secret(self, name: str, nbytes: int) -> str:
        value = secrets.token_hex(nbytes)
        updated = {**self._secrets, name: value}
        if self._on_secrets is not None:
            self._on_secrets(updated)  # kept on disk before anyone sees it
        self._secrets = updated
        self.version += 1
        return value

    # locks -----------------------------------------------------------------

    def lock_acquire(self, name: str, timeout: float | None) -> bool:
        me = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock_cond:
            if self._lock_owners.get(name) == me:
                raise RuntimeError(f"lock {_shown(name)} is already held by this caller")
            while name in self._lock_owners:
                wait = _POLL
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    wait = min(wait, remaining)
                self._lock_cond.wait(wait)
                if self._client_gone():
                    raise EOFError("client left while waiting for a lock")
            self._lock_owners[name] = me
        return True

    def lock_release(self, name: str) -> None:
        with self._lock_cond:
            if self._lock_owners.get(name) != threading.get_ident():
                raise RuntimeError(f"lock {_shown(name)} is not held by this caller")
            del self._lock_owners[name]
            self._lock_cond.notify_all()

    def mutate_begin(self, key: str, timeout: float | None) -> Value | None:
        if not self.lock_acquire(MUTATE_PREFIX + key, timeout):
            raise LockTimeout(f"mutate({key!r}): another mutation held it for {timeout}s")
        return self.get(key)

    def mutate_end(self, key: str, value: Value | None, commit: bool) -> None:
        name = MUTATE_PREFIX + key
        if self._lock_owners.get(name) != threading.get_ident():
            raise RuntimeError(f"mutate({key!r}) is not in progress for this caller")
        try:
            if commit and value is not None:
                with self._mutex:
                    # The key keeps its ttl, unless it ran out during the block.
                    now = time.time()
                    self._put(key, value, KEEP if self._live(key, now) else None, now)
                    self._seal()
        finally:
            # Released even when the write is refused (a full store): the
            # connection goes back to its pool, and must not keep the key locked.
            self.lock_release(name)

    # broadcast ---------------------------------------------------------------

    def publish(self, channel: str, message: Value) -> int:
        """Queue ``message`` for every connection subscribed to ``channel``."""
        with self._subs_cond:
            members = self._subscribers.get(channel, ())
            for ident in members:
                self._inboxes[ident].append((channel, message))
            if members:
                self._subs_cond.notify_all()
            return len(members)

    def subscribe(self, channels: list[str]) -> None:
        """Make this connection a subscriber; messages queue up from now on."""
        me = threading.get_ident()
        with self._subs_cond:
            self._inboxes.setdefault(me, deque())
            for channel in channels:
                self._subscribers.setdefault(channel, set()).add(me)

    def receive(self, timeout: float) -> list[tuple[str, Value]]:
        """Wait up to ``timeout`` for this subscriber's queued messages."""
        me = threading.get_ident()
        deadline = time.monotonic() + timeout
        with self._subs_cond:
            inbox = self._inboxes.get(me)
            if inbox is None:
                raise RuntimeError("receive() before subscribe() on this connection")
            while not inbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._subs_cond.wait(min(remaining, _POLL))
                if self._client_gone():
                    raise EOFError("subscriber left")
            messages = list(inbox)
            inbox.clear()
        return messages

    # persistence -------------------------------------------------------------

    def dump(
        self, then: Callable[[], None] | None = None
    ) -> tuple[int, dict[str, Value], dict[str, float], dict[str, str]]:
        """A consistent copy of the live values, their deadlines and the secrets,
        with the version it was taken at; ``then()`` runs before any other
        write (the log switches segment there)."""
        with self._mutex:
            now = time.time()
            live = [k for k in list(self._data) if self._live(k, now)]
            data = {k: self._data[k] for k in live}
            deadlines = {k: self._deadlines[k] for k in live if k in self._deadlines}
            if then is not None:
                then()
            return self.version, data, deadlines, dict(self._secrets)

    def apply(self, ops: list[records.Op]) -> None:
        """Redo one logged entry (recovery; nothing is logged meanwhile)."""
        now = time.time()
        with self._mutex:
            journal, self._journal = self._journal, None
            try:
                for kind, key, value, deadline in ops:
                    # A deadline already past is kept as it is: a later entry
                    # may still drop it (expire(key, None)); the key expires
                    # as any other once replay is done.
                    if kind == records.PUT:
                        assert value is not None
                        self._put(key, value, None if deadline is None else deadline - now, now)
                    elif kind == records.DELETE:
                        self._remove(key)
                    elif kind == records.EXPIRE:
                        if key in self._data:
                            if deadline is None:
                                self._drop_deadline(key)
                            else:
                                self._set_deadline(key, deadline)
                    else:  # CLEAR
                        for doomed in [k for k in self._data if k.startswith(key)]:
                            self._remove(doomed)
            finally:
                self._journal = journal

    def load(
        self, data: dict[str, Value], deadlines: dict[str, float], secrets_: dict[str, str]
    ) -> int:
        """Add what a snapshot held; keys whose deadline passed meanwhile stay
        out. Returns how many keys were loaded."""
        now = time.time()
        loaded = 0
        with self._mutex:
            for key, value in data.items():
                deadline = deadlines.get(key)
                if deadline is not None and deadline <= now:
                    continue
                self._put(key, value, None if deadline is None else deadline - now, now)
                loaded += 1
            self._secrets.update(secrets_)
        return loaded

    def load_secrets(self, secrets_: dict[str, str]) -> None:
        with self._mutex:
            self._secrets.update(secrets_)

    def info(self) -> dict[str, Any]:
        with self._mutex:
            keys, expiring = len(self._data), len(self._deadlines)
        return {
            "engine": "manager",
            "pid": os.getpid(),
            "clients": self.clients,
            "keys": keys,
            "expiring": expiring,
            "expired": self.expired,
            "evicted": self.evicted,
            "max_keys": self._max_keys,
            "eviction": self._eviction,
            "locks": len(self._lock_owners),
            "uptime": round(time.time() - self.started, 3),
            "python": sys.version.split()[0],
        }


def _bucket(deadline: float) -> int:
    return int(deadline * 10)


def _shown(name: str) -> str:
    if name.startswith(MUTATE_PREFIX):
        return f"for mutate({name[len(MUTATE_PREFIX) :]!r})"
    return repr(name)
