"""A ``cachelib`` cache on the shared state: one cache for every worker.

``pip install "shared-core[cachelib]"``::

    from shared_core import SharedState
    from shared_core.contrib.cachelib import SharedStateCache

    cache = SharedStateCache(SharedState(app="my_app"), default_timeout=300)
    cache.set("page:/", html)  # seen by every worker at once
    cache.inc("hits")  # atomic on the server

It is a :class:`cachelib.BaseCache`, so whatever takes one takes it: Flask-Session
(``SESSION_TYPE = "cachelib"``, ``SESSION_CACHELIB = cache``), or flask-caching
through :mod:`shared_core.contrib.flask_caching`.

What it keeps of cachelib's contract, and how:

- **Timeouts** in whole seconds or a ``timedelta``: ``None`` is
  ``default_timeout``, ``0`` never expires, a negative one is already expired
  (``set`` removes the key). Expiry is the state's: exact, on every engine.
- **Keys** live in the state as ``key_prefix + key`` (default prefix
  ``"cachelib:"``; a callable prefix is called on every use). ``clear()``
  removes the keys with that prefix and nothing else, so a cache never
  clears the app's own keys; an empty prefix is refused for that reason.
- **Values** are stored by the state's codec, not by a cachelib serializer:
  an ``int`` as itself (``inc``/``dec`` add to it on the server, one round
  trip, never a lost update), anything else pickled by the client on the
  embedded engine, whose server is authenticated (HMAC) and never unpickles.
  On Redis values are JSON-like unless the URL says ``?serializer=pickle``
  (a shared Redis may hold bytes written by others). A value the codec
  refuses raises :class:`UnstorableValue`, a ``TypeError`` that is also the
  ``pickle.PicklingError`` cachelib documents.
- **Batches**: ``get_many``/``set_many``/``delete_many`` are one round trip
  each; ``set_many`` is all or nothing.
- **The state unavailable**: every method raises
  :class:`~shared_core.StateUnavailable` after the state's bounded wait
  (``connect_timeout``, ``op_timeout``); nothing is reported as a miss or a
  failed write, so that a session store never silently forgets a session.
  flask-caching's ``cached``/``memoize`` catch it, log it and call the
  function.
"""

from __future__ import annotations

import datetime as dt
import pickle
from collections.abc import Callable
from typing import Any

from cachelib.base import BaseCache

from .._state import SharedState

__all__ = ["DEFAULT_KEY_PREFIX", "SharedStateCache", "UnstorableValue"]

DEFAULT_KEY_PREFIX = "cachelib:"


class UnstorableValue(TypeError, pickle.PicklingError):
    """A value the state's codec cannot store (not picklable; on Redis
    without ``?serializer=pickle``: not JSON-like). Nothing was written."""


class _Expired:
    """A negative timeout: the entry is expired as soon as it is written."""


_EXPIRED = _Expired()


