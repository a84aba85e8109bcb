"""The PostgreSQL engine: the same operations, each atomic in the database.

Layout. An app's tables live in its own schema, ``shared_core_APP``
(created on first use, see ``_SETUP``):

- ``kv``: one row per key: ``num`` (an int that fits in 64 bits, so that
  ``incr`` adds to it in place) or ``data`` (the bytes the codec made, an
  int past 64 bits as its decimal digits), never both; ``version``, drawn
  from the sequence ``version``; ``expires``, the deadline (None: none).
  Every read filters on the deadline, so an expired row is never returned,
  and a periodic bounded delete (``_SWEEP``) reclaims the rows.
- ``secrets``; ``subscribers`` (which server process listens to which
  channel, to count a publish's receivers); ``messages`` (payloads too big
  for a NOTIFY).
- functions ``take`` (an advisory lock with a bounded wait) and
  ``begin_mutate`` (``take`` plus the row, ``FOR UPDATE``).

Round trips. Each operation is one statement in autocommit, so one round
trip: ``incr`` is ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``,
``add`` and ``set_if_version`` write only where their condition holds, batch
calls take arrays. ``mutate`` is a transaction: BEGIN and ``begin_mutate``
pipelined (one round trip), the user's block, then the write and COMMIT
pipelined (one more). ``lock`` holds a session advisory lock on a pooled
connection kept out of the pool until the release: if the holder dies, its
connection dies and PostgreSQL frees the lock at once. Lock waits happen in
the server, in slices of ``_SLICE`` (``lock_timeout``), so a release wakes
the next waiter at once and every wait is bounded.

Failures. Connections come from psycopg's pool (one per event loop for the
async engine, closed with the loop even without ``aclose()``); one whose
socket turned readable while idle (the server closed it, or is shutting
down) is dropped before use, so nothing is sent on a connection known to be
dead, and a failed connect is not retried with the pool's backoff: the next
call tries again. A connection whose call was cut short (a timeout, a
cancellation) is closed, never lent again: PostgreSQL then rolls back what
it had begun and frees its locks. A call that fails once
sent is never resent (it may have committed): it raises
:class:`StateUnavailable`. Each statement is bounded on both sides: the
server cancels it after ``op_timeout`` (``statement_timeout``,
``lock_timeout``), and the client gives up a second later (a frozen server).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import os
import secrets
import select
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from .._codec import Raw, RedisCodec
from .._config import DEFAULT_POSTGRES_MAX_CONNECTIONS, Config
from .._errors import ConfigError, LockTimeout, StateError, StateUnavailable
from .._near import NearCache

try:
    import psycopg
    from psycopg import errors as pgerrors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import ExecStatus, TransactionStatus
    from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolClosed, PoolTimeout
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError(
        "a postgresql:// URL needs psycopg 3 and its pool: pip install 'shared-core[postgres]'"
    ) from exc

T = TypeVar("T")
Row = tuple[Any, ...]

_ROWS = ExecStatus.TUPLES_OK  # cheaper to test than cursor.description
_IDLE = TransactionStatus.IDLE
_ATTEMPTS = 3  # a statement PostgreSQL rolled back to end a deadlock is sent again
_SLICE = 0.5  # seconds: the longest lock wait in one statement
_SWEEP_EVERY = 30.0  # seconds between a process's sweeps of expired rows
_SWEEP_BATCH = 1000
_MESSAGE_KEEP = "10 minutes"  # how long a big message stays for slow subscribers
_NOTIFY_LIMIT = 7900  # bytes: NOTIFY takes payloads under 8000
_MAX_TTL = 1e12  # seconds (31,700 years): what a timestamptz deadline can hold
_INT64 = (-(2**63), 2**63 - 1)
_STATEMENT_GRACE_MS = 250  # past op_timeout: a row lock's wait times out first
_RECONNECT_TIMEOUT = 0.05  # seconds a pool retries a failed connect
# A wait for a connection asks the pool again this often: psycopg's pool starts
# a new attempt for a new request only, not for one waiting since the last
# attempt gave up (a server that was frozen, then resumed).
_ASK_AGAIN = 0.25
_CLOSE_TIMEOUT = 1.0  # seconds a loop's end waits for its pool's tasks
_REPLY_GRACE = 1.0  # seconds the client waits past op_timeout for the server's answer
_SCHEMA_VERSION = 1
# The schema is missing (first use, or dropped): create it and send again,
# which is safe, since the statement failed before it ran.
_MISSING_SCHEMA = (pgerrors.UndefinedTable, pgerrors.UndefinedFunction, pgerrors.InvalidSchemaName)


def schema_name(app: str) -> str:
    """The schema of ``app``'s tables: ``shared_core_APP``, within PostgreSQL's
    63 bytes (a long name is cut and given a hash)."""
    name = f"shared_core_{app}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha1(app.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"shared_core_{app[:42]}_{digest}"


def _advisory_key(schema: str, kind: str, name: str) -> int:
    """A 64-bit advisory lock key for (schema, kind, name)."""
    digest = hashlib.blake2b(f"{schema}\0{kind}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _channel_id(schema: str, channel: str) -> str:
    """A NOTIFY channel (an identifier of at most 63 bytes) for ``channel``."""
    return "sc_" + hashlib.blake2b(f"{schema}\0{channel}".encode(), digest_size=16).hexdigest()


# clock_timestamp(), not now(): a statement that waited for a row (behind a
# mutate) judges expiry, and sets deadlines, at the time it writes.
_LIVE = "(expires IS NULL OR expires > clock_timestamp())"
_DEADLINE = "clock_timestamp() + %s::float8 * interval '1 second'"


def _setup(s: str, seq: str) -> str:
    """The schema, created once however many workers start at once: the
    statements run under an advisory lock, in one transaction."""
    return f"""
