"""A `limits <https://limits.readthedocs.io>`_ storage on the shared state, sync and async.

Every worker of a deployment then counts against one limit, on the embedded
state server or on Redis, with no other server to run. `flask-limiter`_ and
`slowapi`_ take it by its URI::

    import shared_core.contrib.limits  # registers the shared:// schemes with limits

    limiter = Limiter(get_remote_address, app=app, storage_uri="shared://my_app")

``pip install "shared-core[limits]"`` (``limits>=5.2,<6``). Importing this module
is what registers the schemes (limits finds storages by the scheme of the URI
among the classes defined so far), so import it before the limiter is made.

URIs (prefix each with ``async+`` for :mod:`limits.aio`):

``shared://``
    The default state: ``$SHARED_STATE_URL``, else the embedded server of the
    app ``default``. This is the one-line switch from ``memory://``.
``shared://APP``
    The same, for the app ``APP``: ``$SHARED_STATE_URL`` if set, else
    ``local://APP`` (the embedded server the app's own ``SharedState`` uses).
    So the same line runs on the embedded engine in development and on Redis
    where the deployment sets ``SHARED_STATE_URL=redis://...``.
``shared+URL``
    The state at ``URL``, whatever the environment says:
    ``shared+redis://host:6379/0?app=APP``, ``shared+rediss://...``,
    ``shared+redis+unix:///run/redis.sock?app=APP``, ``shared+postgresql://db/app?app=APP``,
    ``shared+local://APP``,
    ``shared+unix:///run/app/state.sock``, ``shared+tcp://127.0.0.1:7000``.
    The query is the state URL's own (``app``, ``connect_timeout``, ...).

Options, as keyword arguments (flask-limiter's ``storage_options``,
``RATELIMIT_STORAGE_OPTIONS``) or, for ``key_prefix``, in the URI's query:

``key_prefix`` (default ``"limits"``)
    Every key this storage writes starts with ``PREFIX:`` (counters
    ``PREFIX:c:KEY``, moving windows ``PREFIX:m:KEY``), so :meth:`reset`
    removes these and nothing else of the state.
``state``
    A :class:`~shared_core.SharedState` (an :class:`~shared_core.AsyncSharedState`
    for ``async+``) to use instead of making one from the URI, e.g. the one
    ``shared_core.flask`` attached to the app: ``storage_options={"state":
    get_state(app)}``.
``wrap_exceptions``
    limits' own: raise :class:`limits.errors.StorageError` around our errors.

What each strategy costs (a round trip is one call to the state server or to
Redis; every write is atomic there):

fixed window
    ``hit``: 1 round trip, ``incr(key, cost, ttl=expiry)`` (the ttl applies
    when the call creates the key); ``test``: 1; ``get_window_stats``: 2.
moving window
    The times and costs of the hits still in the window, under one key
    (``PREFIX:m:KEY``, a ``str``: base64 of two arrays of doubles), written
    by compare-and-set (``get_versioned`` then ``set_if_version``, with the
    window as ttl): an accepted hit costs 2 round trips, one more pair for
    each time another writer won the race (retried at once, then with a
    jittered pause up to 20 ms; :class:`limits.errors.ConcurrentUpdateError`
    after 100 attempts); a refused hit, ``test`` and ``get_window_stats``: 1.
    No lock is taken, so a worker killed mid-hit blocks nobody. The value
    travels whole: 22 bytes per hit in the window (at most ``limit`` hits),
    so for limits in the tens of thousands prefer the sliding window counter.
sliding window counter
    Counters per window of time, ``PREFIX:c:KEY/N`` with ``N = time //
    expiry`` (limits' timestamped layout, as for memcached and memory):
    ``get_many`` of the previous and current counters; a refused hit ends
    there (1 round trip), an accepted one adds ``incr(current, cost,
    ttl=2*expiry)`` (2); if that increment overshoots the limit (another
    worker got there first) it is taken back with a third and the hit is
    refused. Exactly ``limit`` hits of cost 1 are let through, however many
    workers race, since a refusal only ever follows ``limit`` acceptances;
    ``test`` and ``get_window_stats``: 1.

``get``, ``get_expiry`` and ``clear`` are 1 round trip each; ``reset`` is
:meth:`~shared_core.SharedState.clear` of the prefix. Times are the clients'
``time.time()``: the clocks of the machines sharing a Redis should agree
(NTP) for the moving and sliding windows to be exact.

Errors. The state being unreachable raises :class:`shared_core.StateUnavailable`
(after ``connect_timeout``, a frozen server after ``op_timeout``), other
failures another :class:`shared_core.StateError`; that is this storage's
``base_exceptions``, so ``wrap_exceptions=True`` turns them into limits'
``StorageError``. ``check()`` returns False instead of raising. Then
flask-limiter and slowapi do what they are configured to: with
``swallow_errors`` the request goes through unlimited (logged); with
``in_memory_fallback_enabled`` each worker counts alone in memory until
``check()`` succeeds again; else the error propagates, and with
``shared_core.flask``'s or ``shared_core.starlette``'s error handler the
client gets ``503 {"error": ...}``.

.. _flask-limiter: https://flask-limiter.readthedocs.io
.. _slowapi: https://slowapi.readthedocs.io
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import math
import random
import sys
import time
from array import array
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

import limits.aio.storage as aio_storage
from limits.errors import ConcurrentUpdateError, ConfigurationError
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

from .._aio import AsyncSharedState
from .._errors import StateError
from .._state import SharedState

__all__ = ["AsyncSharedStorage", "SharedStorage"]

DEFAULT_KEY_PREFIX = "limits"
# The state URL schemes a shared+ URI may wrap.
_INNER_SCHEMES = ("local", "unix", "tcp", "redis", "rediss", "redis+unix", "postgresql", "postgres")
_SCHEMES = ["shared", *(f"shared+{s}" for s in _INNER_SCHEMES)]
_ASYNC_SCHEMES = [f"async+{s}" for s in _SCHEMES]
# Compare-and-set of a moving window: attempts, and the longest pause between two.
CAS_ATTEMPTS = 100
_MAX_PAUSE = 0.02

_BIG_ENDIAN = sys.byteorder == "big"


# --- what both storages share --------------------------------------------------


def _parse(uri: str, key_prefix: str | None) -> tuple[str | None, str | None, str]:
    """The state URL (None: the default), the app name and the key prefix of ``uri``."""
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.removeprefix("async+")
    if not sep or scheme not in _SCHEMES:
        raise ConfigurationError(
            f"{uri!r}: use shared://[APP] or shared+STATE_URL (e.g. shared+redis://host/0)"
        )
    location, _, query = rest.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    prefixes = [v for k, v in pairs if k == "key_prefix"]
    pairs = [(k, v) for k, v in pairs if k != "key_prefix"]
    prefix = key_prefix if key_prefix is not None else (prefixes or [DEFAULT_KEY_PREFIX])[-1]
    if not prefix:
        raise ConfigurationError("key_prefix must not be empty: reset() would clear the state")
    if scheme == "shared":
        if "/" in location.strip("/") or pairs:
            raise ConfigurationError(
                f"{uri!r}: shared:// takes an app name only (shared://APP); "
                "for a state URL with options use shared+URL"
            )
        return None, location.strip("/") or None, prefix
    inner = scheme.removeprefix("shared+")
    return f"{inner}://{location}" + (f"?{urlencode(pairs)}" if pairs else ""), None, prefix


def _check_options(options: Mapping[str, object]) -> None:
    if options:
        raise ConfigurationError(
            f"unknown options for the shared storage: {', '.join(sorted(options))} "
            "(it takes key_prefix, state and wrap_exceptions)"
        )


def _count(value: Any) -> int:
    return int(value) if value is not None else 0


class _Window:
    """A moving window: the times of its hits, oldest first, and their costs.

    Stored as one ``str`` (base64 of the two arrays of doubles, little-endian),
    which both engines keep as it is: encoding and decoding run in C, however
    many hits the window holds.
    """

    def __init__(self, value: object) -> None:
        self.times: array[float] = array("d")
        self.costs: array[float] = array("d")
        if isinstance(value, str) and value:
            raw = base64.b64decode(value)
            half = len(raw) // 2
            self.times.frombytes(raw[:half])
            self.costs.frombytes(raw[half:])
            if _BIG_ENDIAN:
                self.times.byteswap()
                self.costs.byteswap()

    def live(self, now: float, expiry: int) -> int:
        """The index of the first hit still in the window (newer than ``now - expiry``)."""
        return bisect.bisect_right(self.times, now - expiry)

    def accept(self, now: float, limit: int, expiry: int, amount: int) -> str | None:
        """The stored form of the window with a hit of ``amount`` added (older
        hits dropped), or None if that would exceed ``limit``."""
        first = self.live(now, expiry)
        if sum(self.costs[first:]) + amount > limit:
            return None
        times, costs = self.times[first:], self.costs[first:]
        # Kept in order even if a clock went back: a hit then counts a little
        # longer, never shorter.
        times.append(max(now, times[-1]) if times else now)
        costs.append(amount)
        if _BIG_ENDIAN:
            times.byteswap()
            costs.byteswap()
        return base64.b64encode(times.tobytes() + costs.tobytes()).decode("ascii")

    def stats(self, now: float, expiry: int) -> tuple[float, int]:
        """(start of the moving window, hits in it), as limits defines them."""
        first = self.live(now, expiry)
        if first == len(self.times):
            return now, 0
        return self.times[first], int(sum(self.costs[first:]))


def _sliding(prev: int, cur: int, expiry: int, now: float) -> tuple[int, float, int, float]:
    """(previous count, its ttl, current count, its ttl) of limits' timestamped layout."""
    later = time.time()
    if later // expiry == now // expiry:
        # The ttls as of the reply (limits adds them to its own time.time()),
        # unless the window turned meanwhile: then those of the keys read.
        now = later
    prev_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry if prev else 0.0
    cur_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
    return prev, prev_ttl, cur, cur_ttl


