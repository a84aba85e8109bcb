"""The Redis engine: the same operations, each atomic in Redis.

Layout. Keys of an app live under ``shared_core:APP:`` so that several apps
can share one Redis:

- ``v:KEY`` a value: a hash with field ``d``, the data (an int as its
  decimal string, so that HINCRBY adds to it; any other raw value as the
  bytes the codec made, which always begin with a letter), and field ``n``,
  its version. The ttl is the key's own Redis expiry (PEXPIRE / PERSIST), so
  Redis expires and evicts values as it does any key, and SCAN on ``v:``
  lists them.
- ``version``: the app's version counter. Every write script takes the next
  number from it, so a version never repeats, a delete and a new write
  included. A missing counter (the first write, or Redis lost it) starts
  from the clock in microseconds, above every version handed out before, so
  a version read before such a loss never matches a later write.
- ``s:NAME`` secrets (strings), ``l:NAME`` locks and ``m:KEY`` locks of
  ``mutate``: leases (``SET NX PX`` with a random token), released by a
  compare-and-delete script; ``c:NAME`` pub/sub channels.

Round trips. Each call is one command, so one round trip: a read is HGET,
HMGET or PTTL; ``delete``/``delete_many`` DEL; ``get_many`` and every write
that must check or version something is a Lua script sent by EVALSHA (a
script Redis does not know yet, after a restart say, is loaded and sent
again, which is safe: NOSCRIPT means it did not run). ``mutate`` takes its
lease and reads the value in one script, and commits with one that writes
only while the lease is still held, keeping the key's ttl (the user's block
runs in between, so an optimistic WATCH/MULTI retry would run it twice).
``info`` is one script too. Only ``keys``/``clear`` (SCAN, then UNLINK in
batches) take more, and a lock's wait: ``SET NX PX`` tries with a backoff.

Connection pools are redis-py's: a pool notices a fork and starts afresh in
the child. No command is resent after it may have reached Redis, so an
``incr`` is never applied twice; only a failure to connect is retried.
Needs Redis 5 or later (a script that writes after reading the clock).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Generic, NamedTuple, TypeVar

from .._backoff import Backoff
from .._codec import Raw, RedisCodec
from .._config import DEFAULT_REDIS_MAX_CONNECTIONS, Config
from .._errors import CapacityError, ConfigError, LockTimeout, StateError, StateUnavailable
from .._near import NearCache

try:
    import redis
    import redis.asyncio as aredis
    from redis.backoff import NoBackoff
    from redis.exceptions import NoScriptError, OutOfMemoryError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError("a redis:// URL needs redis-py: pip install 'shared-core[redis]'") from exc

from . import redis_tracking as tracking
from .redis_tracking import Tracker

T = TypeVar("T")


class _Script(NamedTuple):
    source: str
    sha: str


def _script(source: str) -> _Script:
    return _Script(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


# Lua. The write scripts share this prelude; their KEYS[1] is the counter.
_PUT = """
local function version()
  local n = redis.call('INCR', KEYS[1])
  if n == 1 then
    local t = redis.call('TIME')
    n = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('SET', KEYS[1], string.format('%.0f', n))
  end
  return string.format('%.0f', n)
end
-- Write data (false: keep it) under a new version; ttl: '' none, 'keep', or ms.
local function put(key, data, ttl)
  if data then
    redis.call('HSET', key, 'd', data, 'n', version())
  else
    redis.call('HSET', key, 'n', version())
  end
  if ttl == '' then
    redis.call('PERSIST', key)
  elseif ttl ~= 'keep' then
    redis.call('PEXPIRE', key, ttl)
  end
end
"""
# KEYS: counter, key...; ARGV: ttl, data... (set is set_many of one key).
_SET_MANY = _script(_PUT + "for i = 2, #KEYS do put(KEYS[i], ARGV[i], ARGV[1]) end")
# KEYS: counter, key; ARGV: ttl, data, version ('': only if absent; add).
_SET_IF_VERSION = _script(
    _PUT
    + """
local expected = ARGV[3] ~= '' and ARGV[3]
if redis.call('HGET', KEYS[2], 'n') ~= expected then return 0 end
put(KEYS[2], ARGV[2], ARGV[1])
return 1
"""
)
# KEYS: counter, key; ARGV: amount, ttl (only for a key this creates).
# HINCRBY fails on a non-int before anything is written.
_INCR = _script(
    _PUT
    + """
