"""The near cache: reads of cached keys without a round trip, and never a
value older than the last acknowledged write."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import engine_url, join_or_kill, redis_url
from shared_core import AsyncSharedState, ConfigError, SharedState, StateUnavailable
from shared_core._near import NearCache
from shared_core.testing import RedisServer, StateServer

READERS = 8
WRITES = 150
KEYS = ["config:a", "config:b", "flags:x"]
# How late a read in another process may still return the value before an
# acknowledged write. Embedded: none (the server counts the write before it
# acknowledges it). Redis: its invalidation arrives after the acknowledgement
# (0.5 ms at most, then, on an idle machine); a loaded test machine may
# deschedule redis-server or the reader between the two, hence the margin.
LATE = {"manager": 0.0, "redis": 0.2}
NEAR_ENGINES = ["manager", "redis"]
HEARTBEAT_WAIT = 1.5  # seconds: past the Redis listener's first ping


def _reader(url: str, acked: Any, acked_at: Any, late: Any, reads: Any, stop: Any) -> None:
    state = SharedState(url)
    count = 0
    try:
        while not stop.is_set():
            for i, key in enumerate(KEYS):
                floor = acked[i]  # acknowledged before this read started
                started = time.time()
                value = state.get(key, 0)
                if value < floor:  # how long ago the first newer value was acknowledged
                    lag = started - acked_at[i * (WRITES + 1) + value + 1]
                    with late.get_lock():
                        late.value = max(late.value, lag)
                count += 1
            if count % 300 == 0:
                time.sleep(0.001)  # 8 of these on 2 cores: leave the others some
    finally:
        with reads.get_lock():
            reads.value += count
        state.close()


def _writer(url: str, index: int, acked: Any, acked_at: Any) -> None:
    state = SharedState(url)
    try:
        for n in range(1, WRITES + 1):
            state.set(KEYS[index], n)
            acked_at[index * (WRITES + 1) + n] = time.time()
            acked[index] = n  # after the write's acknowledgement
            if n % 50 == 0:
                time.sleep(0.01)  # readers fill their caches between bursts
    finally:
        state.close()


@pytest.fixture(params=NEAR_ENGINES)
def near_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.stress
def test_no_read_is_older_than_an_acknowledged_write(
    near_engine: str, app: str, request: pytest.FixtureRequest
) -> None:
    """8 reader processes with a near cache, 3 writer processes without one:
    a read that starts after a write was acknowledged returns an older value
    never (embedded) or only within the stated bound (Redis), and most reads
    are served from the cache."""
    url = engine_url(near_engine, app, request, near_cache="config:,flags:")
    SharedState(url).set("config:a", 0)  # the server runs before the readers map its table
    ctx = multiprocessing.get_context("spawn")
    acked = ctx.Array("q", len(KEYS), lock=False)
    acked_at = ctx.Array("d", len(KEYS) * (WRITES + 1), lock=False)
    late, reads, stop = ctx.Value("d", 0.0), ctx.Value("q", 0), ctx.Event()
    args = (url, acked, acked_at, late, reads, stop)
    readers = [ctx.Process(target=_reader, args=args) for _ in range(READERS)]
    for proc in readers:
        proc.start()
    plain = engine_url(near_engine, app, request)
    writers = [
        ctx.Process(target=_writer, args=(plain, i, acked, acked_at)) for i in range(len(KEYS))
    ]
    time.sleep(0.5)
    for proc in writers:
        proc.start()
    join_or_kill(writers, 60)
    stop.set()
    join_or_kill(readers, 30)
    assert all(proc.exitcode == 0 for proc in readers + writers)
    assert late.value <= LATE[near_engine], f"a read returned a value {late.value:.4f}s stale"
    with SharedState(url) as state:
        assert [state.get(k) for k in KEYS] == [WRITES] * len(KEYS)
    assert reads.value > 10 * WRITES * len(KEYS), reads.value  # mostly from the cache


def _near_of(state: SharedState | AsyncSharedState) -> NearCache:
    near_cache = state._engine.near
    assert near_cache is not None, "the URL asks for a near cache"
    return near_cache


def _warm(read: Any, near_cache: Any) -> None:
    """Read until a read hits: on Redis the listener starts with the first
    read and keeps nothing until it listens."""
    deadline = time.monotonic() + 10
    hits = near_cache.hits
    while near_cache.hits == hits:
        assert time.monotonic() < deadline, "no read was ever served from the cache"
        read()
        time.sleep(0.01)


@pytest.fixture
def near(near_engine: str, app: str, request: pytest.FixtureRequest) -> str:
    return engine_url(near_engine, app, request, near_cache="config:")


def test_a_cached_read_makes_no_round_trip(near: str) -> None:
    with SharedState(near) as state:
        state.set("config:flag", {"on": True})
        near_cache = _near_of(state)
        _warm(lambda: state.get("config:flag"), near_cache)
        hits = near_cache.hits
        for _ in range(100):
            assert state.get("config:flag") == {"on": True}
        assert near_cache.hits == hits + 100


@pytest.mark.parametrize(
    "value",
    [[1, 2], {"on": True, "rollout": 25}, {"nested": {"list": [1, 2]}}, [[1], {"a": [2]}]],
    ids=["flat-list", "flat-dict", "nested-dict", "nested-list"],
)
def test_a_cached_value_is_a_copy(near: str, value: Any) -> None:
    """A hit hands out a copy the caller may change, however deep, as a
    round trip does."""
    import copy

    with SharedState(near) as state:
        state.set("config:value", value)
        near_cache = _near_of(state)
        _warm(lambda: state.get("config:value"), near_cache)
        hits = near_cache.hits
        first = state.get("config:value")
        assert first == value
        kept = copy.deepcopy(first)
        if isinstance(first, list):
            first.append(3)
            if isinstance(first[0], list):
                first[0].append(9)
        else:
            first["new"] = 1
            if "nested" in first:
                first["nested"]["list"].append(3)
        assert state.get("config:value") == kept == value
        assert near_cache.hits == hits + 2


def test_own_writes_deletes_and_expiry_are_seen(near: str) -> None:
    with SharedState(near) as state:
        assert state.get("config:x") is None
        state.set("config:x", 1)
        assert state.get("config:x") == 1
        state.incr("config:x")
        assert state.get("config:x") == 2
        state.delete("config:x")
        assert state.get("config:x") is None
        state.set("config:x", 3, ttl=0.3)
        assert state.get("config:x") == 3
        time.sleep(0.4)
        assert state.get("config:x") is None  # expired locally, no write needed
        state.set("config:y", 4)
        assert state.get("config:y") == 4
        state.expire("config:y", 0.2)
        time.sleep(0.3)
        assert state.get("config:y") is None
        state.set("config:z", 5)
        assert state.get("config:z") == 5
        state.clear("config:")
        assert state.get("config:z") is None


class _Tag:
    """A hashable object that may change: a dict key the pickle codec keeps."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Tag) and other.name == self.name