BEGIN;
SELECT pg_advisory_xact_lock({_advisory_key(s, "setup", "")});
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.kv (
    key text COLLATE "C" PRIMARY KEY,
    num bigint,
    data bytea,
    version bigint NOT NULL,
    expires timestamptz,
    CONSTRAINT kv_one_value CHECK ((num IS NULL) <> (data IS NULL))
);
CREATE INDEX IF NOT EXISTS kv_expires ON {s}.kv (expires) WHERE expires IS NOT NULL;
-- Versions start from the clock in microseconds: a schema dropped and made
-- again never hands out a version read before.
CREATE SEQUENCE IF NOT EXISTS {seq} START WITH {int(time.time() * 1e6)};
CREATE TABLE IF NOT EXISTS {s}.secrets (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.subscribers (
    channel text NOT NULL, pid int NOT NULL, PRIMARY KEY (channel, pid)
);
CREATE TABLE IF NOT EXISTS {s}.messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    data bytea NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.meta (name text PRIMARY KEY, value text NOT NULL);
INSERT INTO {s}.meta VALUES ('schema_version', '{_SCHEMA_VERSION}') ON CONFLICT DO NOTHING;
-- An advisory lock (session, or transaction with xact) waiting at most ms
-- milliseconds; false when it was not taken.
CREATE OR REPLACE FUNCTION {s}.take(k bigint, ms int, xact boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    previous text := current_setting('lock_timeout');
BEGIN
    IF ms <= 0 THEN
        IF xact THEN RETURN pg_try_advisory_xact_lock(k); END IF;
        RETURN pg_try_advisory_lock(k);
    END IF;
    PERFORM set_config('lock_timeout', ms::text, true);
    IF xact THEN PERFORM pg_advisory_xact_lock(k); ELSE PERFORM pg_advisory_lock(k); END IF;
    PERFORM set_config('lock_timeout', previous, true);
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;
END $$;
-- mutate's lock and the key's row, locked until the transaction ends.
CREATE OR REPLACE FUNCTION {s}.begin_mutate(
    k bigint, key_ text, ms int, OUT ok boolean, OUT num_ bigint, OUT data_ bytea
) LANGUAGE plpgsql AS $$
BEGIN
    ok := {s}.take(k, ms, true);
    IF ok THEN
        SELECT t.num, t.data INTO num_, data_ FROM {s}.kv t
        WHERE t.key = key_ AND (t.expires IS NULL OR t.expires > clock_timestamp())
        FOR UPDATE;
    END IF;
END $$;
-- A message to channel ch (a big one through the messages table), and how
-- many subscribers it reaches. A subscription holds channel lock k until its
-- LISTEN commits; publish takes it shared, then counts: a query inside a
-- function sees rows committed before that query, so the count and the
-- delivery agree.
CREATE OR REPLACE FUNCTION {s}.publish(ch text, k bigint, payload text, big bytea)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(k);
    IF big IS NOT NULL THEN
        INSERT INTO {s}.messages (data) VALUES (big) RETURNING '@' || id::text INTO payload;
    END IF;
    PERFORM pg_notify(ch, payload);
    SELECT count(*) INTO n FROM {s}.subscribers
    WHERE channel = ch AND pid IN (SELECT pid FROM pg_stat_activity);
    RETURN n;
END $$;
COMMIT;
"""


def _sweep(s: str) -> str:
    """Reclaim a bounded batch of expired rows, old big messages, and the
    subscriptions of connections that died (rows nobody else is locking)."""
    return f"""
DELETE FROM {s}.kv WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {s}.kv WHERE expires <= now()
    LIMIT {_SWEEP_BATCH} FOR UPDATE SKIP LOCKED));