local fresh = redis.call('EXISTS', KEYS[2]) == 0
redis.call('HINCRBY', KEYS[2], 'd', ARGV[1])
put(KEYS[2], false, fresh and ARGV[2] or 'keep')
return redis.call('HGET', KEYS[2], 'd')
"""
)
# KEYS: counter, key; ARGV: data. Returns what is stored afterwards.
_SETDEFAULT = _script(
    _PUT
    + """
local d = redis.call('HGET', KEYS[2], 'd')
if d then return d end
put(KEYS[2], ARGV[1], 'keep')
return ARGV[1]
"""
)
# KEYS: counter, key; ARGV: ttl. An expiry change is a write: a new version.
_EXPIRE = _script(
    _PUT
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
put(KEYS[2], false, ARGV[1])
return 1
"""
)
# KEYS: counter, key, lease; ARGV: token, data. Write only while the lease
# is ours, keeping the key's ttl; then release it.
_COMMIT = _script(
    _PUT
    + """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[3])
put(KEYS[2], ARGV[2], 'keep')
return 1
"""
)
# KEYS: key. The value and its PTTL, for a near cache.
_GET_NEAR = _script("return {redis.call('HGET', KEYS[1], 'd'), redis.call('PTTL', KEYS[1])}")
# KEYS: keys. false (not nil) for a missing one keeps the array whole.
_GET_MANY = _script("""
local found = {}
for i, key in ipairs(KEYS) do found[i] = redis.call('HGET', key, 'd') end
return found
""")
# KEYS: lease, key; ARGV: token, lease ms. The value, once the lease is ours.
_MUTATE_BEGIN = _script("""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return {redis.call('HGET', KEYS[2], 'd')}
""")
# KEYS: lease; ARGV: token. Release only our own lease.
_RELEASE = _script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")
# KEYS: secret; ARGV: a new one. Get, else set; returns what is stored.
_SECRET = _script("""
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
""")
_INFO = _script(
    "return {redis.call('INFO', 'server'), redis.call('INFO', 'clients'), redis.call('DBSIZE')}"
)

_GLOB = re.compile(r"([*?\[\]\\])")
_NOT_SENT = (ConnectionRefusedError, FileNotFoundError)
_INT_FIRST = frozenset(b"-0123456789")  # what a stored int begins with; codec bytes never do
_MAX_TTL = 2.0**62 / 1000  # seconds: the most PEXPIRE takes (past now), about 146 million years
_CLEAR_BATCH = 500
_WRONGTYPE_HINT = (
    " (a key under shared_core:APP:v: that is not a hash: written by shared_core "
    "before values became hashes, or by another program; delete it)"
)


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
        "max_connections": config.max_connections or DEFAULT_REDIS_MAX_CONNECTIONS,
        "timeout": config.connect_timeout,
    }


def _raw(reply: Any) -> Raw | None:
    """A stored ``d`` as the codec reads it: an int as itself, else bytes."""
    if not reply:  # None; or False, a script's missing value under RESP3
        return None
    data = bytes(reply)
    return int(data) if data[0] in _INT_FIRST else data


def _stored(raw: Raw) -> bytes | str:
    return str(raw) if isinstance(raw, int) else raw


def _ms(ttl: float | None) -> str:
    """A ttl for the scripts: '' for none, else whole milliseconds (at least 1)."""
    return "" if ttl is None else str(max(1, round(min(ttl, _MAX_TTL) * 1000)))


def _seconds_left(pttl: int) -> float | None:
    """PTTL's answer as ``ttl()`` gives it: -2 missing, -1 no expiry."""
    return None if pttl == -2 else math.inf if pttl == -1 else pttl / 1000


def _versioned(reply: list[Any]) -> tuple[Raw | None, int | None]:
    data, version = reply
    raw = _raw(data)
    return (None, None) if raw is None else (raw, int(version))


