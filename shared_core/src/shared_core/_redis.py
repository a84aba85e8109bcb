"""The Redis engine: the same operations, each atomic in Redis.

Keys of an app live under ``shared_core:APP:`` (``v:`` values, ``s:``
secrets, ``l:`` locks, ``m:`` locks of ``mutate``), so several apps can share
one Redis. ``incr`` is INCRBY; ``setdefault`` and ``secret`` are one Lua
script (get, else set); a lock is a lease (``SET NX PX`` with a random token)
released by a compare-and-delete script; ``mutate`` takes such a lock on the
key, because the user's block runs in between the read and the write (an
optimistic WATCH/MULTI retry would have to run the block twice) and commits
with a script that writes only while the lease is still held.

Connection pools are redis-py's: a pool notices a fork and starts afresh in
the child. No command is retried after it may have reached Redis, so an
``incr`` is never applied twice; only a failure to connect is retried.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

from ._codec import Raw, RedisCodec
from ._config import Config
from ._errors import ConfigError, LockTimeout, StateError, StateUnavailable

try:
    import redis
    import redis.asyncio as aredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError("a redis:// URL needs redis-py: pip install 'shared-core[redis]'") from exc

# get-or-set in one step: returns what is stored afterwards.
_SETDEFAULT = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""
# Release only our own lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Write the value of a mutate only while its lease is ours, then release it.
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[2]) end
redis.call('DEL', KEYS[1])
return 1
"""
_GLOB = re.compile(r"([*?\[\]\\])")
_NOT_SENT = (ConnectionRefusedError, FileNotFoundError)


def _never_sent(exc: BaseException) -> bool:
    """True when a connection error happened before anything was written."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _NOT_SENT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _pool_kwargs(config: Config) -> dict[str, Any]:
    return {
        "socket_connect_timeout": max(0.1, min(config.connect_timeout, 5.0)),
        "socket_timeout": config.op_timeout,
        "retry": Retry(NoBackoff(), 0),
        # Concurrent calls beyond this wait for a free connection (up to
        # connect_timeout) instead of failing; a URL may set max_connections.
        "max_connections": 50,
        "timeout": config.connect_timeout,
    }


class _Keys:
    """The names of one app's keys."""

    def __init__(self, app: str) -> None:
        self.ns = f"shared_core:{app}:"
        self.values = self.ns + "v:"

    def value(self, key: str) -> str:
        return self.values + key

    def secret(self, name: str) -> str:
        return self.ns + "s:" + name

    def lock(self, name: str) -> str:
        return self.ns + "l:" + name

    def mutate(self, key: str) -> str:
        return self.ns + "m:" + key

    def channel(self, name: str) -> str:
        return self.ns + "c:" + name

    def pattern(self, prefix: str) -> str:
        return _GLOB.sub(r"\\\1", self.values + prefix) + "*"


def _raw(reply: Any) -> Raw | None:
    """What GET returns, as the codec reads it."""
    return reply if reply is None or isinstance(reply, bytes) else bytes(reply)


def _stored(raw: Raw) -> bytes | str:
    return str(raw) if isinstance(raw, int) else raw


def _incr_error(key: str, exc: redis.ResponseError) -> Exception:
    if "not an integer" in str(exc):
        return TypeError(f"incr: the value of {key!r} is not an int (64-bit in Redis)")
    return StateError(f"incr of {key!r} failed in Redis: {exc}")


def _messages(keys: _Keys, replies: list[Any]) -> list[tuple[str, Raw]]:
    """The published messages among pub/sub replies, as (channel, raw)."""
    cut = len(keys.ns) + 2
    return [
        (bytes(r["channel"]).decode()[cut:], bytes(r["data"]))
        for r in replies
        if r is not None and r.get("type") == "message"
    ]


def _lock_expired(name: str, lease: float) -> StateError:
    return StateError(
        f"lock {name!r} had expired (lease {lease:g}s) before its release: "
        "another holder may have run meanwhile"
    )


def _mutate_expired(key: str, lease: float) -> StateError:
    return StateError(f"mutate({key!r}) outlived its lease ({lease:g}s); nothing was written")