DELETE FROM {s}.messages WHERE at < now() - interval '{_MESSAGE_KEEP}';
DELETE FROM {s}.subscribers WHERE pid NOT IN (SELECT pid FROM pg_stat_activity);
"""


def _stored(raw: Raw) -> tuple[int | None, bytes | None]:
    """``(num, data)`` of a raw value: an int in 64 bits as num, else bytes."""
    if isinstance(raw, int):
        if _INT64[0] <= raw <= _INT64[1]:
            return raw, None
        return None, str(raw).encode()
    return None, raw


def _raw(num: int | None, data: bytes | None) -> Raw:
    return num if num is not None else bytes(data or b"")


def _seconds(ttl: float | None) -> float | None:
    return None if ttl is None else min(ttl, _MAX_TTL)


def _payload(raw: Raw) -> str | None:
    """A NOTIFY payload for ``raw``, or None when too big for one (a table
    carries it). ``=`` text as it is, ``b`` base64 bytes, ``@`` a message id."""
    data = str(raw).encode() if isinstance(raw, int) else raw
    if data.isascii() and b"\0" not in data:
        payload = "=" + data.decode()
    else:
        payload = "b" + base64.b64encode(data).decode()
    return payload if len(payload) <= _NOTIFY_LIMIT else None


class _Op(Generic[T]):
    """One statement, its parameters, and how its rows read."""

    __slots__ = ("name", "params", "parse", "sql", "subject")

    def __init__(
        self,
        name: str,
        subject: str,
        sql: str,
        params: Sequence[Any],
        parse: Callable[[list[Row]], T],
    ) -> None:
        self.name = name
        self.subject = subject
        self.sql = sql
        self.params = params
        self.parse = parse


def _named(name: str, subject: str) -> _Op[None]:
    """An operation of several statements, as its errors name it."""
    return _Op(name, subject, "", (), _nothing)


def _first_raw(rows: list[Row]) -> Raw | None:
    return _raw(rows[0][0], rows[0][1]) if rows else None


def _found(rows: list[Row]) -> bool:
    return bool(rows)


def _nothing(rows: list[Row]) -> None:
    return None


def _count(rows: list[Row]) -> int:
    return int(rows[0][0])


def _value(rows: list[Row]) -> Any:
    return rows[0][0]


class _Sql:
    """What every operation sends and how its rows read, for both engines."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.schema = schema_name(config.app)
        s = self.s = f'"{self.schema}"'  # an app name never holds a quote
        seq = self.seq = f"{s}.version"
        nextval = f"nextval('{seq}')"
        self.setup = _setup(s, seq)
        self.sweep = _sweep(s)
        upsert = (
            f"INSERT INTO {s}.kv AS t (key, num, data, version, expires) "
            f"SELECT k, n, d, {nextval}, {_DEADLINE} "
            # In key order, as every batch locks its rows: two batches never deadlock.
            "FROM unnest(%s::text[], %s::bigint[], %s::bytea[]) AS u(k, n, d) ORDER BY k "
            "ON CONFLICT (key) DO UPDATE SET num = EXCLUDED.num, data = EXCLUDED.data, "
            "version = EXCLUDED.version, expires = EXCLUDED.expires"
        )
        expired = "t.expires <= clock_timestamp()"
        self._get = f"SELECT num, data FROM {s}.kv WHERE key = %s AND {_LIVE}"
        self._get_versioned = f"SELECT num, data, version FROM {s}.kv WHERE key = %s AND {_LIVE}"
        self._get_many = f"SELECT key, num, data FROM {s}.kv WHERE key = ANY(%s) AND {_LIVE}"
        self._set = (
            f"INSERT INTO {s}.kv AS t (key, num, data, version, expires) "
            f"VALUES (%s, %s, %s, {nextval}, {_DEADLINE}) "
            "ON CONFLICT (key) DO UPDATE SET num = EXCLUDED.num, data = EXCLUDED.data, "
            "version = EXCLUDED.version, expires = EXCLUDED.expires"
        )
        self._set_many = upsert
        self._add = f"{self._set} WHERE {expired} RETURNING 1"
        self._set_if_version = (
            f"UPDATE {s}.kv SET num = %s, data = %s, version = {nextval}, expires = {_DEADLINE} "
            f"WHERE key = %s AND version = %s AND {_LIVE} RETURNING 1"
        )
        self._delete = f"DELETE FROM {s}.kv WHERE key = %s AND {_LIVE} RETURNING 1"
        # An expired row goes too, uncounted.
        self._delete_many = (
            f"WITH o AS (SELECT key FROM {s}.kv WHERE key = ANY(%s) ORDER BY key FOR UPDATE), "
            f"d AS (DELETE FROM {s}.kv t USING o WHERE t.key = o.key RETURNING {_LIVE} AS live) "
            "SELECT count(*) FILTER (WHERE live) FROM d"
        )
        # A live non-int leaves both columns null: the CHECK refuses it, and
        # nothing changes.
        self._incr = (
            f"INSERT INTO {s}.kv AS t (key, num, data, version, expires) "
            f"VALUES (%s, %s::bigint, NULL, {nextval}, {_DEADLINE}) "
            f"ON CONFLICT (key) DO UPDATE SET "
            f"num = CASE WHEN {expired} THEN EXCLUDED.num ELSE t.num + EXCLUDED.num END, "
            "data = NULL, version = EXCLUDED.version, "
            f"expires = CASE WHEN {expired} THEN EXCLUDED.expires ELSE t.expires END "
            "RETURNING num"
        )
        # A live row is "updated" to itself, so that RETURNING gives it.
        self._setdefault = (
            f"INSERT INTO {s}.kv AS t (key, num, data, version, expires) "
            f"VALUES (%s, %s, %s, {nextval}, NULL) "
            f"ON CONFLICT (key) DO UPDATE SET "
            f"num = CASE WHEN {expired} THEN EXCLUDED.num ELSE t.num END, "
            f"data = CASE WHEN {expired} THEN EXCLUDED.data ELSE t.data END, "
            f"version = CASE WHEN {expired} THEN EXCLUDED.version ELSE t.version END, "
            f"expires = CASE WHEN {expired} THEN NULL ELSE t.expires END "
            "RETURNING num, data"
        )
        self._expire = (
            f"UPDATE {s}.kv SET expires = {_DEADLINE}, version = {nextval} "
            f"WHERE key = %s AND {_LIVE} RETURNING 1"
        )
        self._ttl = (
            f"SELECT extract(epoch FROM expires - now())::float8 FROM {s}.kv "
            f"WHERE key = %s AND {_LIVE}"
        )
        self._keys = f"SELECT key FROM {s}.kv WHERE starts_with(key, %s) AND {_LIVE} ORDER BY key"
        self._clear = (
            f"WITH d AS (DELETE FROM {s}.kv WHERE starts_with(key, %s) RETURNING {_LIVE} AS live) "
            "SELECT count(*) FILTER (WHERE live) FROM d"
        )
        self._secret = (
            f"INSERT INTO {s}.secrets AS t VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = t.value RETURNING value"
        )
        self._rotate_secret = (
            f"INSERT INTO {s}.secrets VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value RETURNING value"
        )
        self._publish = f"SELECT {s}.publish(%s, %s, %s, %s)"
        self._info = (
            "SELECT pg_backend_pid(), "
            "(SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()), "
            f"(SELECT count(*) FROM {s}.kv WHERE {_LIVE}), "
            "extract(epoch FROM now() - pg_postmaster_start_time())::float8, "
            "current_setting('server_version')"
        )
        self.take = f"SELECT {s}.take(%s, %s, false)"
        self.unlock = "SELECT pg_advisory_unlock(%s)"
        self.begin_mutate = f"SELECT ok, num_, data_ FROM {s}.begin_mutate(%s, %s, %s)"
        # The key keeps its ttl, unless it ran out during the block.
        self.commit_mutate = (
            f"INSERT INTO {s}.kv AS t (key, num, data, version, expires) "
            f"VALUES (%s, %s, %s, {nextval}, NULL) "
            "ON CONFLICT (key) DO UPDATE SET num = EXCLUDED.num, data = EXCLUDED.data, "
            "version = EXCLUDED.version, "
            "expires = CASE WHEN t.expires > clock_timestamp() THEN t.expires END"
        )
        self.subscribe = f"INSERT INTO {s}.subscribers"
        self.unsubscribe = f"DELETE FROM {s}.subscribers WHERE pid = pg_backend_pid()"
        self.messages = f"SELECT id, data FROM {s}.messages WHERE id = ANY(%s)"
        self.where = _where(config)

    # keys of advisory locks and channels ---------------------------------------------

    def lock_key(self, name: str) -> int:
        return _advisory_key(self.schema, "lock", name)

    def mutate_key(self, key: str) -> int:
        return _advisory_key(self.schema, "mutate", key)

    def channel(self, name: str) -> str:
        return _channel_id(self.schema, name)

    def channel_key(self, name: str) -> int:
        """The advisory lock that orders subscriptions and publishes on ``name``."""
        return _advisory_key(self.schema, "channel", name)

    # operations -------------------------------------------------------------------

    def get(self, key: str) -> _Op[Raw | None]:
        return _Op("get", key, self._get, (key,), _first_raw)

    def get_versioned(self, key: str) -> _Op[tuple[Raw | None, int | None]]:
        def versioned(rows: list[Row]) -> tuple[Raw | None, int | None]:
            return (_raw(rows[0][0], rows[0][1]), int(rows[0][2])) if rows else (None, None)

        return _Op("get_versioned", key, self._get_versioned, (key,), versioned)

    def get_many(self, keys: list[str]) -> _Op[dict[str, Raw]]:
        def found(rows: list[Row]) -> dict[str, Raw]:
            return {key: _raw(num, data) for key, num, data in rows}

        return _Op("get_many", keys[0] if keys else "", self._get_many, (keys,), found)

    def set(self, key: str, raw: Raw, ttl: float | None) -> _Op[None]:
        return _Op("set", key, self._set, (key, *_stored(raw), _seconds(ttl)), _nothing)

    def set_many(self, items: dict[str, Raw], ttl: float | None) -> _Op[None]:
        nums, datas = zip(*map(_stored, items.values()), strict=True) if items else ((), ())
        params = (_seconds(ttl), list(items), list(nums), list(datas))
        return _Op("set_many", next(iter(items), ""), self._set_many, params, _nothing)

    def add(self, key: str, raw: Raw, ttl: float | None) -> _Op[bool]:
        return _Op("add", key, self._add, (key, *_stored(raw), _seconds(ttl)), _found)

    def set_if_version(
        self, key: str, raw: Raw, version: int | None, ttl: float | None
    ) -> _Op[bool]:
        if version is None:
            return self.add(key, raw, ttl)
        params = (*_stored(raw), _seconds(ttl), key, version)
        return _Op("set_if_version", key, self._set_if_version, params, _found)

    def delete(self, key: str) -> _Op[bool]:
        return _Op("delete", key, self._delete, (key,), _found)

    def delete_many(self, keys: list[str]) -> _Op[int]:
        return _Op("delete_many", keys[0] if keys else "", self._delete_many, (keys,), _count)

    def incr(self, key: str, amount: int, ttl: float | None) -> _Op[int]:
        def counted(rows: list[Row]) -> int:
            return int(rows[0][0])

        return _Op("incr", key, self._incr, (key, amount, _seconds(ttl)), counted)

    def setdefault(self, key: str, raw: Raw) -> _Op[Raw]:
        def stored(rows: list[Row]) -> Raw:
            return _raw(rows[0][0], rows[0][1])

        return _Op("setdefault", key, self._setdefault, (key, *_stored(raw)), stored)

    def expire(self, key: str, ttl: float | None) -> _Op[bool]:
        return _Op("expire", key, self._expire, (_seconds(ttl), key), _found)

    def ttl(self, key: str) -> _Op[float | None]:
        def left(rows: list[Row]) -> float | None:
            if not rows:
                return None
            return math.inf if rows[0][0] is None else max(float(rows[0][0]), 0.0)

        return _Op("ttl", key, self._ttl, (key,), left)

    def keys(self, prefix: str) -> _Op[list[str]]:
        return _Op("keys", prefix, self._keys, (prefix,), lambda rows: [r[0] for r in rows])

    def clear(self, prefix: str) -> _Op[int]:
        return _Op("clear", prefix, self._clear, (prefix,), _count)

    def secret(self, name: str, nbytes: int) -> _Op[str]:
        return _Op("secret", name, self._secret, (name, secrets.token_hex(nbytes)), _value)

    def rotate_secret(self, name: str, nbytes: int) -> _Op[str]:
        made = secrets.token_hex(nbytes)
        return _Op("rotate_secret", name, self._rotate_secret, (name, made), _value)

    def publish(self, channel: str, raw: Raw) -> _Op[int]:
        ident, key = self.channel(channel), self.channel_key(channel)
        payload = _payload(raw)

        def receivers(rows: list[Row]) -> int:
            return int(rows[0][0])

        big = None
        if payload is None:
            big = str(raw).encode() if isinstance(raw, int) else raw
        return _Op("publish", channel, self._publish, (ident, key, payload, big), receivers)

    def info(self) -> _Op[dict[str, Any]]:
        def described(rows: list[Row]) -> dict[str, Any]:
            pid, clients, keys, uptime, version = rows[0]
            return {
                "engine": "postgres",
                "pid": pid,
                "clients": clients,
                "keys": keys,
                "uptime": uptime,
                "postgres": version,
                "schema": self.schema,
            }

        return _Op("info", "", self._info, (), described)

    @staticmethod
    def mutate_begun(rows: list[Row]) -> tuple[bool, Raw | None]:
        ok, num, data = rows[0]
        return bool(ok), None if num is None and data is None else _raw(num, data)

    def commit_params(self, key: str, raw: Raw) -> tuple[Any, ...]:
        return (key, *_stored(raw))

    # errors -----------------------------------------------------------------------

    def lost(self, name: str, exc: BaseException) -> StateUnavailable:
        """A held lock's connection broke: PostgreSQL freed the lock then."""
        return self.unavailable(
            exc,
            f"lock {name!r} was lost before its release (its connection broke, which "
            "frees it): another holder may have run meanwhile: ",
        )

    def unavailable(self, exc: BaseException, what: str = "") -> StateUnavailable:
        return StateUnavailable(f"PostgreSQL at {self.where}: {what}{exc}")

    def failure(self, exc: Exception, op: _Op[Any] | None) -> Exception:
        """What to raise for ``exc`` (a psycopg or pool error) from ``op``."""
        name = op.name if op is not None else "call"
        subject = f" of {op.subject!r}" if op is not None and op.subject else ""
        if isinstance(exc, PoolTimeout):
            return self.unavailable(exc, f"no connection within {self.config.connect_timeout:g}s: ")
        if isinstance(exc, pgerrors.QueryCanceled):
            return self.unavailable(
                exc,
                f"{name}{subject} ran past op_timeout ({self.config.op_timeout:g}s), "
                "and was cancelled: nothing changed: ",
            )
        if isinstance(exc, pgerrors.LockNotAvailable):
            return self.unavailable(
                exc,
                f"{name}{subject} waited op_timeout ({self.config.op_timeout:g}s) for a row "
                "lock (a mutate() of the key holds its row until it commits); nothing changed: ",
            )
        if isinstance(exc, pgerrors.TransactionRollback):
            return self.unavailable(exc, f"{name}{subject} was rolled back: nothing changed: ")
        if isinstance(exc, psycopg.OperationalError):
            return self.unavailable(exc)
        if isinstance(exc, pgerrors.CheckViolation) and name == "incr":
            return TypeError(f"incr: the value{subject} is not an int (64-bit in PostgreSQL)")
        if isinstance(exc, pgerrors.NumericValueOutOfRange):
            return StateError(f"{name}{subject} failed in PostgreSQL: {exc} (ints are 64-bit)")
        if isinstance(exc, pgerrors.ProgramLimitExceeded):
            return StateError(f"{name}{subject}: too big for PostgreSQL (a key over 2 KB?): {exc}")
        if isinstance(exc, psycopg.DataError) and "NUL" in str(exc):
            return ValueError(f"{name}{subject}: PostgreSQL text cannot hold a NUL character")
        return StateError(f"{name}{subject} failed in PostgreSQL at {self.where}: {exc}")