def _info(reply: list[Any]) -> dict[str, Any]:
    fields: dict[str, str] = {}
    for text in reply[:2]:
        for line in bytes(text).decode().splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields[name] = value.strip()

    def number(name: str) -> int | None:
        value = fields.get(name)
        return int(value) if value is not None and value.isdigit() else None

    return {
        "engine": "redis",
        "pid": number("process_id"),
        "clients": number("connected_clients"),
        "keys": int(reply[2]),
        "uptime": number("uptime_in_seconds"),
        "redis": fields.get("redis_version"),
    }


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class _Op(Generic[T]):
    """One command to send (a script: EVALSHA) and how to read its reply.

    No args: nothing to send (an empty batch); ``parse(None)`` is the answer.
    """

    __slots__ = ("args", "name", "parse", "script", "subject")

    def __init__(
        self,
        name: str,
        subject: str,
        parse: Callable[[Any], T],
        args: tuple[Any, ...],
        script: str | None = None,
    ) -> None:
        self.name = name
        self.subject = subject
        self.parse = parse
        self.args = args
        self.script = script

    def refused(self, exc: redis.ResponseError) -> Exception:
        """What to raise when Redis answered with an error: it changed nothing."""
        if isinstance(exc, OutOfMemoryError):
            return CapacityError(
                f"{self.name} of {self.subject!r}: Redis is out of memory (maxmemory, "
                f"and its policy evicts nothing); nothing was written: {exc}"
            )
        text = str(exc)
        if self.name == "incr" and "hash value is not an integer" in text:
            return TypeError(f"incr: the value of {self.subject!r} is not an int (64-bit in Redis)")
        hint = _WRONGTYPE_HINT if "WRONGTYPE" in text else ""
        if self.name == "incr":  # an overflow, or an amount past 64 bits
            hint += " (ints are 64-bit in Redis)"
        return StateError(f"{self.name} of {self.subject!r} failed in Redis: {text}{hint}")


