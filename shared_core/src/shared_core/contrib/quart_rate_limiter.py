"""A quart-rate-limiter store on the shared state: one limit for every worker.

``pip install "shared-core[quart-rate-limiter]"``::

    from quart_rate_limiter import RateLimiter
    from shared_core.contrib.quart_rate_limiter import SharedStateStore
    from shared_core.quart import SharedStateExtension

    state = SharedStateExtension().init_app(app)
    RateLimiter(app, store=SharedStateStore(state))

quart-rate-limiter keeps, per key, a GCRA "theoretical arrival time" (TAT).
For each request it reads the TAT to decide (``get``), then reads it again
and writes ``max(tat, now) + period / count`` (``get`` then ``set``). Its
store interface is those two calls, so with a plain ``set`` (its
``MemoryStore`` and ``RedisStore``) two workers that read the same TAT both
write the same next one: one request is never counted.

This store counts every admitted request: ``get`` remembers, per task and
key, the TAT it returned, the ``now`` the limiter passed as the default and
the key's version; ``set`` derives the limiter's step (``tat - max(stored,
now)``) and writes with ``set_if_version``, retrying from the current TAT
if another worker wrote in between. So each update is atomic across workers
and no update is lost. The decision itself is still made on a read taken
before the update (the interface has no call that decides and updates at
once): requests for one key that arrive together may all be admitted, up to
one per request in flight, and the TAT then carries all of them, so the
requests that follow wait that much longer.

TATs are stored as ints (microseconds since the epoch, exact) under
``key_prefix + key`` and expire once they are in the past (plus
``expiry_margin``): a TAT behind ``now`` means nothing to GCRA, so the
state does not grow with every client ever seen.

While the state is unavailable, ``get`` and ``set`` raise
:class:`~shared_core.StateUnavailable` (a 503 with
:class:`shared_core.quart.SharedStateExtension`; the limiter's
``after_request`` then gets ``now`` at once, so the 503 stays a 503 and the
request waits for the state only once; the same when the 503 came from
elsewhere in the request: :func:`shared_core.quart.unavailable_in_this_request`);
with ``fail_open=True`` they log a warning and let the request through, uncounted.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from datetime import datetime, timedelta, timezone

from quart_rate_limiter.store import RateLimiterStoreABC

from .._aio import AsyncSharedState
from .._errors import StateUnavailable
from ..quart import unavailable_in_this_request

__all__ = ["DEFAULT_KEY_PREFIX", "SharedStateStore"]

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "quart_rate_limiter:"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _micros(when: datetime) -> int:
    """``when`` as whole microseconds since the epoch (a naive one is local time,
    as quart-rate-limiter reads it)."""
    if when.tzinfo is None:
        when = when.astimezone(timezone.utc)
    return (when - _EPOCH) // _MICROSECOND


def _datetime(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class _Read:
    """What ``get`` returned for a key, for the ``set`` that follows it."""

    __slots__ = ("now", "tat", "version")

    def __init__(self, tat: int | None, now: int, version: int | None) -> None:
        self.tat = tat
        self.now = now
        self.version = version


class SharedStateStore(RateLimiterStoreABC):
    """A ``RateLimiterStoreABC`` whose TATs live in the shared state.

    Parameters:
        state: the :class:`~shared_core.AsyncSharedState` to keep TATs in (e.g.
            the app's, from ``shared_core.quart``); else one is made from
            ``url`` and ``app`` and closed in ``after_serving``.
        url: where the state lives, if no ``state`` is given.
        app: the app name of the default ``local://`` address.
        key_prefix: prepended to the limiter's keys (default
            ``"quart_rate_limiter:"``).
        expiry_margin: seconds a TAT is kept after it has passed (allowance
            for clocks of several machines that differ a little).
        fail_open: while the state is unavailable, admit requests (and log)
            instead of raising ``StateUnavailable``.
    """

    def __init__(
        self,
        state: AsyncSharedState | None = None,
        *,
        url: str | None = None,
        app: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        expiry_margin: float = 1.0,
        fail_open: bool = False,
    ) -> None:
        if state is not None and not isinstance(state, AsyncSharedState):
            raise TypeError(f"state must be an AsyncSharedState, not {type(state).__name__}")
        if state is not None and (url is not None or app is not None):
            raise TypeError("pass a state, or url/app to make one; not both")
        if not expiry_margin > 0:
            raise ValueError(f"expiry_margin must be > 0 seconds, not {expiry_margin!r}")
        self.key_prefix = key_prefix
        self.expiry_margin = float(expiry_margin)
        self.fail_open = fail_open
        self._owns_state = state is None
        self.state: AsyncSharedState = AsyncSharedState(url, app=app) if state is None else state
        self._reads: weakref.WeakKeyDictionary[asyncio.Task[object], dict[str, _Read]] = (
            weakref.WeakKeyDictionary()
        )
        # Tasks (requests) that found the state unavailable: their later calls
        # (the limiter's after_request reads the TAT again for its headers)
        # answer at once instead of waiting out the timeouts a second time.
        self._failed: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()

    async def before_serving(self) -> None:
        """Nothing: the state connects on first use."""

    async def after_serving(self) -> None:
        """Close the state's connections if this store made the state."""
        if self._owns_state:
            await self.state.aclose()

    async def get(self, key: str, default: datetime) -> datetime:
        """The TAT of ``key``, or ``default`` (the limiter's ``now``)."""
        name = self.key_prefix + key
        task = asyncio.current_task()
        if task is not None and (task in self._failed or unavailable_in_this_request()):
            return default  # this request already failed on the state: do not wait again
        try:
            raw, version = await self.state.get_versioned(name)
        except StateUnavailable as exc:
            if task is not None:
                self._failed.add(task)
            if not self.fail_open:
                raise
            logger.warning("rate limit %r not checked, the state is unavailable: %s", key, exc)
            return default
        tat = raw if type(raw) is int else None  # anything else is overwritten by set
        self._remember(name, _Read(tat, _micros(default), version))
        return default if tat is None else _datetime(tat)

    async def set(self, key: str, tat: datetime) -> None:
        """Advance the TAT of ``key`` to ``tat``, counting every worker's request.

        After a :meth:`get` of the same key in the same task (what the
        limiter does), the step ``tat - max(read TAT, now)`` is added to the
        current TAT by compare-and-set; otherwise ``tat`` is written as is.
        """
        name = self.key_prefix + key
        wanted = _micros(tat)
        read = self._recall(name)
        if asyncio.current_task() in self._failed or unavailable_in_this_request():
            return
        try:
            base = 0 if read is None else read.now if read.tat is None else max(read.tat, read.now)
            step = wanted - base
            if read is None or step <= 0:  # not the limiter's get-then-advance: write as is
                now = _micros(datetime.now(timezone.utc)) if read is None else read.now
                await self.state.set(name, wanted, self._ttl(wanted, now))
                return
            version = read.version
            while not await self.state.set_if_version(
                name, wanted, version, self._ttl(wanted, read.now)
            ):
                raw, version = await self.state.get_versioned(name)
                current = raw if type(raw) is int else None
                wanted = (read.now if current is None else max(current, read.now)) + step
        except StateUnavailable as exc:
            if not self.fail_open:
                raise
            logger.warning("rate limit %r not counted, the state is unavailable: %s", key, exc)

    def _ttl(self, tat: int, now: int) -> float:
        """Keep a TAT until it has passed (by the limiter's clock), plus the margin."""
        return max(tat - now, 0) / 1e6 + self.expiry_margin

    def _remember(self, name: str, read: _Read) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._reads.setdefault(task, {})[name] = read

    def _recall(self, name: str) -> _Read | None:
        task = asyncio.current_task()
        if task is None:
            return None
        return self._reads.get(task, {}).pop(name, None)