def _pause(attempt: int) -> float:
    """How long to wait after the ``attempt``-th lost compare-and-set (from 0)."""
    if attempt < 2:
        return 0.0
    return random.uniform(0, min(_MAX_PAUSE, 0.001 * attempt))  # noqa: S311 - jitter


class _Keys:
    """Where a storage keeps what: everything under ``PREFIX:``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = f"{prefix}:"

    def counter(self, key: str) -> str:
        return f"{self.prefix}c:{key}"

    def moving(self, key: str) -> str:
        return f"{self.prefix}m:{key}"

    def sliding(self, key: str, expiry: int, now: float) -> tuple[str, str]:
        prev, cur = TimestampedSlidingWindow.sliding_window_keys(key, expiry, now)
        return self.counter(prev), self.counter(cur)

    @property
    def check(self) -> str:
        return f"{self.prefix}check"


# --- sync ----------------------------------------------------------------------


class SharedStorage(
    Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow
):
    """A limits storage on a :class:`~shared_core.SharedState` (see the module docstring).

    Parameters:
        uri: ``shared://[APP]`` or ``shared+STATE_URL``.
        wrap_exceptions: raise limits' ``StorageError`` around a ``StateError``.
        key_prefix: the prefix of every key written (default ``limits``, or
            the URI's ``?key_prefix=``).
        state: a ``SharedState`` to use instead of making one from ``uri``.
    """

    STORAGE_SCHEME = _SCHEMES

    def __init__(
        self,
        uri: str = "shared://",
        wrap_exceptions: bool = False,
        *,
        key_prefix: str | None = None,
        state: SharedState | None = None,
        **options: float | str | bool,
    ) -> None:
        _check_options(options)
        url, app, prefix = _parse(uri, key_prefix)
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self.state = state if state is not None else SharedState(url, app=app)
        self._keys = _Keys(prefix)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return StateError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` to the counter of ``key``, made with a ttl of ``expiry``."""
        return self.state.incr(self._keys.counter(key), amount, ttl=expiry)

    def get(self, key: str) -> int:
        """The counter of ``key`` (0 if missing)."""
        return _count(self.state.get(self._keys.counter(key)))

    def get_expiry(self, key: str) -> float:
        """When the counter of ``key`` expires (seconds since the epoch; now if missing)."""
        left = self.state.ttl(self._keys.counter(key))
        now = time.time()
        return now + left if left is not None and math.isfinite(left) else now

    def check(self) -> bool:
        """Whether the state answers (never raises)."""
        try:
            self.state.get(self._keys.check)
        except Exception:
            return False
        return True

    def reset(self) -> int | None:
        """Remove every key of this storage (those under its prefix); how many."""
        return self.state.clear(self._keys.prefix)

    def clear(self, key: str) -> None:
        """Remove the counter and the moving window of ``key``."""
        self.state.delete_many([self._keys.counter(key), self._keys.moving(key)])

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Add a hit of ``amount`` to the moving window of ``key``, unless that
        would exceed ``limit``."""
        if amount > limit:
            return False
        name = self._keys.moving(key)
        for attempt in range(CAS_ATTEMPTS):
            value, version = self.state.get_versioned(name)
            window = _Window(value).accept(time.time(), limit, expiry, amount)
            if window is None:
                return False
            if self.state.set_if_version(name, window, version, ttl=expiry):
                return True
            time.sleep(_pause(attempt))
        raise ConcurrentUpdateError(key, CAS_ATTEMPTS)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(start of the moving window of ``key``, hits in it)."""
        return _Window(self.state.get(self._keys.moving(key))).stats(time.time(), expiry)

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """Count a hit of ``amount`` in the current window of ``key`` unless the
        weighted count would exceed ``limit``."""
        if amount > limit:
            return False
        now = time.time()
        prev_key, cur_key = self._keys.sliding(key, expiry, now)
        found = self.state.get_many([prev_key, cur_key])
        prev, prev_ttl, cur, _ = _sliding(
            _count(found.get(prev_key)), _count(found.get(cur_key)), expiry, now
        )
        weighted = prev * prev_ttl / expiry
        if math.floor(weighted + cur) + amount > limit:
            return False
        cur = self.state.incr(cur_key, amount, ttl=2 * expiry)
        if math.floor(weighted + cur) > limit:
            self.state.incr(cur_key, -amount, ttl=2 * expiry)
            return False
        return True

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """(previous count, its ttl, current count, its ttl) of ``key``."""
        now = time.time()
        prev_key, cur_key = self._keys.sliding(key, expiry, now)
        found = self.state.get_many([prev_key, cur_key])
        return _sliding(_count(found.get(prev_key)), _count(found.get(cur_key)), expiry, now)

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        """Remove the current and previous window counters of ``key``."""
        self.state.delete_many(list(self._keys.sliding(key, expiry, time.time())))

    def __repr__(self) -> str:
        return f"SharedStorage({self.state.url!r}, key_prefix={self._keys.prefix[:-1]!r})"


# --- async ---------------------------------------------------------------------


class AsyncSharedStorage(
    aio_storage.Storage,
    aio_storage.MovingWindowSupport,
    aio_storage.SlidingWindowCounterSupport,
    TimestampedSlidingWindow,
):
    """The :mod:`limits.aio` twin of :class:`SharedStorage`, on an
    :class:`~shared_core.AsyncSharedState` (``async+shared://...``).

    Parameters: as for :class:`SharedStorage`; ``state`` is an ``AsyncSharedState``.
    """

    STORAGE_SCHEME = _ASYNC_SCHEMES

    def __init__(
        self,
        uri: str = "async+shared://",
        wrap_exceptions: bool = False,
        *,
        key_prefix: str | None = None,
        state: AsyncSharedState | None = None,
        **options: float | str | bool,
    ) -> None:
        _check_options(options)
        url, app, prefix = _parse(uri, key_prefix)
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self.state = state if state is not None else AsyncSharedState(url, app=app)
        self._keys = _Keys(prefix)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return StateError

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` to the counter of ``key``, made with a ttl of ``expiry``."""
        return await self.state.incr(self._keys.counter(key), amount, ttl=expiry)

    async def get(self, key: str) -> int:
        """The counter of ``key`` (0 if missing)."""
        return _count(await self.state.get(self._keys.counter(key)))

    async def get_expiry(self, key: str) -> float:
        """When the counter of ``key`` expires (seconds since the epoch; now if missing)."""
        left = await self.state.ttl(self._keys.counter(key))
        now = time.time()
        return now + left if left is not None and math.isfinite(left) else now

    async def check(self) -> bool:
        """Whether the state answers (never raises)."""
        try:
            await self.state.get(self._keys.check)
        except Exception:
            return False
        return True

    async def reset(self) -> int | None:
        """Remove every key of this storage (those under its prefix); how many."""
        return await self.state.clear(self._keys.prefix)

    async def clear(self, key: str) -> None:
        """Remove the counter and the moving window of ``key``."""
        await self.state.delete_many([self._keys.counter(key), self._keys.moving(key)])

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Add a hit of ``amount`` to the moving window of ``key``, unless that
        would exceed ``limit``."""
        if amount > limit:
            return False
        name = self._keys.moving(key)
        for attempt in range(CAS_ATTEMPTS):
            value, version = await self.state.get_versioned(name)
            window = _Window(value).accept(time.time(), limit, expiry, amount)
            if window is None:
                return False
            if await self.state.set_if_version(name, window, version, ttl=expiry):
                return True
            await asyncio.sleep(_pause(attempt))
        raise ConcurrentUpdateError(key, CAS_ATTEMPTS)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(start of the moving window of ``key``, hits in it)."""
        return _Window(await self.state.get(self._keys.moving(key))).stats(time.time(), expiry)

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """Count a hit of ``amount`` in the current window of ``key`` unless the
        weighted count would exceed ``limit``."""
        if amount > limit:
            return False
        now = time.time()
        prev_key, cur_key = self._keys.sliding(key, expiry, now)
        found = await self.state.get_many([prev_key, cur_key])
        prev, prev_ttl, cur, _ = _sliding(
            _count(found.get(prev_key)), _count(found.get(cur_key)), expiry, now
        )
        weighted = prev * prev_ttl / expiry
        if math.floor(weighted + cur) + amount > limit:
            return False
        cur = await self.state.incr(cur_key, amount, ttl=2 * expiry)
        if math.floor(weighted + cur) > limit:
            await self.state.incr(cur_key, -amount, ttl=2 * expiry)
            return False
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """(previous count, its ttl, current count, its ttl) of ``key``."""
        now = time.time()
        prev_key, cur_key = self._keys.sliding(key, expiry, now)
        found = await self.state.get_many([prev_key, cur_key])
        return _sliding(_count(found.get(prev_key)), _count(found.get(cur_key)), expiry, now)

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        """Remove the current and previous window counters of ``key``."""
        await self.state.delete_many(list(self._keys.sliding(key, expiry, time.time())))

    def __repr__(self) -> str:
        return f"AsyncSharedStorage({self.state.url!r}, key_prefix={self._keys.prefix[:-1]!r})"