class _Commands:
    """What every operation sends and how its reply reads, for both engines."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ns = f"shared_core:{config.app}:"
        self.values = self.ns + "v:"
        self.counter = self.ns + "version"
        self.lease_ms = max(1, round(config.lock_lease * 1000))

    # names -------------------------------------------------------------------

    def value(self, key: str) -> str:
        return self.values + key

    def pattern(self, prefix: str) -> str:
        return _GLOB.sub(r"\\\1", self.values + prefix) + "*"

    def channel(self, name: str) -> str:
        return self.ns + "c:" + name

    def listed(self, names: Iterable[bytes]) -> list[str]:
        """The keys of SCAN's names, sorted."""
        cut = len(self.values)
        return sorted(name.decode()[cut:] for name in names)

    # errors ------------------------------------------------------------------

    def unavailable(self, exc: BaseException) -> StateUnavailable:
        return StateUnavailable(f"Redis at {self.config.url}: {exc}")

    def failure(self, exc: redis.RedisError, op: _Op[Any] | None) -> Exception | None:
        """What to raise for ``exc``; None when nothing reached Redis (may resend)."""
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return None if _never_sent(exc) else self.unavailable(exc)
        if isinstance(exc, redis.ResponseError) and op is not None:
            return op.refused(exc)
        return StateError(f"Redis at {self.config.url}: {exc}")

    # operations ----------------------------------------------------------------

    @staticmethod
    def _eval(
        name: str,
        subject: str,
        script: _Script,
        keys: list[str],
        args: list[Any],
        parse: Callable[[Any], T],
    ) -> _Op[T]:
        args_ = ("EVALSHA", script.sha, len(keys), *keys, *args)
        return _Op(name, subject, parse, args_, script.source)

    def get(self, key: str) -> _Op[Raw | None]:
        return _Op("get", key, _raw, ("HGET", self.value(key), "d"))

    def get_near(self, key: str) -> _Op[tuple[Raw | None, float | None]]:
        """The value and its ttl (seconds, None: none), read in one script."""

        def parse(reply: list[Any]) -> tuple[Raw | None, float | None]:
            data, pttl = reply
            return _raw(data), (pttl / 1000 if pttl >= 0 else None)

        return self._eval("get", key, _GET_NEAR, [self.value(key)], [], parse)

    def get_versioned(self, key: str) -> _Op[tuple[Raw | None, int | None]]:
        return _Op("get_versioned", key, _versioned, ("HMGET", self.value(key), "d", "n"))

    def get_many(self, keys: list[str]) -> _Op[dict[str, Raw]]:
        def found(reply: list[Any] | None) -> dict[str, Raw]:
            pairs = zip(keys, map(_raw, reply or ()), strict=True)
            return {key: raw for key, raw in pairs if raw is not None}

        if not keys:
            return _Op("get_many", "", found, ())
        names = [self.value(k) for k in keys]
        return self._eval("get_many", keys[0], _GET_MANY, names, [], found)

    def set_many(self, items: dict[str, Raw], ttl: float | None) -> _Op[None]:
        if not items:
            return _Op("set_many", "", _nothing, ())
        keys = [self.counter, *(self.value(k) for k in items)]
        data = [_ms(ttl), *(_stored(raw) for raw in items.values())]
        name = "set" if len(items) == 1 else "set_many"
        return self._eval(name, next(iter(items)), _SET_MANY, keys, data, _nothing)

    def set_if_version(
        self, key: str, raw: Raw, version: int | None, ttl: float | None
    ) -> _Op[bool]:
        args = [_ms(ttl), _stored(raw), "" if version is None else str(version)]
        keys = [self.counter, self.value(key)]
        return self._eval("set_if_version", key, _SET_IF_VERSION, keys, args, bool)

    def delete(self, key: str) -> _Op[bool]:
        return _Op("delete", key, bool, ("DEL", self.value(key)))

    def delete_many(self, keys: list[str]) -> _Op[int]:
        if not keys:
            return _Op("delete_many", "", _zero, ())
        return _Op("delete_many", keys[0], int, ("DEL", *(self.value(k) for k in keys)))

    def incr(self, key: str, amount: int, ttl: float | None) -> _Op[int]:
        keys = [self.counter, self.value(key)]
        return self._eval("incr", key, _INCR, keys, [amount, _ms(ttl)], int)

    def setdefault(self, key: str, raw: Raw) -> _Op[Raw]:
        keys = [self.counter, self.value(key)]
        return self._eval("setdefault", key, _SETDEFAULT, keys, [_stored(raw)], _raw_stored)

    def expire(self, key: str, ttl: float | None) -> _Op[bool]:
        keys = [self.counter, self.value(key)]
        return self._eval("expire", key, _EXPIRE, keys, [_ms(ttl)], bool)

    def ttl(self, key: str) -> _Op[float | None]:
        return _Op("ttl", key, _seconds_left, ("PTTL", self.value(key)))

    def unlinks(self, names: list[bytes]) -> Iterator[_Op[int]]:
        """UNLINK ``names`` in batches (how many existed, per batch)."""
        for i in range(0, len(names), _CLEAR_BATCH):
            yield _Op("clear", "", int, ("UNLINK", *names[i : i + _CLEAR_BATCH]))

    def secret(self, name: str, nbytes: int) -> _Op[str]:
        made = secrets.token_hex(nbytes)
        return self._eval("secret", name, _SECRET, [self.ns + "s:" + name], [made], _text)

    def rotate_secret(self, name: str, nbytes: int) -> _Op[str]:
        made = secrets.token_hex(nbytes)
        return _Op("rotate_secret", name, lambda _: made, ("SET", self.ns + "s:" + name, made))

    def publish(self, channel: str, raw: Raw) -> _Op[int]:
        return _Op("publish", channel, int, ("PUBLISH", self.channel(channel), _stored(raw)))

    def info(self) -> _Op[dict[str, Any]]:
        return self._eval("info", "", _INFO, [], [], _info)

    # locks and mutate: leases ------------------------------------------------------

    def lock_acquire(self, name: str) -> _Op[str | None]:
        token = secrets.token_hex(16)
        args = ("SET", self.ns + "l:" + name, token, "NX", "PX", self.lease_ms)
        return _Op("lock", name, lambda ok: token if ok else None, args)

    def lock_release(self, token: str, name: str) -> _Op[None]:
        def released(reply: int) -> None:
            if not reply:
                raise StateError(
                    f"lock {name!r} had expired (lease {self.config.lock_lease:g}s) before "
                    "its release: another holder may have run meanwhile"
                )

        lease = self.ns + "l:" + name
        return self._eval("lock release", name, _RELEASE, [lease], [token], released)

    def mutate_begin(self, key: str) -> _Op[tuple[str, Raw | None] | None]:
        token = secrets.token_hex(16)

        def begun(reply: list[Any] | None) -> tuple[str, Raw | None] | None:
            return None if not reply else (token, _raw(reply[0]))

        keys = [self.ns + "m:" + key, self.value(key)]
        return self._eval("mutate", key, _MUTATE_BEGIN, keys, [token, self.lease_ms], begun)

    @staticmethod
    def mutate_begun(
        got: tuple[str, Raw | None] | None, key: str, timeout: float | None
    ) -> tuple[str, Raw | None]:
        if got is None:
            raise LockTimeout(f"mutate({key!r}): another mutation held it for {timeout}s")
        return got

    def mutate_end(self, token: str, key: str, raw: Raw | None, commit: bool) -> _Op[None]:
        def ended(reply: int) -> None:
            if not reply and commit:
                raise StateError(
                    f"mutate({key!r}) outlived its lease ({self.config.lock_lease:g}s); "
                    "nothing was written"
                )

        lease = self.ns + "m:" + key
        if not commit or raw is None:
            return self._eval("mutate", key, _RELEASE, [lease], [token], ended)
        keys = [self.counter, self.value(key), lease]
        return self._eval("mutate", key, _COMMIT, keys, [token, _stored(raw)], ended)

    # pub/sub -----------------------------------------------------------------------

    def messages(self, replies: list[Any]) -> list[tuple[str, Raw]]:
        """The published messages among pub/sub replies, as (channel, raw)."""
        cut = len(self.ns) + 2
        return [
            (bytes(r["channel"]).decode()[cut:], bytes(r["data"]))
            for r in replies
            if r is not None and r.get("type") == "message"
        ]


