"""``SharedState``: the sync API, the same on every engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from ._broadcast import Subscription
from ._config import Config, resolve
from ._engines import sync_engine
from ._errors import LockTimeout

MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 1024


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"keys are str, not {type(key).__name__}")
    return key


def check_amount(amount: object) -> int:
    if type(amount) is not int:
        raise TypeError(f"incr amounts are int, not {type(amount).__name__}")
    return amount


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout is a number of seconds or None, not {timeout!r}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0, not {timeout!r}")
    return float(timeout)


def check_nbytes(nbytes: object) -> int:
    if type(nbytes) is not int or not MIN_SECRET_BYTES <= nbytes <= MAX_SECRET_BYTES:
        raise ValueError(f"nbytes must be an int from {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}")
    return nbytes


class SharedState:
    """One state shared by every worker process of a deployment (sync API).

    Parameters:
        url: where the state lives (see the package README); default
            ``$SHARED_STATE_URL``, else ``local://APP``, a server started on
            demand on a private Unix socket.
        app: the app name that picks the default ``local://`` address.

    Nothing connects until the first call. Instances may be shared between
    threads (each thread gets its own connection) and survive ``fork`` (the
    child opens its own). Calls raise :class:`StateUnavailable` when the
    server cannot be reached within ``connect_timeout``.
    """

    def __init__(self, url: str | None = None, *, app: str | None = None) -> None:
        self._config: Config = resolve(url, app)
        self._engine = sync_engine(self._config)
        self._codec = self._engine.codec

    @property
    def url(self) -> str:
        """The URL this state resolved to."""
        return self._config.url

    def get(self, key: str, default: Any = None) -> Any:
        """Return a copy of the value of ``key``, or ``default``."""
        return self._codec.decode(self._engine.call("get", check_key(key)), default)

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; TypeError if it cannot be pickled."""
        self._engine.call("set", check_key(key), self._codec.encode(value))

    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it existed."""
        return bool(self._engine.call("delete", check_key(key)))

    def incr(self, key: str, amount: int = 1) -> int:
        """Add ``amount`` to the int at ``key`` (0 if missing) on the server; return it."""
        return int(self._engine.call("incr", check_key(key), check_amount(amount)))

    def setdefault(self, key: str, value: Any) -> Any:
        """Store ``value`` unless ``key`` exists; return the stored value."""
        return self._codec.decode(
            self._engine.call("setdefault", check_key(key), self._codec.encode(value))
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Return the sorted keys that start with ``prefix``."""
        return list(self._engine.call("keys", check_key(prefix)))

    def clear(self, prefix: str = "") -> int:
        """Remove every key that starts with ``prefix``; return how many."""
        return int(self._engine.call("clear", check_key(prefix)))

    def secret(self, name: str, nbytes: int = 32) -> str:
        """Return a random hex secret made once per deployment (e.g. ``SECRET_KEY``).

        Every worker gets the same value; ``nbytes`` only matters the first time.
        Secrets are kept apart from keys: ``keys()`` and ``clear()`` never see them.
        """
        return str(self._engine.call("secret", check_key(name), check_nbytes(nbytes)))

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

    def publish(self, channel: str, message: Any) -> int:
        """Send ``message`` to every current subscriber of ``channel``.

        Returns how many subscribers it was queued for (on Redis: how many
        Redis clients). See :meth:`subscribe` for the delivery guarantee.
        """
        return int(self._engine.call("publish", check_key(channel), self._codec.encode(message)))

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
        return dict(self._engine.call("info"))

    def close(self) -> None:
        """Close this process's connections (a later call reconnects)."""
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