class SharedStateCache(BaseCache):
    """A :class:`cachelib.BaseCache` whose entries live in the shared state.

    Parameters:
        state: the :class:`~shared_core.SharedState` to keep entries in (e.g.
            the app's, from ``shared_core.flask.get_state``); else one is made
            from ``url`` and ``app``, and :meth:`close` closes it.
        url: where the state lives, if no ``state`` is given (default
            ``$SHARED_STATE_URL``, else ``local://APP``).
        app: the app name of the default ``local://`` address.
        default_timeout: seconds (or a ``timedelta``) for a ``timeout`` of None;
            0: never expire.
        key_prefix: prepended to every key, a ``str`` or a callable returning
            one (default ``"cachelib:"``); ``clear()`` removes only its keys.
        ignore_delete_many_errors: cachelib's flag; no key can fail to be
            deleted here (a missing key counts as deleted), so it changes nothing.
    """

    def __init__(
        self,
        state: SharedState | None = None,
        *,
        url: str | None = None,
        app: str | None = None,
        default_timeout: int | dt.timedelta = 300,
        key_prefix: str | Callable[[], str] | None = None,
        ignore_delete_many_errors: bool = True,
    ) -> None:
        super().__init__(default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        if state is not None and not isinstance(state, SharedState):
            raise TypeError(f"state must be a SharedState, not {type(state).__name__}")
        if state is not None and (url is not None or app is not None):
            raise TypeError("pass a state, or url/app to make one; not both")
        self.key_prefix: str | Callable[[], str] = (
            DEFAULT_KEY_PREFIX if key_prefix is None else key_prefix
        )
        if not callable(self.key_prefix):
            self._get_prefix()  # an empty prefix is refused now, not at the first clear()
        self._owns_state = state is None
        self.state: SharedState = SharedState(url, app=app) if state is None else state

    # --- keys and timeouts --------------------------------------------------------

    def _get_prefix(self) -> str:
        prefix = self.key_prefix() if callable(self.key_prefix) else self.key_prefix
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(
                f"key_prefix must be a non-empty str, not {prefix!r}: clear() removes "
                "every key with the prefix, and the state holds more than this cache"
            )
        return prefix

    def _key(self, key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"cache keys are str, not {type(key).__name__}")
        return self._get_prefix() + key

    def _ttl(self, timeout: int | dt.timedelta | None) -> float | _Expired | None:
        """The state's ttl for a cachelib timeout: None never expires."""
        seconds = self._normalize_timeout(timeout)
        if seconds == 0:
            return None
        if seconds < 0:
            return _EXPIRED
        return float(seconds)

    def _counter_ttl(self) -> float | None:
        """The ttl of a counter ``inc``/``dec`` creates: the default timeout."""
        return None if self.default_timeout <= 0 else float(self.default_timeout)

    # --- cachelib's API -------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The value of ``key``, or None if it is missing or expired."""
        return self.state.get(self._key(key))

    def get_many(self, *keys: str) -> list[Any]:
        """The values of ``keys`` in order (None for a miss), in one round trip."""
        if not keys:
            return []
        names = [self._key(k) for k in keys]
        found = self.state.get_many(names)
        return [found.get(name) for name in names]

    def set(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        """Store ``value``; True (an unavailable state raises, it never returns False)."""
        name = self._key(key)
        ttl = self._ttl(timeout)
        if isinstance(ttl, _Expired):
            self.state.delete(name)
            return True
        try:
            self.state.set(name, value, ttl)
        except TypeError as exc:
            raise UnstorableValue(str(exc)) from exc
        return True

    def add(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        """Store ``value`` only if ``key`` is missing (atomic); whether it did."""
        name = self._key(key)
        ttl = self._ttl(timeout)
        if isinstance(ttl, _Expired):  # added and expired at once: only say whether it could be
            return self.state.ttl(name) is None
        try:
            return self.state.add(name, value, ttl)
        except TypeError as exc:
            raise UnstorableValue(str(exc)) from exc

    def set_many(
        self, mapping: dict[str, Any], timeout: int | dt.timedelta | None = None
    ) -> list[Any]:
        """Store every item at once (all or nothing, one round trip); the keys set."""
        names = {self._key(k): v for k, v in mapping.items()}
        ttl = self._ttl(timeout)
        if isinstance(ttl, _Expired):
            self.state.delete_many(list(names))
        elif names:
            try:
                self.state.set_many(names, ttl)
            except TypeError as exc:
                raise UnstorableValue(str(exc)) from exc
        return list(mapping)

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it existed."""
        return self.state.delete(self._key(key))

    def delete_many(self, *keys: str) -> list[Any]:
        """Remove ``keys`` in one round trip; all of them are then deleted (a
        missing key counts as deleted), so all are returned."""
        if keys:
            self.state.delete_many([self._key(k) for k in keys])
        return list(keys)

    def has(self, key: str) -> bool:
        """Whether ``key`` exists, without reading its value."""
        return self.state.ttl(self._key(key)) is not None

    def clear(self) -> bool:
        """Remove every key with this cache's prefix (only those); True."""
        self.state.clear(self._get_prefix())
        return True

    def inc(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` on the server (one round trip, atomic across workers).

        A missing key starts at 0 and expires after ``default_timeout``; an
        existing one keeps its expiry. ``TypeError`` if the value is not an int.
        """
        return self.state.incr(self._key(key), delta, self._counter_ttl())

    def dec(self, key: str, delta: int = 1) -> int:
        """Subtract ``delta`` on the server (see :meth:`inc`)."""
        return self.state.incr(self._key(key), -delta, self._counter_ttl())

    # --- beyond cachelib ------------------------------------------------------------

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; ``math.inf`` if never; None if missing."""
        return self.state.ttl(self._key(key))

    def close(self) -> None:
        """Close the state's connections if this cache made the state."""
        if self._owns_state:
            self.state.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state!r}, key_prefix={self.key_prefix!r})"