def _nothing(_: object) -> None:
    return None


def _zero(_: object) -> int:
    return 0


def _text(reply: Any) -> str:
    return bytes(reply).decode()


def _raw_stored(reply: Any) -> Raw:
    raw = _raw(reply)
    if raw is None:  # pragma: no cover - the script always returns a value
        raise StateError("setdefault: Redis returned no value")
    return raw


class _Subscribing:
    """A SUBSCRIBE until Redis confirmed every channel (so that nothing
    published after ``subscribe`` returns is missed), keeping what arrives
    meanwhile."""

    def __init__(self, cmd: _Commands, channels: list[str]) -> None:
        self.cmd = cmd
        self.channels = [cmd.channel(c) for c in channels]
        self.deadline = time.monotonic() + cmd.config.connect_timeout
        self.confirmed = 0
        self.early: list[Any] = []

    def waiting(self, reply: Any = None) -> bool:
        """Take ``reply``; whether a confirmation is still due."""
        if reply is not None and reply["type"] == "subscribe":
            self.confirmed += 1
        elif reply is not None:
            self.early.append(reply)
        if self.confirmed >= len(self.channels):
            return False
        if time.monotonic() > self.deadline:
            raise redis.TimeoutError("no confirmation of SUBSCRIBE")
        return True

    def subscriber(self, pubsub: Any) -> _Subscriber:
        return _Subscriber(pubsub, self.cmd.messages(self.early))


class _Subscriber:
    def __init__(self, pubsub: Any, early: list[tuple[str, Raw]]) -> None:
        self.pubsub = pubsub
        self.early = early

    def take_early(self) -> list[tuple[str, Raw]]:
        early, self.early = self.early, []
        return early


_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# A subscriber's socket closed under it (by close() from another thread) makes
# redis-py raise ValueError("I/O operation on closed file"): a disconnect too.
_RECEIVE_ERRORS = (*_CONNECTION_ERRORS, ValueError)