def test_a_cached_dict_with_changeable_keys_is_copied_whole(
    app: str, request: pytest.FixtureRequest
) -> None:
    """Embedded (pickle; Redis's JSON has str keys only): a dict keyed by
    objects that may change is decoded anew for each read, not shallow-copied
    with shared keys."""
    with SharedState(engine_url("manager", app, request, near_cache="config:")) as state:
        state.set("config:tags", {_Tag("a"): 1})
        _warm(lambda: state.get("config:tags"), _near_of(state))
        first, second = state.get("config:tags"), state.get("config:tags")
        assert first == second == {_Tag("a"): 1}
        assert next(iter(first)) is not next(iter(second))


def test_the_redis_listener_works_past_1024_descriptors(
    app: str, request: pytest.FixtureRequest
) -> None:
    """A worker with many sockets open: the listener's socket is numbered
    above select()'s limit, and it still listens (no reconnect loop)."""
    url = engine_url("redis", app, request, near_cache="config:")
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with SharedState(url) as state, SharedState(engine_url("redis", app, request)) as writer:
            writer.set("config:flag", 1)
            near_cache = _near_of(state)
            _warm(lambda: state.get("config:flag"), near_cache)
            tracker = state._engine._tracker  # type: ignore[attr-defined]
            assert tracker._conn._sock.fileno() >= 1024
            time.sleep(HEARTBEAT_WAIT)  # a heartbeat goes out and is answered
            writer.set("config:flag", 2)
            deadline = time.monotonic() + 5
            while state.get("config:flag") != 2:
                assert time.monotonic() < deadline
            assert tracker.lost == 0
    finally:
        for fd in spare:
            os.close(fd)


def test_the_cache_is_bounded(near_engine: str, app: str, request: pytest.FixtureRequest) -> None:
    """At most near_cache_size values kept; a key read between the others'
    first reads stays kept (least recently read go first)."""
    url = engine_url(near_engine, app, request, near_cache="config:", near_cache_size=10)
    with SharedState(url) as state:
        state.set("config:hot", "hot")
        near_cache = _near_of(state)
        _warm(lambda: state.get("config:hot"), near_cache)
        for i in range(50):
            state.set(f"config:{i}", i)
            assert state.get(f"config:{i}") == i
            hits = near_cache.hits
            assert state.get("config:hot") == "hot"
            assert near_cache.hits == hits + 1, f"config:hot was dropped at key {i}"
        assert len(near_cache) == 10
        assert [state.get(f"config:{i}") for i in range(50)] == list(range(50))
        assert len(near_cache) == 10


