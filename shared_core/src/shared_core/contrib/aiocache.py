"""An aiocache cache on the shared state (aiocache 0.12's API).

``pip install "shared-core[aiocache]"`` (``aiocache>=0.12,<1``: 1.0 changes the
backend interface)::

    from shared_core import AsyncSharedState
    from shared_core.contrib.aiocache import SharedStateCache

    cache = SharedStateCache(AsyncSharedState(app="my_app"), namespace="pages:", ttl=300)
    await cache.set("home", html)  # seen by every worker at once


    @cached(cache=SharedStateCache, url="...")  # or with aiocache's decorators
    async def expensive(): ...

or ``caches.set_config({"default": {"cache": "shared_core.contrib.aiocache.SharedStateCache"}})``.

What it keeps of aiocache's contract, and how:

- **Values**: the default serializer is ``NullSerializer``, so values reach
  the state as they are and the state's codec stores them: an ``int`` as
  itself (``increment`` adds on the server, one round trip), anything else
  pickled by the client on the embedded engine (an authenticated server that
  never unpickles), JSON-like only on Redis unless ``?serializer=pickle``.
  aiocache's other serializers work too (their output is a ``str`` or, for
  pickle and msgpack, ``bytes``, which Redis takes only with ``?serializer=pickle``).
- **Keys**: aiocache builds ``namespace + key``; the state holds it as
  ``key_prefix + that`` (default ``"aiocache:"``), and ``clear()`` removes
  only keys with the prefix, never the rest of the state.
- **ttl**: seconds (float or int); None or 0 never expires; ``expire(key, 0)``
  removes an expiry.
- **Compare-and-set**: ``_gets`` returns the key's version (None if missing)
  as the cas token and ``set(..., _cas_token=)`` is ``set_if_version``:
  ``OptimisticLock.cas`` fails if anyone wrote the key since, even with an
  equal value. As with aiocache's own backends, a lock taken on a missing key
  never conflicts (a None token means no check).
- **RedLock**: ``_add`` takes the lease atomically; ``_redlock_release``
  removes it only if it still holds this lock's value (see
  :meth:`SharedStateCache._redlock_release` for how).
- **The state unavailable**: every operation raises
  :class:`~shared_core.StateUnavailable` after the state's bounded wait;
  aiocache's ``cached``/``multi_cached`` decorators log it and call the function.

An :class:`~shared_core.AsyncSharedState` is used from one event loop at a time:
make the cache where it is used (in the app's startup), not at import time
for several loops.
"""

from __future__ import annotations

import asyncio
import math
from enum import Enum
from typing import Any

from aiocache.base import BaseCache  # type: ignore[import-untyped]
from aiocache.serializers import NullSerializer  # type: ignore[import-untyped]

from .._aio import AsyncSharedState

__all__ = ["DEFAULT_KEY_PREFIX", "SharedStateCache"]

DEFAULT_KEY_PREFIX = "aiocache:"

# How long a RedLock key is kept, re-checked and ours, between its release's
# compare-and-set and its delete (see _redlock_release).
_RELEASE_GUARD = 5.0

# What raw() may call: the state's data operations.
_RAW_COMMANDS = frozenset(
    {
        "get", "set", "add", "delete", "incr", "setdefault", "expire", "ttl",
        "get_many", "set_many", "delete_many", "get_versioned", "set_if_version",
        "keys", "clear", "info",
    }
)  # fmt: skip