class _Engine:
    """What both engines hold: the config, the codec and the commands."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.codec = RedisCodec(config.serializer == "pickle")
        self.cmd = _Commands(config)
        # Reads of the near cache's keys: no round trip while Redis has sent
        # no invalidation of them.
        self._source = (str(config.address), self.cmd.values)
        self._tracker: Tracker | None = None
        self.near: NearCache | None = None
        if config.near_cache:
            tracker = self._tracker = Tracker(config, self.cmd.values, config.near_cache)
            self.near = NearCache(
                tracker.open, config.near_cache, config.near_cache_size, self.codec.decode
            )

    def _wrote(self, keys: Iterable[str]) -> None:
        if tracking.TRACKERS:  # a near cache in this process, maybe of another client
            tracking.wrote(self._source, keys)

    def _wrote_all(self) -> None:
        if tracking.TRACKERS:
            tracking.wrote_all(self._source)

    def _close_tracker(self, wait: bool = True) -> None:
        if self._tracker is not None:
            self._tracker.close(wait)


class RedisEngine(_Engine):
    """Sync client on a redis-py connection pool."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        pool = redis.BlockingConnectionPool.from_url(str(config.address), **_pool_kwargs(config))
        self.client = redis.Redis(connection_pool=pool)
        self._execute: Callable[..., Any] = self.client.execute_command

    def _call(self, fn: Callable[[], T], op: _Op[Any] | None = None) -> T:
        retry = Backoff(time.monotonic() + self.config.connect_timeout)
        while True:
            try:
                return fn()
            except redis.RedisError as exc:
                error = self.cmd.failure(exc, op)
                if error is None and retry.sleep():
                    continue
                raise error or self.cmd.unavailable(exc) from exc

    def _send(self, op: _Op[Any]) -> Any:
        if not op.args:
            return None
        try:
            return self._execute(*op.args)
        except NoScriptError:
            if op.script is None:
                raise
            self._execute("SCRIPT", "LOAD", op.script)
            return self._execute(*op.args)

    def _run(self, op: _Op[T]) -> T:
        return op.parse(self._call(lambda: self._send(op), op))

    def _write(self, op: _Op[T], keys: Iterable[str]) -> T:
        try:
            return self._run(op)
        finally:  # acknowledged or not, what this process kept of keys is stale
            self._wrote(keys)

    def _acquire(self, op: _Op[T | None], timeout: float | None) -> T | None:
        retry = Backoff(_deadline(timeout), first=0.002, cap=0.1)
        while (got := self._run(op)) is None:
            if not retry.sleep():
                return None
        return got

    def _scan(self, prefix: str) -> list[bytes]:
        return list(self.client.scan_iter(match=self.cmd.pattern(prefix), count=1000))

    def get(self, key: str) -> Raw | None:
        near = self.near
        # The state's get found no current value kept (see NearCache.read);
        # with no table (no listener yet, an older server), a plain get.
        if near is None or not key.startswith(near.prefixes) or (mark := near.mark(key)) is None:
            return self._run(self.cmd.get(key))
        sent = time.time()  # the ttl counts from no earlier than this
        raw, ttl = self._run(self.cmd.get_near(key))
        near.keep(key, mark, raw, None if ttl is None else sent + ttl)
        return raw

    def get_versioned(self, key: str) -> tuple[Raw | None, int | None]:
        return self._run(self.cmd.get_versioned(key))

    def get_many(self, keys: list[str]) -> dict[str, Raw]:
        return self._run(self.cmd.get_many(keys))

    def set(self, key: str, raw: Raw, ttl: float | None) -> None:
        self._write(self.cmd.set_many({key: raw}, ttl), (key,))

    def set_many(self, items: dict[str, Raw], ttl: float | None) -> None:
        self._write(self.cmd.set_many(items, ttl), items)

    def set_if_version(self, key: str, raw: Raw, version: int | None, ttl: float | None) -> bool:
        return self._write(self.cmd.set_if_version(key, raw, version, ttl), (key,))

    def add(self, key: str, raw: Raw, ttl: float | None) -> bool:
        return self._write(self.cmd.set_if_version(key, raw, None, ttl), (key,))

    def delete(self, key: str) -> bool:
        return self._write(self.cmd.delete(key), (key,))

    def delete_many(self, keys: list[str]) -> int:
        return self._write(self.cmd.delete_many(keys), keys)

    def incr(self, key: str, amount: int, ttl: float | None) -> int:
        return self._write(self.cmd.incr(key, amount, ttl), (key,))

    def setdefault(self, key: str, raw: Raw) -> Raw:
        return self._write(self.cmd.setdefault(key, raw), (key,))

    def expire(self, key: str, ttl: float | None) -> bool:
        return self._write(self.cmd.expire(key, ttl), (key,))

    def ttl(self, key: str) -> float | None:
        return self._run(self.cmd.ttl(key))

    def keys(self, prefix: str) -> list[str]:
        return self.cmd.listed(self._call(lambda: self._scan(prefix)))

    def clear(self, prefix: str) -> int:
        try:
            doomed = self._call(lambda: self._scan(prefix))
            return sum(self._run(op) for op in self.cmd.unlinks(doomed))
        finally:
            self._wrote_all()

    def secret(self, name: str, nbytes: int) -> str:
        return self._run(self.cmd.secret(name, nbytes))

    def rotate_secret(self, name: str, nbytes: int) -> str:
        return self._run(self.cmd.rotate_secret(name, nbytes))

    def publish(self, channel: str, raw: Raw) -> int:
        return self._run(self.cmd.publish(channel, raw))

    def info(self) -> dict[str, Any]:
        return self._run(self.cmd.info())

    def lock_acquire(self, name: str, timeout: float | None) -> str | None:
        return self._acquire(self.cmd.lock_acquire(name), timeout)

    def lock_release(self, handle: str, name: str) -> None:
        self._run(self.cmd.lock_release(handle, name))

    def mutate_begin(self, key: str, timeout: float | None) -> tuple[str, Raw | None]:
        got = self._acquire(self.cmd.mutate_begin(key), timeout)
        return self.cmd.mutate_begun(got, key, timeout)

    def mutate_end(self, handle: str, key: str, raw: Raw | None, commit: bool) -> None:
        self._write(self.cmd.mutate_end(handle, key, raw, commit), (key,))

    def subscribe(self, channels: list[str]) -> _Subscriber:
        pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        subscribing = _Subscribing(self.cmd, channels)
        try:
            pubsub.subscribe(*subscribing.channels)
            reply = None
            while subscribing.waiting(reply):
                reply = pubsub.get_message(timeout=0.1)
        except _CONNECTION_ERRORS as exc:
            pubsub.close()
            raise self.cmd.unavailable(exc) from exc
        return subscribing.subscriber(pubsub)

    def receive(self, handle: _Subscriber, timeout: float) -> list[tuple[str, Raw]]:
        if handle.early:
            return handle.take_early()
        try:
            replies = [handle.pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)]
            while replies[-1] is not None:  # and whatever else is already here
                replies.append(handle.pubsub.get_message(ignore_subscribe_messages=True))
        except _RECEIVE_ERRORS as exc:
            raise self.cmd.unavailable(exc) from exc
        return self.cmd.messages(replies)

    def unsubscribe(self, handle: _Subscriber) -> None:
        handle.pubsub.close()

    def close(self) -> None:
        self._close_tracker()
        self.client.connection_pool.disconnect()


