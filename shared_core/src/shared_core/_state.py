"""``SharedState``: the sync API, the same on every engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from ._broadcast import Subscription
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
from ._lease import Lease
from ._near import MISS
from ._once import run_once
from .engines import sync_engine


class SharedState:
    """One state shared by every worker process of a deployment (sync API).

    Parameters:
        url: where the state lives (see the package README); default
            ``$SHARED_STATE_URL``, else ``local://APP``, a server started on
            demand on a private Unix socket.
        app: the app name that picks the default ``local://`` address.
        near_cache: prefixes of keys this code reads often and writes rarely,
            kept in each process (see "Near cache" in the package README)
            where the engine can: an embedded server on a Unix socket, or
            Redis; on ``tcp://`` and PostgreSQL they are read from the
            server. Added to the URL's ``near_cache=``; a URL's
            ``near_cache_size=0`` turns both off.

    Nothing connects until the first call. Instances may be shared between
    threads (each thread gets its own connection) and survive ``fork`` (the
    child opens its own). Calls raise :class:`StateUnavailable` when the
    server cannot be reached within ``connect_timeout``.
    """

    def __init__(
        self, url: str | None = None, *, app: str | None = None, near_cache: Iterable[str] = ()
    ) -> None:
        self._config: Config = resolve(url, app, near_cache)
        self._engine = sync_engine(self._config)
        self._codec = self._engine.codec
        self._near = self._engine.near

    @property
    def url(self) -> str:
        """The URL this state resolved to."""
        return self._config.url

    def get(self, key: str, default: Any = None) -> Any:
        """Return a copy of the value of ``key``, or ``default``."""
        near = self._near
        if near is not None:
            value = near.read(key, default)  # no round trip while it is current
            if value is not MISS:
                return value
        return self._codec.decode(self._engine.get(check_key(key)), default)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds (None:
        never; a previous expiry is removed). TypeError if it cannot be encoded."""
        self._engine.set(check_key(key), self._codec.encode(value), check_ttl(ttl))

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is missing (or expired); return whether it did."""
        return self._engine.add(check_key(key), self._codec.encode(value), check_ttl(ttl))

    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it existed."""
        return self._engine.delete(check_key(key))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add ``amount`` to the int at ``key`` (0 if missing) on the server; return it.

        ``ttl`` applies when this call creates the key (a fixed window, as a
        rate limiter needs); an existing key keeps its expiry.
        """
        return self._engine.incr(check_key(key), check_amount(amount), check_ttl(ttl))

    def setdefault(self, key: str, value: Any) -> Any:
        """Store ``value`` unless ``key`` exists; return the stored value."""
        return self._codec.decode(
            self._engine.setdefault(check_key(key), self._codec.encode(value))
        )

    def expire(self, key: str, ttl: float | None) -> bool:
        """Make ``key`` expire ``ttl`` seconds from now (None: never); False if missing."""
        return self._engine.expire(check_key(key), check_ttl(ttl))

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; ``math.inf`` if it never does; None if missing."""
        return self._engine.ttl(check_key(key))

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist, in one round trip."""
        found = self._engine.get_many(check_keys(keys))
        return {k: self._codec.decode(raw) for k, raw in found.items()}

    def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping`` at once (all or nothing), in one round trip."""
        items = {k: self._codec.encode(v) for k, v in check_mapping(mapping).items()}
        self._engine.set_many(items, check_ttl(ttl))

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove ``keys`` in one round trip; return how many existed."""
        return self._engine.delete_many(check_keys(keys))

    def get_versioned(self, key: str, default: Any = None) -> tuple[Any, int | None]:
        """Return ``(value, version)``; ``(default, None)`` if ``key`` is missing.

        The version changes on every write of the key; hand it to
        :meth:`set_if_version` to write only if nobody wrote in between.
        """
        raw, version = self._engine.get_versioned(check_key(key))
        return self._codec.decode(raw, default), version

    def set_if_version(
        self, key: str, value: Any, version: int | None, ttl: float | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is still at ``version`` (None: only if
        missing); atomic on the server. Return whether it did."""
        return self._engine.set_if_version(
            check_key(key), self._codec.encode(value), check_version(version), check_ttl(ttl)
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Return the sorted keys that start with ``prefix``."""
        return self._engine.keys(check_key(prefix))

    def clear(self, prefix: str = "") -> int:
        """Remove every key that starts with ``prefix``; return how many."""
        return self._engine.clear(check_key(prefix))

    def secret(self, name: str, nbytes: int = 32) -> str:
        """Return a random hex secret made once per deployment (e.g. ``SECRET_KEY``).

        Every worker gets the same value, and it outlives restarts of the app
        server (see the package README for where it is kept); ``nbytes`` only
        matters the first time. Secrets are kept apart from keys: ``keys()``
        and ``clear()`` never see them.
        """
        return self._engine.secret(check_key(name), check_nbytes(nbytes))

    def rotate_secret(self, name: str, nbytes: int = 32) -> str:
        """Replace the secret ``name`` with a new random one and return it.

        Workers that read the old value keep it until they read it again
        (for ``SECRET_KEY``: reload the app server after rotating).
        """
        return self._engine.rotate_secret(check_key(name), check_nbytes(nbytes))

    @contextmanager
    def lock(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the cross-process lock ``name`` for the ``with`` block.

        ``timeout`` bounds the wait (None: wait forever), then
        :class:`LockTimeout`. A holder that dies releases the lock at once.
        """
        timeout = check_timeout(timeout)
        handle = self._engine.lock_acquire(check_key(name), timeout)
        if handle is None:
            raise LockTimeout(f"lock {name!r} not acquired within {timeout:g}s")
        try:
            yield
        finally:
            self._engine.lock_release(handle, name)

    @contextmanager
    def mutate(self, key: str, default: Any = None, timeout: float | None = None) -> Iterator[Any]:
        """Read-modify-write the whole value of ``key``, atomically.

        Yields the value (``default`` if missing) to change in place; it is
        written back when the block ends without an exception. Concurrent
        ``mutate`` calls on one key run one after the other, so none
        overwrites another. Nested values work: ``cfg["a"]["b"] = 1``.
        """
        handle, raw = self._engine.mutate_begin(check_key(key), check_timeout(timeout))
        try:
            value = self._codec.decode(raw, default)
            yield value
            data = self._codec.encode(value)
        except BaseException:
            self._engine.mutate_end(handle, key, None, False)
            raise
        self._engine.mutate_end(handle, key, data, True)

    def lease(self, name: str, ttl: float = 10.0) -> Lease:
        """A :class:`Lease` named ``name`` (one holder at a time, a fencing
        token per holder); nothing is sent until it is acquired."""
        return Lease(self, name, ttl)

    def run_once(
        self, name: str, func: Callable[[], Any], *, wait: float | None = 60.0, ttl: float = 30.0
    ) -> bool:
        """Call ``func()`` in one worker per start of the deployment; the others
        wait for it (see :func:`shared_core.run_once`). True where it ran."""
        return run_once(self, name, func, wait=wait, ttl=ttl)

    def publish(self, channel: str, message: Any) -> int:
        """Send ``message`` to every current subscriber of ``channel``.

        Returns how many subscribers it was queued for (on Redis: how many
        Redis clients). See :meth:`subscribe` for the delivery guarantee.
        """
        return self._engine.publish(check_key(channel), self._codec.encode(message))

    def subscribe(
        self,
        *channels: str,
        callback: Callable[[str, Any], None],
        on_connect: Callable[[], None] | None = None,
    ) -> Subscription:
        """Call ``callback(channel, message)`` on a background thread for every
        message published to ``channels`` from now on; returns once subscribed.

        Every subscriber subscribed at publish time gets a message once, in
        order. After a broken connection it resubscribes by itself and calls
        ``on_connect``; what was published meanwhile is missed, so keep the
        truth in the state and catch up in ``on_connect``.
        """
        if not channels:
            raise ValueError("subscribe to at least one channel")
        names = [check_key(c) for c in channels]
        timeout = self._config.connect_timeout + 5
        return Subscription(self._engine, self._codec, names, callback, on_connect, timeout)

    def info(self) -> dict[str, Any]:
        """Return what the server reports about itself (pid, clients, keys, ...)."""
        return self._engine.info()

    def close(self) -> None:
        """Close the idle connections of this state (a later call reconnects);
        those in use close when given back, on the next failure, or at exit."""
        self._engine.close()

    def __enter__(self) -> SharedState:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedState({self.url!r})"