class SharedStateCache(BaseCache):  # type: ignore[misc]
    """An aiocache cache whose entries live in the shared state.

    Parameters:
        state: the :class:`~shared_core.AsyncSharedState` to keep entries in
            (e.g. the app's); else one is made from ``url`` and ``app``, and
            ``close()`` closes it.
        url: where the state lives, if no ``state`` is given (default
            ``$SHARED_STATE_URL``, else ``local://APP``).
        app: the app name of the default ``local://`` address.
        key_prefix: prepended to every key aiocache builds (default
            ``"aiocache:"``, never empty); ``clear()`` removes only those keys.
        serializer: aiocache's; default ``NullSerializer`` (the state encodes).
        plugins, namespace, key_builder, timeout, ttl: aiocache's, as for
            every aiocache backend.
    """

    NAME = "shared_core"

    def __init__(
        self,
        state: AsyncSharedState | None = None,
        *,
        url: str | None = None,
        app: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        serializer: Any = None,
        plugins: Any = None,
        namespace: str | None = None,
        key_builder: Any = None,
        timeout: float | None = 5,
        ttl: float | None = None,
    ) -> None:
        super().__init__(
            serializer=serializer or NullSerializer(),
            plugins=plugins,
            namespace=namespace,
            key_builder=key_builder,
            timeout=timeout,
            ttl=ttl,
        )
        if state is not None and not isinstance(state, AsyncSharedState):
            raise TypeError(f"state must be an AsyncSharedState, not {type(state).__name__}")
        if state is not None and (url is not None or app is not None):
            raise TypeError("pass a state, or url/app to make one; not both")
        if not isinstance(key_prefix, str) or not key_prefix:
            raise ValueError(
                f"key_prefix must be a non-empty str, not {key_prefix!r}: clear() removes "
                "every key with the prefix, and the state holds more than this cache"
            )
        self.key_prefix = key_prefix
        self._adding: dict[str, set[asyncio.Future[None]]] = {}  # see _add
        self._owns_state = state is None
        self.state: AsyncSharedState = AsyncSharedState(url, app=app) if state is None else state

    # --- keys, ttls, values -----------------------------------------------------

    def _key(self, key: Any) -> str:
        if isinstance(key, Enum):
            key = key.value
        if isinstance(key, bytes):
            key = key.decode()
        elif isinstance(key, (int, float)) and not isinstance(key, bool):
            key = str(key)  # as redis-py sends them
        if not isinstance(key, str):
            raise TypeError(f"cache keys are str, not {type(key).__name__}")
        return self.key_prefix + key

    @staticmethod
    def _ttl(ttl: float | None) -> float | None:
        return None if ttl is None or ttl == 0 else ttl

    def _out(self, value: Any, encoding: str | None) -> Any:
        # A text serializer (JSON, str) loads a str, as Redis gives back an int
        # that INCRBY made: so does this backend for the ints increment() makes.
        if type(value) is int and encoding is not None and not self._null_serializer():
            return str(value)
        return value

    def _null_serializer(self) -> bool:
        return isinstance(self.serializer, NullSerializer)

    # --- aiocache's backend interface ---------------------------------------------

    async def _get(self, key: Any, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        return self._out(await self.state.get(self._key(key)), encoding)

    async def _gets(self, key: Any, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        """The cas token of ``key``: its version, None if it is missing."""
        _, version = await self.state.get_versioned(self._key(key))
        return version

    async def _multi_get(
        self, keys: list[Any], encoding: str | None = "utf-8", _conn: Any = None
    ) -> list[Any]:
        names = [self._key(k) for k in keys]
        if not names:
            return []
        found = await self.state.get_many(names)
        return [self._out(found.get(name), encoding) for name in names]

    async def _set(
        self,
        key: Any,
        value: Any,
        ttl: float | None = None,
        _cas_token: Any = None,
        _conn: Any = None,
    ) -> bool:
        name = self._key(key)
        if _cas_token is not None:
            return await self.state.set_if_version(name, value, _cas_token, self._ttl(ttl))
        await self.state.set(name, value, self._ttl(ttl))
        return True

    async def _multi_set(
        self, pairs: list[tuple[Any, Any]], ttl: float | None = None, _conn: Any = None
    ) -> bool:
        mapping = {self._key(k): v for k, v in pairs}
        if mapping:
            await self.state.set_many(mapping, self._ttl(ttl))
        return True

    async def _add(self, key: Any, value: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        """Store ``value`` only if ``key`` is missing (atomic); ValueError if it exists.

        A failed add first waits for the adds of the same key still in flight
        in this process: aiocache's ``RedLock`` publishes its wake-up event
        right after the winning ``_add`` returns, and a loser that looked
        before (its reply came first, on another Redis connection) would find
        no event, or one of an earlier lock, and not wait for the winner.
        """
        name = self._key(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        in_flight = self._adding.setdefault(name, set())
        in_flight.add(mine)
        try:
            added = await self.state.add(name, value, self._ttl(ttl))
        finally:
            in_flight.discard(mine)
            if not in_flight and self._adding.get(name) is in_flight:
                del self._adding[name]
            mine.set_result(None)  # the winner's caller runs on before a waiter wakes
        if not added:
            others = self._adding.get(name)
            if others:
                await asyncio.wait(set(others))
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        return True

    async def _exists(self, key: Any, _conn: Any = None) -> bool:
        return await self.state.ttl(self._key(key)) is not None

    async def _increment(self, key: Any, delta: int, _conn: Any = None) -> int:
        """Add ``delta`` on the server (an int value, or a missing key: one round trip).

        A value a text serializer wrote (``"41"``) is incremented by
        compare-and-set and stays text, as Redis does; anything else is a
        ``TypeError``.
        """
        name = self._key(key)
        try:
            return await self.state.incr(name, delta)
        except TypeError:
            if type(delta) is not int:
                raise
        return await self._increment_text(name, delta)

    async def _increment_text(self, name: str, delta: int) -> int:
        while True:
            value, version = await self.state.get_versioned(name)
            if version is None:  # gone meanwhile: an int again, on the server
                try:
                    return await self.state.incr(name, delta)
                except TypeError:
                    continue  # a text value again
            if type(value) is int:  # written as an int meanwhile
                return await self.state.incr(name, delta)
            number = _as_int(value)
            if number is None:
                raise TypeError("Value is not an integer")
            new = number + delta
            text = str(new)
            left = await self.state.ttl(name)
            if left is None:
                continue  # expired or removed meanwhile
            ttl = None if math.isinf(left) else left
            stored = text if isinstance(value, str) else text.encode()
            if await self.state.set_if_version(name, stored, version, ttl):
                return new

    async def _expire(self, key: Any, ttl: float | None, _conn: Any = None) -> bool:
        return await self.state.expire(self._key(key), self._ttl(ttl))

    async def _delete(self, key: Any, _conn: Any = None) -> int:
        return int(await self.state.delete(self._key(key)))

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        await self.state.clear(self.key_prefix + (namespace or ""))
        return True

    async def _raw(
        self,
        command: str,
        *args: Any,
        encoding: str | None = "utf-8",
        _conn: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Call one of the state's data operations with full state keys (no
        prefix or namespace added), e.g. ``await cache.raw("keys", "aiocache:")``."""
        if command not in _RAW_COMMANDS:
            raise ValueError(f"raw({command!r}): use one of {', '.join(sorted(_RAW_COMMANDS))}")
        return await getattr(self.state, command)(*args, **kwargs)

    async def _redlock_release(self, key: Any, value: Any) -> int:
        """Remove a RedLock's key if it still holds ``value``; 1 if it did.

        The state has no compare-and-delete, so: read the value and its
        version; if it is ours, rewrite it only if still at that version
        (atomic) with a fresh ``_RELEASE_GUARD`` (5 s) expiry, which makes it
        ours for that long whatever its lease was; then delete it. Another
        holder's lock could be deleted only if the delete came more than 5 s
        after the compare-and-set (a frozen worker).
        """
        name = self._key(key)
        current, version = await self.state.get_versioned(name)
        if version is None or current != value:
            return 0
        if not await self.state.set_if_version(name, current, version, _RELEASE_GUARD):
            return 0
        return int(await self.state.delete(name))

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        if self._owns_state:
            await self.state.aclose()

    def __repr__(self) -> str:
        return f"SharedStateCache({self.state!r}, key_prefix={self.key_prefix!r})"


def _as_int(value: Any) -> int | None:
    """The int a text serializer wrote (``"12"``, ``b"-3"``), else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    try:
        return int(value)
    except ValueError:
        return None