def _where(config: Config) -> str:
    """The server, as errors name it: never its password."""
    try:
        params = conninfo_to_dict(str(config.address))
    except psycopg.ProgrammingError:
        return "(an invalid URL)"
    host = params.get("host") or "the default socket"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{host}{port}/{params.get('dbname') or params.get('user') or ''}"


def _idle_but_readable(conn: psycopg.BaseConnection[Any]) -> bool:
    """True when an idle connection has something to read: the server closed
    it or is about to (a restart, a shutdown, an administrator's kill)."""
    if conn.closed:
        return True
    poller = select.poll()  # select.select() refuses a descriptor past 1023
    poller.register(conn.pgconn.socket, select.POLLIN)
    return bool(poller.poll(0))


class _Connection(psycopg.Connection[Any]):
    """A connection whose every wait for the server is bounded."""

    reply_timeout: float = 6.0

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        return super().wait(gen, interval, self.reply_timeout if timeout is None else timeout)


class _AsyncConnection(psycopg.AsyncConnection[Any]):
    """The async twin of :class:`_Connection`."""

    reply_timeout: float = 6.0

    async def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        return await super().wait(gen, interval, self.reply_timeout if timeout is None else timeout)


def _settings(config: Config) -> tuple[str, tuple[Any, ...]]:
    """A new connection's settings: the server ends what outlives op_timeout,
    a wait for a row lock first (a clear LockTimeout), then any statement."""
    ms = max(1, round(config.op_timeout * 1000))
    sql = "SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)"
    return sql, (str(ms), str(ms + _STATEMENT_GRACE_MS))


def _pool_kwargs(config: Config) -> dict[str, Any]:
    params = conninfo_to_dict(str(config.address))
    kwargs: dict[str, Any] = {"autocommit": True}
    if "application_name" not in params:
        kwargs["application_name"] = f"shared_core:{config.app}"[:63]
    return {
        "conninfo": str(config.address),
        "kwargs": kwargs,
        "min_size": 1,
        "max_size": config.max_connections or DEFAULT_POSTGRES_MAX_CONNECTIONS,
        "timeout": config.connect_timeout,
        # A failed connect is given up at once, not retried with the pool's
        # backoff (1 s, 2 s, 4 s...): the next call that finds no connection
        # makes a fresh attempt, so a server that is back serves the next call.
        "reconnect_timeout": _RECONNECT_TIMEOUT,
        "open": False,
        "name": f"shared_core:{config.app}",
    }