def test_a_restarted_server_empties_every_cache(app: str, request: pytest.FixtureRequest) -> None:
    """SIGKILL the server: the next one starts empty (no persistence), and
    no process reads what it kept from the old one."""
    url = engine_url("manager", app, request, near_cache="config:")
    with SharedState(url) as state:
        state.set("config:flag", "old")
        assert state.get("config:flag") == "old"
        pid = state.info()["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        with SharedState(engine_url("manager", app, request)) as other:
            other.set("config:other", 1)  # starts the new server
        assert state.get("config:flag") is None


def test_while_no_server_runs_cached_reads_fail_as_every_call_does(runtime_dir: Path) -> None:
    """An explicit server killed: what a process kept is not served while no
    server runs (a read raises StateUnavailable, as a write does), and what it
    reads from the next server is that server's."""
    server = StateServer(runtime_dir, near_cache="config:", connect_timeout=0.5).start()
    try:
        with SharedState(server.url) as state:
            state.set("config:flag", "old")
            _warm(lambda: state.get("config:flag"), _near_of(state))
            server.kill()
            with pytest.raises(StateUnavailable):
                state.get("config:flag")
            with pytest.raises(StateUnavailable):
                state.get("config:flag")  # also when it tries again
            server.start()
            assert state.get("config:flag") is None
            state.set("config:flag", "new")
            _warm(lambda: state.get("config:flag"), _near_of(state))
            assert state.get("config:flag") == "new"
    finally:
        server.stop()


def test_the_async_client_reads_through_it_too(near: str) -> None:
    asyncio.run(_async_reads(near))


async def _async_reads(near: str) -> None:
    writer = SharedState(near)
    state = AsyncSharedState(near)
    try:
        writer.set("config:flag", 1)
        assert await state.get("config:flag") == 1
        near_cache = _near_of(state)
        deadline = time.monotonic() + 10
        while near_cache.hits == 0:
            assert time.monotonic() < deadline
            assert await state.get("config:flag") == 1
            await asyncio.sleep(0.01)
        hits = near_cache.hits
        assert await state.get("config:flag") == 1
        assert near_cache.hits == hits + 1
        writer.set("config:flag", 2)
        assert await state.get("config:flag") == 2
    finally:
        await state.aclose()
        writer.close()


def test_a_lost_listener_drops_what_it_kept(app: str, request: pytest.FixtureRequest) -> None:
    """Redis: the listener's connection killed, a write made meanwhile: the
    next read is a round trip; once listening again, reads hit again."""
    url = engine_url("redis", app, request, near_cache="config:")
    sock = request.getfixturevalue("redis_socket")
    with SharedState(url) as state, SharedState(engine_url("redis", app, request)) as writer:
        writer.set("config:flag", "old")
        near_cache = _near_of(state)
        _warm(lambda: state.get("config:flag"), near_cache)
        tracker = state._engine._tracker  # type: ignore[attr-defined]
        admin = redis.Redis(unix_socket_path=sock)
        try:
            assert admin.client_kill_filter(_id=tracker.client_id) == 1
        finally:
            admin.close()
        writer.set("config:flag", "new")  # nobody tells the killed listener
        assert state.get("config:flag") == "new"
        assert tracker.lost == 1
        _warm(lambda: state.get("config:flag"), near_cache)  # listening again
        writer.set("config:flag", "newer")
        deadline = time.monotonic() + 5
        while state.get("config:flag") != "newer":
            assert time.monotonic() < deadline


def test_a_restarted_redis_empties_every_cache(runtime_dir: Path, app: str) -> None:
    """Redis killed and started again (empty): no process reads what it kept."""
    server = RedisServer(runtime_dir).start()
    url = redis_url(str(server.socket), app, near_cache="config:", connect_timeout=1)
    try:
        with SharedState(url) as state:
            state.set("config:flag", "old")
            _warm(lambda: state.get("config:flag"), _near_of(state))
            server.kill()
            server.start()
            assert state.get("config:flag") is None
    finally:
        server.stop()


def test_the_code_asks_for_prefixes_the_engine_keeps(
    near_engine: str, app: str, request: pytest.FixtureRequest
) -> None:
    """``near_cache=`` given by the code (an app template) works as the URL's,
    and adds to it."""
    url = engine_url(near_engine, app, request, near_cache="flags:")
    with SharedState(url, near_cache=("config:",)) as state:
        assert state._config.near_cache == ("flags:", "config:")
        state.set("config:flag", 1)
        near_cache = _near_of(state)
        _warm(lambda: state.get("config:flag"), near_cache)
        state.set("config:flag", 2)
        assert state.get("config:flag") == 2


@pytest.mark.parametrize(
    "url",
    ["tcp://127.0.0.1:9", "postgresql://localhost/db", "local://x?near_cache_size=0"],
    ids=["tcp", "postgresql", "turned-off"],
)
def test_the_codes_prefixes_are_dropped_where_nothing_can_keep_them(url: str) -> None:
    """On tcp:// and PostgreSQL (clients maybe on other machines, no
    invalidation) the code's prefixes are read from the server, and a
    deployer's ``near_cache_size=0`` turns them off; the URL's own
    ``near_cache=`` is refused there instead, as it is the deployer's choice."""
    state = SharedState(url, near_cache=("count:",))
    assert state._config.near_cache == ()
    assert state._engine.near is None
    if "near_cache_size" not in url:
        with pytest.raises(ConfigError, match="near_cache needs"):
            SharedState(f"{url}?near_cache=count:")


def test_near_cache_takes_prefixes_not_a_string() -> None:
    with pytest.raises(TypeError, match="not one string"):
        SharedState("local://x", near_cache="count:")  # a str is an Iterable[str]
    with pytest.raises(TypeError, match="not one string"):
        AsyncSharedState("local://x", near_cache="count:")  # a str is an Iterable[str]
