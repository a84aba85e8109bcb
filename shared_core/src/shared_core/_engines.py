"""What an engine provides, and which one a URL selects."""

from __future__ import annotations

from typing import Any, Protocol

from ._codec import Codec, Raw
from ._config import Config


class Engine(Protocol):
    """A sync engine. ``call`` runs one operation: get, set, delete, incr,
    setdefault, keys, clear, secret or info; values arrive encoded by ``codec``.
    Lock and mutate handles are opaque, owned by the engine."""

    @property
    def codec(self) -> Codec: ...

    def call(self, method: str, *args: Any) -> Any: ...
    def lock_acquire(self, name: str, timeout: float | None) -> Any | None: ...
    def lock_release(self, handle: Any, name: str) -> None: ...
    def mutate_begin(self, key: str, timeout: float | None) -> tuple[Any, Raw | None]: ...
    def mutate_end(self, handle: Any, key: str, raw: Raw | None, commit: bool) -> None: ...
    def close(self) -> None: ...


class AsyncEngine(Protocol):
    """The async twin of :class:`Engine`."""

    @property
    def codec(self) -> Codec: ...

    async def call(self, method: str, *args: Any) -> Any: ...
    async def lock_acquire(self, name: str, timeout: float | None) -> Any | None: ...
    async def lock_release(self, handle: Any, name: str) -> None: ...
    async def mutate_begin(self, key: str, timeout: float | None) -> tuple[Any, Raw | None]: ...
    async def mutate_end(self, handle: Any, key: str, raw: Raw | None, commit: bool) -> None: ...
    async def aclose(self) -> None: ...


def sync_engine(config: Config) -> Engine:
    if config.is_redis:
        from ._redis import RedisEngine

        return RedisEngine(config)
    from ._manager import ManagerEngine

    return ManagerEngine(config)


def async_engine(config: Config) -> AsyncEngine:
    if config.is_redis:
        from ._redis import AsyncRedisEngine

        return AsyncRedisEngine(config)
    from ._manager import AsyncManagerEngine

    return AsyncManagerEngine(config)