def _info(reply: dict[str, Any], dbsize: int) -> dict[str, Any]:
    return {
        "engine": "redis",
        "pid": reply.get("process_id"),
        "clients": reply.get("connected_clients"),
        "keys": dbsize,
        "uptime": reply.get("uptime_in_seconds"),
        "redis": reply.get("redis_version"),
    }


class RedisEngine:
    """Sync client on a redis-py connection pool."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.codec = RedisCodec(config.serializer == "pickle")
        self.keys_ = _Keys(config.app)
        pool = redis.BlockingConnectionPool.from_url(str(config.address), **_pool_kwargs(config))
        self.client = redis.Redis(connection_pool=pool)
        self._setdefault = self.client.register_script(_SETDEFAULT)
        self._release = self.client.register_script(_RELEASE)
        self._commit = self.client.register_script(_COMMIT)

    def call(self, method: str, *args: Any) -> Any:
        op = getattr(self, f"op_{method}")
        deadline = time.monotonic() + self.config.connect_timeout
        delay = 0.01
        while True:
            try:
                return op(*args)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not _never_sent(exc) or time.monotonic() + delay > deadline:
                    raise StateUnavailable(f"Redis at {self.config.url}: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def op_get(self, key: str) -> Raw | None:
        return _raw(self.client.get(self.keys_.value(key)))

    def op_set(self, key: str, raw: Raw) -> None:
        self.client.set(self.keys_.value(key), _stored(raw))

    def op_delete(self, key: str) -> bool:
        return bool(self.client.delete(self.keys_.value(key)))

    def op_incr(self, key: str, amount: int) -> int:
        try:
            return int(self.client.incrby(self.keys_.value(key), amount))
        except redis.ResponseError as exc:
            raise _incr_error(key, exc) from None

    def op_setdefault(self, key: str, raw: Raw) -> Raw | None:
        return _raw(self._setdefault(keys=[self.keys_.value(key)], args=[_stored(raw)]))

    def op_keys(self, prefix: str) -> list[str]:
        cut = len(self.keys_.values)
        found = self.client.scan_iter(match=self.keys_.pattern(prefix), count=1000)
        return sorted(k.decode()[cut:] for k in found)

    def op_clear(self, prefix: str) -> int:
        doomed = list(self.client.scan_iter(match=self.keys_.pattern(prefix), count=1000))
        removed = 0
        for i in range(0, len(doomed), 500):
            removed += int(self.client.unlink(*doomed[i : i + 500]))
        return removed

    def op_secret(self, name: str, nbytes: int) -> str:
        made = secrets.token_hex(nbytes)
        return bytes(self._setdefault(keys=[self.keys_.secret(name)], args=[made])).decode()

    def op_info(self) -> dict[str, Any]:
        return _info(self.client.info("server") | self.client.info("clients"), self.client.dbsize())

    def _acquire(self, lock_key: str, timeout: float | None) -> str | None:
        token = secrets.token_hex(16)
        lease_ms = int(self.config.lock_lease * 1000)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while not self.call("_set_nx", lock_key, token, lease_ms):
            if deadline is not None and time.monotonic() + delay > deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        return token

    def op__set_nx(self, lock_key: str, token: str, lease_ms: int) -> bool:
        return bool(self.client.set(lock_key, token, nx=True, px=lease_ms))

    def op__release(self, lock_key: str, token: str) -> bool:
        return bool(self._release(keys=[lock_key], args=[token]))

    def op__commit(self, lock_key: str, token: str, key: str, raw: Raw | None) -> bool:
        args = [token, b"" if raw is None else _stored(raw), "0" if raw is None else "1"]
        return bool(self._commit(keys=[lock_key, self.keys_.value(key)], args=args))

    def lock_acquire(self, name: str, timeout: float | None) -> str | None:
        return self._acquire(self.keys_.lock(name), timeout)

    def lock_release(self, handle: str, name: str) -> None:
        if not self.call("_release", self.keys_.lock(name), handle):
            raise _lock_expired(name, self.config.lock_lease)

    def mutate_begin(self, key: str, timeout: float | None) -> tuple[str, Raw | None]:
        token = self._acquire(self.keys_.mutate(key), timeout)
        if token is None:
            raise LockTimeout(f"mutate({key!r}): another mutation held it for {timeout}s")
        try:
            return token, self.call("get", key)
        except BaseException:
            self.call("_release", self.keys_.mutate(key), token)
            raise

    def mutate_end(self, handle: str, key: str, raw: Raw | None, commit: bool) -> None:
        raw = raw if commit else None
        if not self.call("_commit", self.keys_.mutate(key), handle, key, raw) and commit:
            raise _mutate_expired(key, self.config.lock_lease)

    def op_publish(self, channel: str, raw: Raw) -> int:
        return int(self.client.publish(self.keys_.channel(channel), _stored(raw)))

    def subscribe(self, channels: list[str]) -> _Subscriber:
        pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(*[self.keys_.channel(c) for c in channels])
            # Wait for Redis to confirm, so that nothing published after this
            # returns is missed; keep what arrives meanwhile.
            early: list[Any] = []
            deadline = time.monotonic() + self.config.connect_timeout
            confirmed = 0
            while confirmed < len(channels):
                if time.monotonic() > deadline:
                    raise redis.TimeoutError("no confirmation of SUBSCRIBE")
                reply = pubsub.get_message(timeout=0.1)
                if reply is not None and reply["type"] == "subscribe":
                    confirmed += 1
                elif reply is not None:
                    early.append(reply)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            pubsub.close()
            raise StateUnavailable(f"Redis at {self.config.url}: {exc}") from exc
        return _Subscriber(pubsub, _messages(self.keys_, early))

    def receive(self, handle: _Subscriber, timeout: float) -> list[tuple[str, Raw]]:
        if handle.early:
            early, handle.early = handle.early, []
            return early
        try:
            replies = [handle.pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)]
            while replies[-1] is not None:  # and whatever else is already here
                replies.append(handle.pubsub.get_message(ignore_subscribe_messages=True))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StateUnavailable(f"Redis at {self.config.url}: {exc}") from exc
        return _messages(self.keys_, replies)

    def unsubscribe(self, handle: _Subscriber) -> None:
        handle.pubsub.close()

    def close(self) -> None:
        self.client.connection_pool.disconnect()


class _Subscriber:
    def __init__(self, pubsub: Any, early: list[tuple[str, Raw]]) -> None:
        self.pubsub = pubsub
        self.early = early


class AsyncRedisEngine:
    """Async client on a redis.asyncio connection pool."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.codec = RedisCodec(config.serializer == "pickle")
        self.keys_ = _Keys(config.app)
        pool = aredis.BlockingConnectionPool.from_url(str(config.address), **_pool_kwargs(config))
        self.client = aredis.Redis(connection_pool=pool)
        self._setdefault = self.client.register_script(_SETDEFAULT)
        self._release = self.client.register_script(_RELEASE)
        self._commit = self.client.register_script(_COMMIT)

    async def call(self, method: str, *args: Any) -> Any:
        op = getattr(self, f"op_{method}")
        deadline = time.monotonic() + self.config.connect_timeout
        delay = 0.01
        while True:
            try:
                return await op(*args)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not _never_sent(exc) or time.monotonic() + delay > deadline:
                    raise StateUnavailable(f"Redis at {self.config.url}: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def op_get(self, key: str) -> Raw | None:
        return _raw(await self.client.get(self.keys_.value(key)))

    async def op_set(self, key: str, raw: Raw) -> None:
        await self.client.set(self.keys_.value(key), _stored(raw))

    async def op_delete(self, key: str) -> bool:
        return bool(await self.client.delete(self.keys_.value(key)))

    async def op_incr(self, key: str, amount: int) -> int:
        try:
            return int(await self.client.incrby(self.keys_.value(key), amount))
        except redis.ResponseError as exc:
            raise _incr_error(key, exc) from None

    async def op_setdefault(self, key: str, raw: Raw) -> Raw | None:
        return _raw(await self._setdefault(keys=[self.keys_.value(key)], args=[_stored(raw)]))

    async def op_keys(self, prefix: str) -> list[str]:
        cut = len(self.keys_.values)
        found = self.client.scan_iter(match=self.keys_.pattern(prefix), count=1000)
        return sorted([k.decode()[cut:] async for k in found])

    async def op_clear(self, prefix: str) -> int:
        pattern = self.keys_.pattern(prefix)
        doomed = [k async for k in self.client.scan_iter(match=pattern, count=1000)]
        removed = 0
        for i in range(0, len(doomed), 500):
            removed += int(await self.client.unlink(*doomed[i : i + 500]))
        return removed

    async def op_secret(self, name: str, nbytes: int) -> str:
        made = secrets.token_hex(nbytes)
        stored = await self._setdefault(keys=[self.keys_.secret(name)], args=[made])
        return bytes(stored).decode()

    async def op_info(self) -> dict[str, Any]:
        server = await self.client.info("server")
        clients = await self.client.info("clients")
        return _info(server | clients, await self.client.dbsize())

    async def op__set_nx(self, lock_key: str, token: str, lease_ms: int) -> bool:
        return bool(await self.client.set(lock_key, token, nx=True, px=lease_ms))

    async def op__release(self, lock_key: str, token: str) -> bool:
        return bool(await self._release(keys=[lock_key], args=[token]))

    async def op__commit(self, lock_key: str, token: str, key: str, raw: Raw | None) -> bool:
        args = [token, b"" if raw is None else _stored(raw), "0" if raw is None else "1"]
        return bool(await self._commit(keys=[lock_key, self.keys_.value(key)], args=args))

    async def _acquire(self, lock_key: str, timeout: float | None) -> str | None:
        token = secrets.token_hex(16)
        lease_ms = int(self.config.lock_lease * 1000)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while not await self.call("_set_nx", lock_key, token, lease_ms):
            if deadline is not None and time.monotonic() + delay > deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return token

    async def lock_acquire(self, name: str, timeout: float | None) -> str | None:
        return await self._acquire(self.keys_.lock(name), timeout)

    async def lock_release(self, handle: str, name: str) -> None:
        if not await self.call("_release", self.keys_.lock(name), handle):
            raise _lock_expired(name, self.config.lock_lease)

    async def mutate_begin(self, key: str, timeout: float | None) -> tuple[str, Raw | None]:
        token = await self._acquire(self.keys_.mutate(key), timeout)
        if token is None:
            raise LockTimeout(f"mutate({key!r}): another mutation held it for {timeout}s")
        try:
            return token, await self.call("get", key)
        except BaseException:
            await self.call("_release", self.keys_.mutate(key), token)
            raise

    async def mutate_end(self, handle: str, key: str, raw: Raw | None, commit: bool) -> None:
        raw = raw if commit else None
        if not await self.call("_commit", self.keys_.mutate(key), handle, key, raw) and commit:
            raise _mutate_expired(key, self.config.lock_lease)

    async def op_publish(self, channel: str, raw: Raw) -> int:
        return int(await self.client.publish(self.keys_.channel(channel), _stored(raw)))

    async def subscribe(self, channels: list[str]) -> _Subscriber:
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(*[self.keys_.channel(c) for c in channels])
            early: list[Any] = []
            deadline = time.monotonic() + self.config.connect_timeout
            confirmed = 0
            while confirmed < len(channels):
                if time.monotonic() > deadline:
                    raise redis.TimeoutError("no confirmation of SUBSCRIBE")
                reply = await pubsub.get_message(timeout=0.1)
                if reply is not None and reply["type"] == "subscribe":
                    confirmed += 1
                elif reply is not None:
                    early.append(reply)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise StateUnavailable(f"Redis at {self.config.url}: {exc}") from exc
        return _Subscriber(pubsub, _messages(self.keys_, early))

    async def receive(self, handle: _Subscriber, timeout: float) -> list[tuple[str, Raw]]:
        if handle.early:
            early, handle.early = handle.early, []
            return early
        pubsub = handle.pubsub
        try:
            replies = [await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)]
            while replies[-1] is not None:
                replies.append(await pubsub.get_message(ignore_subscribe_messages=True))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StateUnavailable(f"Redis at {self.config.url}: {exc}") from exc
        return _messages(self.keys_, replies)

    async def unsubscribe(self, handle: _Subscriber) -> None:
        await handle.pubsub.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