class _Held(NamedTuple):
    """A lock or a mutate in progress: the connection it holds, and its key."""

    conn: Any
    key: int


_ENGINES: weakref.WeakSet[Any] = weakref.WeakSet()
# A forked child's copies of its parent's pools: kept, never used or closed
# (closing would end the parent's sessions; collecting them would warn).
_INHERITED: list[Any] = []


def _forget_after_fork() -> None:
    # A forked child must not use the parent's connections and pool threads:
    # it makes its own.
    for engine in list(_ENGINES):
        engine._forget()


os.register_at_fork(after_in_child=_forget_after_fork)


class _Engine:
    """What both engines hold: the config, the codec and the statements."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.codec = RedisCodec(config.serializer == "pickle")
        self.near: NearCache | None = None  # refused by the config
        self.sql = _Sql(config)
        self._next_sweep = time.monotonic() + _SWEEP_EVERY * (0.5 + _jitter())
        self._reply_timeout = config.op_timeout + _REPLY_GRACE
        self._settings = _settings(config)
        _ENGINES.add(self)

    def _no_connection(
        self, exc: Exception, pool: Any, deadline: float | None, until: float
    ) -> Exception:
        """No connection came: every one stayed lent out past a lock's own
        timeout (LockTimeout), or none came within connect_timeout."""
        if deadline is not None and _exhausted(pool) and time.monotonic() < until:
            return LockTimeout(f"no connection free within the timeout: {exc}")
        stats = pool.get_stats()
        return self.sql.unavailable(
            exc,
            f"no connection within {self.config.connect_timeout:g}s "
            f"({stats['pool_size']} open of {pool.max_size}, {stats['pool_available']} idle): ",
        )

    def _sweep_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + _SWEEP_EVERY * (0.5 + _jitter())
        return True

    def _slice_ms(self, deadline: float | None) -> int:
        """The next lock wait: a slice, or what is left until ``deadline``."""
        # Within op_timeout, so that the server's statement_timeout never
        # cuts a slice short.
        slice_ms = round(min(_SLICE, self.config.op_timeout) * 1000)
        if deadline is None:
            return slice_ms
        return max(0, min(slice_ms, math.floor((deadline - time.monotonic()) * 1000)))


def _jitter() -> float:
    return secrets.randbelow(1000) / 1000


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _subscriber_channels(sql: _Sql, channels: list[str]) -> dict[str, str]:
    return {sql.channel(name): name for name in channels}


def _listen(sql: _Sql, idents: dict[str, str]) -> str:
    """LISTEN to ``idents`` and count this connection among their subscribers,
    both at the commit, holding the channels' locks until then (in key order:
    two subscriptions never deadlock), so that a publish, which takes them
    shared, either comes after and counts and reaches this connection, or
    comes before and does neither. (The names are ours, ``sc_`` and hex; the
    keys are ints: no quoting needed.)"""
    keys = sorted({sql.channel_key(name) for name in idents.values()})
    locks = "".join(f"SELECT pg_advisory_xact_lock({key}); " for key in keys)
    listens = "".join(f'LISTEN "{ident}"; ' for ident in idents)
    rows = ", ".join(f"('{ident}', pg_backend_pid())" for ident in idents)
    return f"BEGIN; {locks}{listens}{sql.subscribe} VALUES {rows} ON CONFLICT DO NOTHING; COMMIT"


class _Subscriber:
    """A connection that LISTENs, and which NOTIFY channel is which of ours."""

    def __init__(self, conn: Any, idents: dict[str, str]) -> None:
        self.conn = conn
        self.idents = idents


def _decode(payload: str) -> bytes | int:
    """A payload's bytes, or (``@``) the id of a big message to fetch."""
    kind, body = payload[:1], payload[1:]
    if kind == "=":
        return body.encode()
    if kind == "b":
        return base64.b64decode(body)
    return int(body)


def _exhausted(pool: Any) -> bool:
    """Whether every connection the pool may open is lent out."""
    stats = pool.get_stats()
    return bool(stats["pool_size"] >= pool.max_size and stats["pool_available"] == 0)


def _until(deadline: float | None, until: float, pool: Any) -> float:
    """How long to wait for a connection: up to connect_timeout (``until``);
    a lock's wait only until its own ``deadline`` when every one is busy
    (not when one is being opened, as on a first call). The pool's stats are
    read for a lock's wait only, not on every call."""
    end = until if deadline is None or not _exhausted(pool) else min(until, deadline)
    return max(0.001, end - time.monotonic())


def _subscriber_kwargs(config: Config) -> dict[str, Any]:
    kwargs = _pool_kwargs(config)["kwargs"]
    return dict(kwargs)


def _messages(
    sql: _Sql,
    handle: _Subscriber,
    decoded: list[tuple[str, bytes | int]],
    bodies: dict[int, bytes],
) -> list[tuple[str, Raw]]:
    """The messages of ``decoded``, a big one's body fetched; a body gone
    (read more than 10 minutes late) breaks the subscription, which then
    resubscribes and calls ``on_connect`` to catch up."""
    out: list[tuple[str, Raw]] = []
    for ident, data in decoded:
        if isinstance(data, int):
            if data not in bodies:
                raise sql.unavailable(
                    StateError(f"message {data} was gone before it was read"), "a subscriber: "
                )
            data = bytes(bodies[data])
        out.append((handle.idents[ident], data))
    return out


