"""``AsyncSharedState``: the async twin of ``SharedState``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

from ._broadcast import AsyncSubscription
from ._checks import (
    check_amount,
    check_key,
    check_keys,
    check_mapping,
    check_nbytes,
    check_timeout,
    check_ttl,
    check_version,
)
from ._config import Config, resolve
from ._errors import LockTimeout
from ._lease import AsyncLease
from ._near import MISS
from ._once import arun_once
from .engines import async_engine


class AsyncSharedState:
    """The async API of :class:`SharedState`: every method is awaitable.

    Parameters:
        url: as for :class:`SharedState`.
        app: as for :class:`SharedState`.
        near_cache: as for :class:`SharedState`.

    Waiting for the server never blocks the event loop: calls are written to
    a non-blocking socket and many concurrent calls share one connection
    (pipelined); a held lock or ``mutate`` has a connection of its own.
    Use it from one event loop at a time.
    """

    def __init__(
        self, url: str | None = None, *, app: str | None = None, near_cache: Iterable[str] = ()
    ) -> None:
        self._config: Config = resolve(url, app, near_cache)
        self._engine = async_engine(self._config)
        self._codec = self._engine.codec
        self._near = self._engine.near

    @property
    def url(self) -> str:
        """The URL this state resolved to."""
        return self._config.url

    async def get(self, key: str, default: Any = None) -> Any:
        """Return a copy of the value of ``key``, or ``default``."""
        near = self._near
        if near is not None:
            value = near.read(key, default)  # no round trip while it is current
            if value is not MISS:
                return value
        return self._codec.decode(await self._engine.get(check_key(key)), default)

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (see :meth:`SharedState.set`)."""
        await self._engine.set(check_key(key), self._codec.encode(value), check_ttl(ttl))

    async def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is missing (or expired); return whether it did."""
        raw = self._codec.encode(value)
        return await self._engine.add(check_key(key), raw, check_ttl(ttl))

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it existed."""
        return await self._engine.delete(check_key(key))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add ``amount`` to the int at ``key`` (see :meth:`SharedState.incr`)."""
        return await self._engine.incr(check_key(key), check_amount(amount), check_ttl(ttl))

    async def setdefault(self, key: str, value: Any) -> Any:
        """Store ``value`` unless ``key`` exists; return the stored value."""
        raw = self._codec.encode(value)
        return self._codec.decode(await self._engine.setdefault(check_key(key), raw))

    async def expire(self, key: str, ttl: float | None) -> bool:
        """Make ``key`` expire ``ttl`` seconds from now (None: never); False if missing."""
        return await self._engine.expire(check_key(key), check_ttl(ttl))

    async def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; ``math.inf`` if it never does; None if missing."""
        return await self._engine.ttl(check_key(key))

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist, in one round trip."""
        found = await self._engine.get_many(check_keys(keys))
        return {k: self._codec.decode(raw) for k, raw in found.items()}

    async def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping`` at once (all or nothing), in one round trip."""
        items = {k: self._codec.encode(v) for k, v in check_mapping(mapping).items()}
        await self._engine.set_many(items, check_ttl(ttl))

    async def delete_many(self, keys: Iterable[str]) -> int:
        """Remove ``keys`` in one round trip; return how many existed."""
        return await self._engine.delete_many(check_keys(keys))

    async def get_versioned(self, key: str, default: Any = None) -> tuple[Any, int | None]:
        """Return ``(value, version)`` (see :meth:`SharedState.get_versioned`)."""
        raw, version = await self._engine.get_versioned(check_key(key))
        return self._codec.decode(raw, default), version

    async def set_if_version(
        self, key: str, value: Any, version: int | None, ttl: float | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is still at ``version`` (None: only if missing)."""
        raw = self._codec.encode(value)
        return await self._engine.set_if_version(
            check_key(key), raw, check_version(version), check_ttl(ttl)
        )

    async def keys(self, prefix: str = "") -> list[str]:
        """Return the sorted keys that start with ``prefix``."""
        return await self._engine.keys(check_key(prefix))

    async def clear(self, prefix: str = "") -> int:
        """Remove every key that starts with ``prefix``; return how many."""
        return await self._engine.clear(check_key(prefix))

    async def secret(self, name: str, nbytes: int = 32) -> str:
        """Return a random hex secret made once per deployment (see ``SharedState``)."""
        return await self._engine.secret(check_key(name), check_nbytes(nbytes))

    async def rotate_secret(self, name: str, nbytes: int = 32) -> str:
        """Replace the secret ``name`` with a new random one and return it."""
        return await self._engine.rotate_secret(check_key(name), check_nbytes(nbytes))

    @asynccontextmanager
    async def lock(self, name: str, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold the cross-process lock ``name`` for the ``async with`` block."""
        timeout = check_timeout(timeout)
        handle = await self._engine.lock_acquire(check_key(name), timeout)
        if handle is None:
            raise LockTimeout(f"lock {name!r} not acquired within {timeout:g}s")
        try:
            yield
        finally:
            await self._engine.lock_release(handle, name)

    @asynccontextmanager
    async def mutate(
        self, key: str, default: Any = None, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        """Read-modify-write the whole value of ``key``, atomically (see ``SharedState``)."""
        handle, raw = await self._engine.mutate_begin(check_key(key), check_timeout(timeout))
        try:
            value = self._codec.decode(raw, default)
            yield value
            data = self._codec.encode(value)
        except BaseException:
            await self._engine.mutate_end(handle, key, None, False)
            raise
        await self._engine.mutate_end(handle, key, data, True)

    def lease(self, name: str, ttl: float = 10.0) -> AsyncLease:
        """An :class:`AsyncLease` (see :meth:`SharedState.lease`)."""
        return AsyncLease(self, name, ttl)

    async def run_once(
        self,
        name: str,
        func: Callable[[], Awaitable[Any] | Any],
        *,
        wait: float | None = 60.0,
        ttl: float = 30.0,
    ) -> bool:
        """See :meth:`SharedState.run_once`; ``func`` may be a coroutine function."""
        return await arun_once(self, name, func, wait=wait, ttl=ttl)

    async def publish(self, channel: str, message: Any) -> int:
        """Send ``message`` to every current subscriber of ``channel`` (see ``SharedState``)."""
        raw = self._codec.encode(message)
        return await self._engine.publish(check_key(channel), raw)

    def subscribe(
        self, *channels: str, on_connect: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncSubscription:
        """Messages published to ``channels``, as an async iterator::

            async with state.subscribe("reload") as messages:
                async for channel, message in messages:
                    ...

        The guarantee is that of :meth:`SharedState.subscribe`; ``on_connect``
        is awaited after every (re)subscribe.
        """
        if not channels:
            raise ValueError("subscribe to at least one channel")
        names = [check_key(c) for c in channels]
        return AsyncSubscription(self._engine, self._codec, names, on_connect)

    async def info(self) -> dict[str, Any]:
        """Return what the server reports about itself (pid, clients, keys, ...)."""
        return await self._engine.info()

    async def aclose(self) -> None:
        """Close the connections (a later call reconnects)."""
        await self._engine.aclose()

    async def __aenter__(self) -> AsyncSharedState:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncSharedState({self.url!r})"