class AsyncRedisEngine(_Engine):
    """Async client on a redis.asyncio connection pool."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        pool = aredis.BlockingConnectionPool.from_url(str(config.address), **_pool_kwargs(config))
        self.client = aredis.Redis(connection_pool=pool)
        self._execute: Callable[..., Awaitable[Any]] = self.client.execute_command

    async def _call(self, fn: Callable[[], Awaitable[T]], op: _Op[Any] | None = None) -> T:
        retry = Backoff(time.monotonic() + self.config.connect_timeout)
        while True:
            try:
                return await fn()
            except redis.RedisError as exc:
                error = self.cmd.failure(exc, op)
                if error is None and await retry.asleep():
                    continue
                raise error or self.cmd.unavailable(exc) from exc

    async def _send(self, op: _Op[Any]) -> Any:
        if not op.args:
            return None
        try:
            return await self._execute(*op.args)
        except NoScriptError:
            if op.script is None:
                raise
            await self._execute("SCRIPT", "LOAD", op.script)
            return await self._execute(*op.args)

    async def _run(self, op: _Op[T]) -> T:
        return op.parse(await self._call(lambda: self._send(op), op))

    async def _write(self, op: _Op[T], keys: Iterable[str]) -> T:
        try:
            return await self._run(op)
        finally:  # acknowledged or not, what this process kept of keys is stale
            self._wrote(keys)

    async def _acquire(self, op: _Op[T | None], timeout: float | None) -> T | None:
        retry = Backoff(_deadline(timeout), first=0.002, cap=0.1)
        while (got := await self._run(op)) is None:
            if not await retry.asleep():
                return None
        return got

    async def _scan(self, prefix: str) -> list[bytes]:
        found: AsyncIterator[bytes] = self.client.scan_iter(
            match=self.cmd.pattern(prefix), count=1000
        )
        return [name async for name in found]

    async def get(self, key: str) -> Raw | None:
        near = self.near
        # The state's get found no current value kept (see NearCache.read);
        # with no table (no listener yet, an older server), a plain get.
        if near is None or not key.startswith(near.prefixes) or (mark := near.mark(key)) is None:
            return await self._run(self.cmd.get(key))
        sent = time.time()  # the ttl counts from no earlier than this
        raw, ttl = await self._run(self.cmd.get_near(key))
        near.keep(key, mark, raw, None if ttl is None else sent + ttl)
        return raw

    async def get_versioned(self, key: str) -> tuple[Raw | None, int | None]:
        return await self._run(self.cmd.get_versioned(key))

    async def get_many(self, keys: list[str]) -> dict[str, Raw]:
        return await self._run(self.cmd.get_many(keys))

    async def set(self, key: str, raw: Raw, ttl: float | None) -> None:
        await self._write(self.cmd.set_many({key: raw}, ttl), (key,))

    async def set_many(self, items: dict[str, Raw], ttl: float | None) -> None:
        await self._write(self.cmd.set_many(items, ttl), items)

    async def set_if_version(
        self, key: str, raw: Raw, version: int | None, ttl: float | None
    ) -> bool:
        return await self._write(self.cmd.set_if_version(key, raw, version, ttl), (key,))

    async def add(self, key: str, raw: Raw, ttl: float | None) -> bool:
        return await self._write(self.cmd.set_if_version(key, raw, None, ttl), (key,))

    async def delete(self, key: str) -> bool:
        return await self._write(self.cmd.delete(key), (key,))

    async def delete_many(self, keys: list[str]) -> int:
        return await self._write(self.cmd.delete_many(keys), keys)

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        return await self._write(self.cmd.incr(key, amount, ttl), (key,))

    async def setdefault(self, key: str, raw: Raw) -> Raw:
        return await self._write(self.cmd.setdefault(key, raw), (key,))

    async def expire(self, key: str, ttl: float | None) -> bool:
        return await self._write(self.cmd.expire(key, ttl), (key,))

    async def ttl(self, key: str) -> float | None:
        return await self._run(self.cmd.ttl(key))

    async def keys(self, prefix: str) -> list[str]:
        return self.cmd.listed(await self._call(lambda: self._scan(prefix)))

    async def clear(self, prefix: str) -> int:
        try:
            doomed = await self._call(lambda: self._scan(prefix))
            removed = 0
            for op in self.cmd.unlinks(doomed):
                removed += await self._run(op)
            return removed
        finally:
            self._wrote_all()

    async def secret(self, name: str, nbytes: int) -> str:
        return await self._run(self.cmd.secret(name, nbytes))

    async def rotate_secret(self, name: str, nbytes: int) -> str:
        return await self._run(self.cmd.rotate_secret(name, nbytes))

    async def publish(self, channel: str, raw: Raw) -> int:
        return await self._run(self.cmd.publish(channel, raw))

    async def info(self) -> dict[str, Any]:
        return await self._run(self.cmd.info())

    async def lock_acquire(self, name: str, timeout: float | None) -> str | None:
        before = _cancel_requests()
        token = await self._acquire(self.cmd.lock_acquire(name), timeout)
        if token is not None and _cancel_requests() > before:
            await self.lock_release(token, name)
            raise asyncio.CancelledError
        return token

    async def lock_release(self, handle: str, name: str) -> None:
        await self._run(self.cmd.lock_release(handle, name))

    async def mutate_begin(self, key: str, timeout: float | None) -> tuple[str, Raw | None]:
        before = _cancel_requests()
        got = await self._acquire(self.cmd.mutate_begin(key), timeout)
        begun = self.cmd.mutate_begun(got, key, timeout)
        if _cancel_requests() > before:
            await self.mutate_end(begun[0], key, None, False)
            raise asyncio.CancelledError
        return begun

    async def mutate_end(self, handle: str, key: str, raw: Raw | None, commit: bool) -> None:
        await self._write(self.cmd.mutate_end(handle, key, raw, commit), (key,))

    async def subscribe(self, channels: list[str]) -> _Subscriber:
        pubsub = self.client.pubsub()
        subscribing = _Subscribing(self.cmd, channels)
        try:
            await pubsub.subscribe(*subscribing.channels)
            reply = None
            while subscribing.waiting(reply):
                reply = await pubsub.get_message(timeout=0.1)
        except _CONNECTION_ERRORS as exc:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise self.cmd.unavailable(exc) from exc
        return subscribing.subscriber(pubsub)

    async def receive(self, handle: _Subscriber, timeout: float) -> list[tuple[str, Raw]]:
        if handle.early:
            return handle.take_early()
        pubsub = handle.pubsub
        try:
            replies = [await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)]
            while replies[-1] is not None:
                replies.append(await pubsub.get_message(ignore_subscribe_messages=True))
        except _RECEIVE_ERRORS as exc:
            raise self.cmd.unavailable(exc) from exc
        return self.cmd.messages(replies)

    async def unsubscribe(self, handle: _Subscriber) -> None:
        await handle.pubsub.aclose()

    async def aclose(self) -> None:
        self._close_tracker(wait=False)  # its thread ends on its own: the loop must not wait
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


def _cancel_requests() -> int:
    """How many cancellations of this task are pending. One more after a
    command than before it was swallowed: a cancellation that lands as
    redis-py completes a command can be lost (seen on Python 3.11: a cancelled
    lock waiter then held the lock). Python 3.10 cannot tell (always 0)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return int(cancelling()) if cancelling is not None else 0