class PostgresEngine(_Engine):
    """Sync client on a psycopg connection pool."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._pool_: ConnectionPool[Any] | None = None

    def _forget(self) -> None:
        _INHERITED.append(self._pool_)
        self._pool_ = None
        self._lock = threading.Lock()

    def _configure(self, conn: Any) -> None:
        conn.reply_timeout = self._reply_timeout
        conn.execute(*self._settings)

    def _pool(self) -> ConnectionPool[Any]:
        pool = self._pool_
        if pool is None:
            with self._lock:
                if self._pool_ is None:
                    made: ConnectionPool[Any] = ConnectionPool(
                        connection_class=_Connection,
                        configure=self._configure,
                        **_pool_kwargs(self.config),
                    )
                    made.open(wait=False)
                    self._pool_ = made
                pool = self._pool_
        return pool

    def _getconn(self, deadline: float | None = None) -> Any:
        """A live connection: within connect_timeout, or (a lock's wait,
        ``deadline``) within the lock's own timeout when all are busy."""
        pool = self._pool()
        until = time.monotonic() + self.config.connect_timeout
        while True:
            wait = _until(deadline, until, pool)
            try:
                conn = pool.getconn(min(wait, _ASK_AGAIN))
            except PoolTimeout as exc:
                if wait > _ASK_AGAIN:
                    continue
                raise self._no_connection(exc, pool, deadline, until) from exc
            except PoolClosed as exc:
                raise self.sql.unavailable(exc, "closed: ") from exc
            if not _idle_but_readable(conn):
                return conn
            # Dropped at once (the pool's own check would back off for
            # seconds between stale connections, after a restart).
            self._putconn(conn, broken=True)

    def _putconn(self, conn: Any, broken: bool = False) -> None:
        """Give ``conn`` back; ``broken``: in an unknown state (a call cut
        short, a lock maybe held), so it is closed, which frees its locks."""
        pool = self._pool_
        if pool is None or conn._pool is not pool:  # forked, or closed meanwhile
            return
        if broken:
            conn.close()
        pool.putconn(conn)

    def _setup(self, conn: Any) -> None:
        conn.execute(self.sql.setup)

    def _execute(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        # No parameters: the simple protocol, which takes several statements.
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.pgresult.status == _ROWS else []

    def _attempts(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        """Run a statement, sending it again only where it surely did not run:
        the schema was missing (made, then once more), or PostgreSQL rolled
        it back to end a deadlock."""
        made = False
        for attempt in range(_ATTEMPTS):
            try:
                return self._execute(conn, sql, params)
            except _MISSING_SCHEMA:
                if made:
                    raise
                if conn.pgconn.transaction_status != _IDLE:
                    conn.rollback()  # a statement of several began a transaction
                self._setup(conn)
                made = True
            except pgerrors.TransactionRollback:
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, op: _Op[T]) -> T:
        conn = self._getconn()
        try:
            rows = self._attempts(conn, op.sql, op.params)
        except psycopg.Error as exc:
            self._putconn(conn, broken=isinstance(exc, psycopg.OperationalError))
            raise self.sql.failure(exc, op) from exc
        except BaseException:
            self._putconn(conn, broken=True)
            raise
        try:
            if self._sweep_due():
                # After the call's own work, which no failure here may undo.
                with contextlib.suppress(psycopg.Error):
                    conn.execute(self.sql.sweep)
        finally:
            self._putconn(conn, broken=conn.pgconn.transaction_status != _IDLE)
        return op.parse(rows)

    def get(self, key: str) -> Raw | None:
        return self._run(self.sql.get(key))

    def get_versioned(self, key: str) -> tuple[Raw | None, int | None]:
        return self._run(self.sql.get_versioned(key))

    def get_many(self, keys: list[str]) -> dict[str, Raw]:
        return self._run(self.sql.get_many(keys)) if keys else {}

    def set(self, key: str, raw: Raw, ttl: float | None) -> None:
        self._run(self.sql.set(key, raw, ttl))

    def set_many(self, items: dict[str, Raw], ttl: float | None) -> None:
        if items:
            self._run(self.sql.set_many(items, ttl))

    def set_if_version(self, key: str, raw: Raw, version: int | None, ttl: float | None) -> bool:
        return self._run(self.sql.set_if_version(key, raw, version, ttl))

    def add(self, key: str, raw: Raw, ttl: float | None) -> bool:
        return self._run(self.sql.add(key, raw, ttl))

    def delete(self, key: str) -> bool:
        return self._run(self.sql.delete(key))

    def delete_many(self, keys: list[str]) -> int:
        return self._run(self.sql.delete_many(keys)) if keys else 0

    def incr(self, key: str, amount: int, ttl: float | None) -> int:
        return self._run(self.sql.incr(key, amount, ttl))

    def setdefault(self, key: str, raw: Raw) -> Raw:
        return self._run(self.sql.setdefault(key, raw))

    def expire(self, key: str, ttl: float | None) -> bool:
        return self._run(self.sql.expire(key, ttl))

    def ttl(self, key: str) -> float | None:
        return self._run(self.sql.ttl(key))

    def keys(self, prefix: str) -> list[str]:
        return self._run(self.sql.keys(prefix))

    def clear(self, prefix: str) -> int:
        return self._run(self.sql.clear(prefix))

    def secret(self, name: str, nbytes: int) -> str:
        return self._run(self.sql.secret(name, nbytes))

    def rotate_secret(self, name: str, nbytes: int) -> str:
        return self._run(self.sql.rotate_secret(name, nbytes))

    def publish(self, channel: str, raw: Raw) -> int:
        return self._run(self.sql.publish(channel, raw))

    def info(self) -> dict[str, Any]:
        return self._run(self.sql.info())

    # locks and mutate ------------------------------------------------------------------

    def lock_acquire(self, name: str, timeout: float | None) -> _Held | None:
        deadline = _deadline(timeout)
        key = self.sql.lock_key(name)
        try:
            conn = self._getconn(deadline)
        except LockTimeout:
            return None
        try:
            while True:
                rows = self._attempts(conn, self.sql.take, (key, self._slice_ms(deadline)))
                if rows[0][0]:
                    return _Held(conn, key)
                if deadline is not None and time.monotonic() >= deadline:
                    self._putconn(conn)
                    return None
        except psycopg.Error as exc:
            # The lock may have been granted as the call failed: only closing
            # the connection surely frees it.
            self._putconn(conn, broken=True)
            raise self.sql.failure(exc, _named("lock", name)) from exc
        except BaseException:
            self._putconn(conn, broken=True)
            raise

    def lock_release(self, handle: _Held, name: str) -> None:
        released = False
        try:
            released = self._execute(handle.conn, self.sql.unlock, (handle.key,))[0][0]
        except psycopg.Error as exc:
            raise self.sql.lost(name, exc) from exc
        finally:
            self._putconn(handle.conn, broken=not released)
        if not released:  # pragma: no cover - the connection held it
            raise StateError(f"lock {name!r} was not held at its release")

    def mutate_begin(self, key: str, timeout: float | None) -> tuple[_Held, Raw | None]:
        deadline = _deadline(timeout)
        lock_key = self.sql.mutate_key(key)
        conn = self._getconn(deadline)
        try:
            rows = self._mutate_begin(conn, lock_key, key, deadline)
            while True:
                ok, raw = self.sql.mutate_begun(rows)
                if ok:
                    return _Held(conn, lock_key), raw
                if deadline is not None and time.monotonic() >= deadline:
                    self._end(conn)
                    raise LockTimeout(f"mutate({key!r}): another mutation held it for {timeout}s")
                rows = self._mutate_take(conn, lock_key, key, deadline)
        except psycopg.Error as exc:
            self._putconn(conn, broken=True)
            raise self.sql.failure(exc, _named("mutate", key)) from exc
        except LockTimeout:
            raise
        except BaseException:
            self._putconn(conn, broken=True)
            raise

    def _mutate_begin(
        self, conn: Any, lock_key: int, key: str, deadline: float | None
    ) -> list[Row]:
        """BEGIN and the first try for the lock, in one round trip."""
        for made in (False, True):
            try:
                with conn.pipeline():
                    try:
                        conn.execute("BEGIN")
                        return self._mutate_take(conn, lock_key, key, deadline)
                    except psycopg.OperationalError:
                        conn.close()  # the pipeline's exit would wait for it again
                        raise
            except _MISSING_SCHEMA:
                if made:
                    raise
                conn.rollback()
                self._setup(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _mutate_take(self, conn: Any, lock_key: int, key: str, deadline: float | None) -> list[Row]:
        params = (lock_key, key, self._slice_ms(deadline))
        return list(conn.execute(self.sql.begin_mutate, params).fetchall())

    def _end(self, conn: Any) -> None:
        """Roll back what ``conn`` has begun, and give it back."""
        try:
            conn.rollback()
        except BaseException:
            self._putconn(conn, broken=True)
            raise
        self._putconn(conn)

    def mutate_end(self, handle: _Held, key: str, raw: Raw | None, commit: bool) -> None:
        conn = handle.conn
        try:
            if not commit or raw is None:
                conn.rollback()
            else:
                with conn.pipeline():
                    try:
                        conn.execute(self.sql.commit_mutate, self.sql.commit_params(key, raw))
                        conn.execute("COMMIT")
                    except psycopg.OperationalError:
                        conn.close()
                        raise
        except psycopg.Error as exc:
            self._putconn(conn, broken=True)
            raise self.sql.failure(exc, _named("mutate", key)) from exc
        except BaseException:
            self._putconn(conn, broken=True)
            raise
        self._putconn(conn)

    # pub/sub --------------------------------------------------------------------------

    def subscribe(self, channels: list[str]) -> _Subscriber:
        idents = _subscriber_channels(self.sql, channels)
        try:
            conn = _Connection.connect(str(self.config.address), **_subscriber_kwargs(self.config))
        except psycopg.Error as exc:
            raise self.sql.unavailable(exc) from exc
        conn.reply_timeout = self._reply_timeout
        try:
            self._attempts(conn, _listen(self.sql, idents), ())
        except BaseException as exc:
            conn.close()
            if isinstance(exc, psycopg.Error):
                raise self.sql.unavailable(exc) from exc
            raise
        return _Subscriber(conn, idents)

    def receive(self, handle: _Subscriber, timeout: float) -> list[tuple[str, Raw]]:
        conn = handle.conn
        try:
            got = list(conn.notifies(timeout=timeout, stop_after=1))
            if got:
                got += conn.notifies(timeout=0)
            decoded = [(n.channel, _decode(n.payload)) for n in got if n.channel in handle.idents]
            big = [d for _, d in decoded if isinstance(d, int)]
            bodies: dict[int, bytes] = (
                dict(self._execute(conn, self.sql.messages, (big,))) if big else {}
            )
        except psycopg.Error as exc:
            raise self.sql.unavailable(exc) from exc
        return _messages(self.sql, handle, decoded, bodies)

    def unsubscribe(self, handle: _Subscriber) -> None:
        try:
            if not handle.conn.closed:
                handle.conn.execute(self.sql.unsubscribe)
        except psycopg.Error:
            pass  # its row goes with the next sweep
        finally:
            handle.conn.close()

    def close(self) -> None:
        pool, self._pool_ = self._pool_, None
        if pool is not None:
            pool.close(timeout=self.config.connect_timeout)


async def _close_when_cancelled(pool: AsyncConnectionPool[Any]) -> None:
    """Wait until cancelled (``asyncio.run`` ending its loop), then close ``pool``.

    psycopg's pool tasks swallow a cancellation that comes while they connect,
    so a loop ended with a pool still open would wait for them for ever; the
    pool's own close stops them."""
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        with contextlib.suppress(Exception):
            await pool.close(timeout=_CLOSE_TIMEOUT)


class AsyncPostgresEngine(_Engine):
    """Async client on psycopg's async pool, one pool per event loop."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool[Any]] = {}
        self._guards: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}

    def _forget(self) -> None:
        _INHERITED.append((self._pools, self._guards))
        self._pools = {}
        self._guards = {}

    async def _configure(self, conn: Any) -> None:
        conn.reply_timeout = self._reply_timeout
        await conn.execute(*self._settings)

    async def _pool(self) -> AsyncConnectionPool[Any]:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            for ended in [other for other in self._pools if other.is_closed()]:
                del self._pools[ended]  # their connections go with them
            pool = AsyncConnectionPool(
                connection_class=_AsyncConnection,
                configure=self._configure,
                **_pool_kwargs(self.config),
            )
            self._pools[loop] = pool
            await pool.open(wait=False)
            self._guards[loop] = loop.create_task(_close_when_cancelled(pool))
        return pool

    async def _getconn(self, deadline: float | None = None) -> Any:
        pool = await self._pool()
        until = time.monotonic() + self.config.connect_timeout
        while True:
            wait = _until(deadline, until, pool)
            try:
                conn = await pool.getconn(min(wait, _ASK_AGAIN))
            except PoolTimeout as exc:
                if wait > _ASK_AGAIN:
                    continue
                raise self._no_connection(exc, pool, deadline, until) from exc
            except PoolClosed as exc:
                raise self.sql.unavailable(exc, "closed: ") from exc
            if not _idle_but_readable(conn):
                return conn
            await self._putconn(conn, broken=True)

    async def _putconn(self, conn: Any, broken: bool = False) -> None:
        pool = conn._pool
        if pool is None or pool not in self._pools.values():
            return
        if broken:
            # At once, with no await: this runs on cancellation too.
            conn.pgconn.finish()
        await pool.putconn(conn)

    async def _setup(self, conn: Any) -> None:
        await conn.execute(self.sql.setup)

    @staticmethod
    async def _execute(conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        cur = await conn.execute(sql, params or None)
        return list(await cur.fetchall()) if cur.pgresult.status == _ROWS else []

    async def _attempts(self, conn: Any, sql: str, params: Sequence[Any]) -> list[Row]:
        made = False
        for attempt in range(_ATTEMPTS):
            try:
                return await self._execute(conn, sql, params)
            except _MISSING_SCHEMA:
                if made:
                    raise
                if conn.pgconn.transaction_status != _IDLE:
                    await conn.rollback()
                await self._setup(conn)
                made = True
            except pgerrors.TransactionRollback:
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run(self, op: _Op[T]) -> T:
        conn = await self._getconn()
        try:
            rows = await self._attempts(conn, op.sql, op.params)
        except psycopg.Error as exc:
            await self._putconn(conn, broken=isinstance(exc, psycopg.OperationalError))
            raise self.sql.failure(exc, op) from exc
        except BaseException:
            await self._putconn(conn, broken=True)
            raise
        try:
            if self._sweep_due():
                with contextlib.suppress(psycopg.Error):
                    await conn.execute(self.sql.sweep)
        finally:
            await self._putconn(conn, broken=conn.pgconn.transaction_status != _IDLE)
        return op.parse(rows)

    async def get(self, key: str) -> Raw | None:
        return await self._run(self.sql.get(key))

    async def get_versioned(self, key: str) -> tuple[Raw | None, int | None]:
        return await self._run(self.sql.get_versioned(key))

    async def get_many(self, keys: list[str]) -> dict[str, Raw]:
        return await self._run(self.sql.get_many(keys)) if keys else {}

    async def set(self, key: str, raw: Raw, ttl: float | None) -> None:
        await self._run(self.sql.set(key, raw, ttl))

    async def set_many(self, items: dict[str, Raw], ttl: float | None) -> None:
        if items:
            await self._run(self.sql.set_many(items, ttl))

    async def set_if_version(
        self, key: str, raw: Raw, version: int | None, ttl: float | None
    ) -> bool:
        return await self._run(self.sql.set_if_version(key, raw, version, ttl))

    async def add(self, key: str, raw: Raw, ttl: float | None) -> bool:
        return await self._run(self.sql.add(key, raw, ttl))

    async def delete(self, key: str) -> bool:
        return await self._run(self.sql.delete(key))

    async def delete_many(self, keys: list[str]) -> int:
        return await self._run(self.sql.delete_many(keys)) if keys else 0

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        return await self._run(self.sql.incr(key, amount, ttl))

    async def setdefault(self, key: str, raw: Raw) -> Raw:
        return await self._run(self.sql.setdefault(key, raw))

    async def expire(self, key: str, ttl: float | None) -> bool:
        return await self._run(self.sql.expire(key, ttl))

    async def ttl(self, key: str) -> float | None:
        return await self._run(self.sql.ttl(key))

    async def keys(self, prefix: str) -> list[str]:
        return await self._run(self.sql.keys(prefix))

    async def clear(self, prefix: str) -> int:
        return await self._run(self.sql.clear(prefix))

    async def secret(self, name: str, nbytes: int) -> str:
        return await self._run(self.sql.secret(name, nbytes))

    async def rotate_secret(self, name: str, nbytes: int) -> str:
        return await self._run(self.sql.rotate_secret(name, nbytes))

    async def publish(self, channel: str, raw: Raw) -> int:
        return await self._run(self.sql.publish(channel, raw))

    async def info(self) -> dict[str, Any]:
        return await self._run(self.sql.info())

    # locks and mutate ------------------------------------------------------------------

    async def lock_acquire(self, name: str, timeout: float | None) -> _Held | None:
        deadline = _deadline(timeout)
        key = self.sql.lock_key(name)
        try:
            conn = await self._getconn(deadline)
        except LockTimeout:
            return None
        try:
            while True:
                params = (key, self._slice_ms(deadline))
                rows = await self._attempts(conn, self.sql.take, params)
                if rows[0][0]:
                    return _Held(conn, key)
                if deadline is not None and time.monotonic() >= deadline:
                    await self._putconn(conn)
                    return None
        except psycopg.Error as exc:
            await self._putconn(conn, broken=True)
            raise self.sql.failure(exc, _named("lock", name)) from exc
        except BaseException:
            await self._putconn(conn, broken=True)
            raise

    async def lock_release(self, handle: _Held, name: str) -> None:
        released = False
        try:
            released = (await self._execute(handle.conn, self.sql.unlock, (handle.key,)))[0][0]
        except psycopg.Error as exc:
            raise self.sql.lost(name, exc) from exc
        finally:
            await self._putconn(handle.conn, broken=not released)
        if not released:  # pragma: no cover - the connection held it
            raise StateError(f"lock {name!r} was not held at its release")

    async def mutate_begin(self, key: str, timeout: float | None) -> tuple[_Held, Raw | None]:
        deadline = _deadline(timeout)
        lock_key = self.sql.mutate_key(key)
        conn = await self._getconn(deadline)
        try:
            rows = await self._mutate_begin(conn, lock_key, key, deadline)
            while True:
                ok, raw = self.sql.mutate_begun(rows)
                if ok:
                    return _Held(conn, lock_key), raw
                if deadline is not None and time.monotonic() >= deadline:
                    await self._end(conn)
                    raise LockTimeout(f"mutate({key!r}): another mutation held it for {timeout}s")
                rows = await self._mutate_take(conn, lock_key, key, deadline)
        except psycopg.Error as exc:
            await self._putconn(conn, broken=True)
            raise self.sql.failure(exc, _named("mutate", key)) from exc
        except LockTimeout:
            raise
        except BaseException:
            await self._putconn(conn, broken=True)
            raise

    async def _mutate_begin(
        self, conn: Any, lock_key: int, key: str, deadline: float | None
    ) -> list[Row]:
        for made in (False, True):
            try:
                async with conn.pipeline():
                    try:
                        await conn.execute("BEGIN")
                        return await self._mutate_take(conn, lock_key, key, deadline)
                    except psycopg.OperationalError:
                        conn.pgconn.finish()
                        raise
            except _MISSING_SCHEMA:
                if made:
                    raise
                await conn.rollback()
                await self._setup(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _mutate_take(
        self, conn: Any, lock_key: int, key: str, deadline: float | None
    ) -> list[Row]:
        params = (lock_key, key, self._slice_ms(deadline))
        cur = await conn.execute(self.sql.begin_mutate, params)
        return list(await cur.fetchall())

    async def _end(self, conn: Any) -> None:
        try:
            await conn.rollback()
        except BaseException:
            await self._putconn(conn, broken=True)
            raise
        await self._putconn(conn)

    async def mutate_end(self, handle: _Held, key: str, raw: Raw | None, commit: bool) -> None:
        conn = handle.conn
        try:
            if not commit or raw is None:
                await conn.rollback()
            else:
                async with conn.pipeline():
                    try:
                        params = self.sql.commit_params(key, raw)
                        await conn.execute(self.sql.commit_mutate, params)
                        await conn.execute("COMMIT")
                    except psycopg.OperationalError:
                        conn.pgconn.finish()
                        raise
        except psycopg.Error as exc:
            await self._putconn(conn, broken=True)
            raise self.sql.failure(exc, _named("mutate", key)) from exc
        except BaseException:
            await self._putconn(conn, broken=True)
            raise
        await self._putconn(conn)

    # pub/sub --------------------------------------------------------------------------

    async def subscribe(self, channels: list[str]) -> _Subscriber:
        idents = _subscriber_channels(self.sql, channels)
        try:
            conn = await _AsyncConnection.connect(
                str(self.config.address), **_subscriber_kwargs(self.config)
            )
        except psycopg.Error as exc:
            raise self.sql.unavailable(exc) from exc
        conn.reply_timeout = self._reply_timeout
        try:
            await self._attempts(conn, _listen(self.sql, idents), ())
        except BaseException as exc:
            conn.pgconn.finish()
            if isinstance(exc, psycopg.Error):
                raise self.sql.unavailable(exc) from exc
            raise
        return _Subscriber(conn, idents)

    async def receive(self, handle: _Subscriber, timeout: float) -> list[tuple[str, Raw]]:
        conn = handle.conn
        try:
            got = [n async for n in conn.notifies(timeout=timeout, stop_after=1)]
            if got:
                got += [n async for n in conn.notifies(timeout=0)]
            decoded = [(n.channel, _decode(n.payload)) for n in got if n.channel in handle.idents]
            big = [d for _, d in decoded if isinstance(d, int)]
            bodies: dict[int, bytes] = (
                dict(await self._execute(conn, self.sql.messages, (big,))) if big else {}
            )
        except psycopg.Error as exc:
            raise self.sql.unavailable(exc) from exc
        return _messages(self.sql, handle, decoded, bodies)

    async def unsubscribe(self, handle: _Subscriber) -> None:
        try:
            if not handle.conn.closed:
                await handle.conn.execute(self.sql.unsubscribe)
        except psycopg.Error:
            pass
        finally:
            await handle.conn.close()

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        pool = self._pools.pop(loop, None)
        guard = self._guards.pop(loop, None)
        if pool is not None:
            await pool.close(timeout=self.config.connect_timeout)
        if guard is not None:
            guard.cancel()
