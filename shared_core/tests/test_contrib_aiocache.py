"""shared_core.contrib.aiocache: aiocache 0.12's interface on a real state, on
both engines, with real processes where atomicity matters."""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiocache import Cache, cached, caches  # type: ignore[import-untyped]
from aiocache.lock import (  # type: ignore[import-untyped]
    OptimisticLock,
    OptimisticLockError,
    RedLock,
)
from aiocache.serializers import (  # type: ignore[import-untyped]
    JsonSerializer,
    PickleSerializer,
    StringSerializer,
)

from shared_core import AsyncSharedState, StateUnavailable
from shared_core.contrib.aiocache import SharedStateCache

pytestmark = pytest.mark.anyio

SPAWN = multiprocessing.get_context("spawn")


@dataclass
class Point:
    x: int
    y: int


@pytest.fixture
async def shared_state(url: str) -> AsyncIterator[AsyncSharedState]:
    state = AsyncSharedState(url)
    yield state
    await state.aclose()


@pytest.fixture
def cache(shared_state: AsyncSharedState) -> SharedStateCache:
    return SharedStateCache(shared_state, namespace="test:")


# --- aiocache's interface ------------------------------------------------------------------


async def test_set_get_and_friends(cache: SharedStateCache, shared_state: AsyncSharedState) -> None:
    assert await cache.get("k") is None
    assert await cache.get("k", default=1) == 1
    assert await cache.set("k", {"a": [1, 2.5, None]}) is True
    assert await cache.get("k") == {"a": [1, 2.5, None]}
    assert await cache.exists("k") is True
    assert await cache.exists("missing") is False
    assert await cache.multi_set([("a", 1), ("b", "two")]) is True
    assert await cache.multi_get(["b", "missing", "a"]) == ["two", None, 1]
    assert await cache.multi_get([]) == []
    assert await cache.add("new", "v") is True
    with pytest.raises(ValueError, match="already exists"):
        await cache.add("new", "other")
    assert await cache.get("new") == "v"
    assert await cache.delete("new") == 1
    assert await cache.delete("new") == 0
    assert await shared_state.keys() == ["aiocache:test:a", "aiocache:test:b", "aiocache:test:k"]


async def test_values_take_the_states_codec(
    cache: SharedStateCache, engine: str, redis_socket: str, app: str
) -> None:
    for value in (None, True, 3, -2.5, "s", [1, [2]], {"k": {"n": None}}):
        await cache.set("k", value)
        got = await cache.get("k", default="missing")
        assert got == ("missing" if value is None else value)  # None reads as a miss
    if engine == "manager":
        for pickled_only in ((1, 2), {3}, b"raw", Point(1, 2)):
            await cache.set("k", pickled_only)
            assert await cache.get("k") == pickled_only
    else:
        with pytest.raises(TypeError, match="serializer=pickle"):
            await cache.set("k", (1, 2))
        with pytest.raises(TypeError):
            await cache.multi_set([("j", 1), ("k", Point(1, 2))])
        assert await cache.multi_get(["j"]) == [None]  # all or nothing
        pickled = SharedStateCache(url=f"redis+unix://{redis_socket}?app={app}&serializer=pickle")
        await pickled.set("k", Point(1, 2))
        assert await pickled.get("k") == Point(1, 2)
        await pickled.close()


async def test_aiocache_serializers_work_too(shared_state: AsyncSharedState, engine: str) -> None:
    json_cache = SharedStateCache(shared_state, serializer=JsonSerializer())
    await json_cache.set("j", {"a": [1]})
    assert await shared_state.get("aiocache:j") == '{"a": [1]}'
    assert await json_cache.get("j") == {"a": [1]}
    text = SharedStateCache(shared_state, serializer=StringSerializer())
    await text.set("s", 12)
    assert await text.get("s") == "12"
    if engine == "manager":  # bytes: Redis takes them only with ?serializer=pickle
        pickled = SharedStateCache(shared_state, serializer=PickleSerializer())
        await pickled.set("p", Point(3, 4))
        assert await pickled.get("p") == Point(3, 4)


async def test_ttls_and_expiry(cache: SharedStateCache, shared_state: AsyncSharedState) -> None:
    await cache.set("never", 1)
    await cache.set("zero", 1, ttl=0)
    await cache.set("short", 1, ttl=1)
    await cache.set("float", 1, ttl=0.5)
    await cache.multi_set([("m1", 1), ("m2", 2)], ttl=1)
    await cache.add("added", 1, ttl=1)
    assert await shared_state.ttl("aiocache:test:never") == math.inf
    assert await shared_state.ttl("aiocache:test:zero") == math.inf
    assert await cache.expire("never", 1) is True
    await cache.set("kept", 1, ttl=1)
    assert await cache.expire("kept", 0) is True  # 0: no expiry any more
    assert await cache.expire("missing", 1) is False
    await asyncio.sleep(1.3)
    assert await cache.multi_get(["never", "short", "float", "m1", "m2", "added"]) == [None] * 6
    assert await cache.get("kept") == 1
    assert await cache.get("zero") == 1


async def test_default_ttl(shared_state: AsyncSharedState) -> None:
    cache = SharedStateCache(shared_state, ttl=30)
    await cache.set("k", 1)
    assert 29 < await shared_state.ttl("aiocache:k") <= 30  # type: ignore[operator]


async def test_clear_removes_only_the_caches_keys(shared_state: AsyncSharedState) -> None:
    await shared_state.set("visits", 1)  # the app's own key
    one = SharedStateCache(shared_state, namespace="one:")
    two = SharedStateCache(shared_state, key_prefix="other:")
    await one.set("k", 1)
    await one.set("k", 2, namespace="alt:")
    await two.set("k", 3)
    assert await one.clear(namespace="alt:") is True
    assert await shared_state.keys() == ["aiocache:one:k", "other:k", "visits"]
    await one.clear()
    assert await shared_state.keys() == ["other:k", "visits"]
    with pytest.raises(ValueError, match="clear"):
        SharedStateCache(shared_state, key_prefix="")


async def test_increment(cache: SharedStateCache, shared_state: AsyncSharedState) -> None:
    assert await cache.increment("n", 2) == 2
    assert await cache.increment("n", -5) == -3
    await cache.set("s", 10, ttl=30)
    assert await cache.increment("s") == 11
    assert 29 < await shared_state.ttl("aiocache:test:s") <= 30  # type: ignore[operator]
    await cache.set("text", "spam")
    with pytest.raises(TypeError, match="not an integer"):
        await cache.increment("text")
    with pytest.raises(TypeError):
        await cache.increment("n", 1.5)


async def test_increment_of_a_text_serializers_int_stays_text(
    shared_state: AsyncSharedState,
) -> None:
    # timeout: 50 compare-and-set loops at once below, on one key of a loaded
    # machine (PostgreSQL: a statement each step); what counts is that none
    # is lost, not aiocache's default 5 s per call.
    cache = SharedStateCache(shared_state, serializer=JsonSerializer(), timeout=60)
    await cache.set("n", 41, ttl=30)
    assert await shared_state.get("aiocache:n") == "41"
    assert await cache.increment("n") == 42
    assert await shared_state.get("aiocache:n") == "42"  # as Redis keeps it
    assert await cache.get("n") == 42
    assert 28 < await shared_state.ttl("aiocache:n") <= 30  # type: ignore[operator]
    # A missing key is created as an int on the server and read back as text.
    assert await cache.increment("fresh", 3) == 3
    assert await cache.get("fresh") == 3
    results = await asyncio.gather(*(cache.increment("n") for _ in range(50)))
    assert sorted(results) == list(range(43, 93))  # compare-and-set loses nothing


async def test_optimistic_lock_detects_any_write(cache: SharedStateCache) -> None:
    await cache.set("k", "v")
    with pytest.raises(OptimisticLockError):
        async with OptimisticLock(cache, "k") as lock:
            await cache.set("k", "v")  # the same value, but a write
            await lock.cas("mine")
    assert await cache.get("k") == "v"
    async with OptimisticLock(cache, "k") as lock:
        await lock.cas("mine", ttl=30)
    assert await cache.get("k") == "mine"
    async with OptimisticLock(cache, "missing") as lock:  # aiocache: never a conflict
        await cache.set("missing", "theirs")
        await lock.cas("mine")
    assert await cache.get("missing") == "mine"


async def test_cas_token_is_the_version(cache: SharedStateCache) -> None:
    assert await cache._gets("aiocache-missing") is None
    await cache.set("k", 1)
    token = await cache._gets(cache.build_key("k"))
    assert isinstance(token, int)
    assert await cache.set("k", 2, _cas_token=token) is True
    assert await cache.set("k", 3, _cas_token=token) is False
    assert await cache.get("k") == 2


async def test_redlock_takes_and_releases_its_key(
    cache: SharedStateCache, shared_state: AsyncSharedState
) -> None:
    lock = RedLock(cache, "job", lease=20)
    async with lock:
        assert await cache.get("job-lock") == lock._value
        assert 19 < await shared_state.ttl("aiocache:test:job-lock") <= 20  # type: ignore[operator]
    assert await cache.exists("job-lock") is False
    # A release by a lock that no longer holds the key leaves it alone.
    await lock.__aenter__()
    await cache.set("job-lock", "someone else's")
    await lock.__aexit__(None, None, None)
    assert await cache.get("job-lock") == "someone else's"


async def test_redlock_waiters_wait_for_the_winner(cache: SharedStateCache) -> None:
    # aiocache's RedLock publishes its wake-up event after the winning _add
    # returns; a waiter whose failed add came back first (on Redis, replies come
    # on several connections) must not look before that: one computes, per key.
    async def fill(key: str, computed: list[str]) -> None:
        async with RedLock(cache, key, lease=5):
            if await cache.get(key) is None:
                computed.append(key)
                await asyncio.sleep(0.05)
                await cache.set(key, "value")

    computed: list[str] = []
    for round_ in range(10):
        key = f"stampede-{os.getpid()}-{round_}"
        await asyncio.gather(*(fill(key, computed) for _ in range(8)))
    assert computed == [f"stampede-{os.getpid()}-{r}" for r in range(10)]


async def test_raw_calls_the_states_data_operations(cache: SharedStateCache) -> None:
    await cache.set("k", 1)
    assert await cache.raw("keys", "aiocache:") == ["aiocache:test:k"]
    assert await cache.raw("get", "aiocache:test:k") == 1
    with pytest.raises(ValueError, match="raw"):
        await cache.raw("rotate_secret", "SECRET_KEY")


async def test_aiocache_makes_it_from_its_config(url: str) -> None:
    made = Cache(SharedStateCache, url=url, namespace="ns:")
    assert isinstance(made, SharedStateCache)
    await made.set("k", 1)
    caches.set_config(
        {"default": {"cache": "shared_core.contrib.aiocache.SharedStateCache", "url": url}}
    )
    try:
        configured = caches.get("default")
        assert await configured.get("k", namespace="ns:") == 1
        await configured.close()
    finally:
        caches.set_config({"default": {"cache": "aiocache.SimpleMemoryCache"}})
    await made.close()
    with pytest.raises(TypeError, match="not both"):
        SharedStateCache(AsyncSharedState(url), url=url)


async def test_the_cached_decorator(url: str) -> None:
    calls: list[int] = []

    @cached(cache=SharedStateCache, url=url, ttl=30, key="answer")
    async def answer() -> int:
        calls.append(1)
        return 42

    assert await answer() == 42
    assert await answer() == 42
    assert calls == [1]
    async with AsyncSharedState(url) as state:
        assert await state.get("aiocache:answer") == 42
    await answer.cache.close()


async def test_an_unavailable_state_raises(
    unreachable: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = SharedStateCache(url=unreachable, timeout=None)
    for call in (cache.get("k"), cache.set("k", 1), cache.increment("k"), cache.exists("k")):
        with pytest.raises(StateUnavailable):
            await call

    @cached(cache=SharedStateCache, url=unreachable, timeout=None, key="k")
    async def compute() -> int:
        return 7

    with caplog.at_level(logging.ERROR, logger="aiocache"):
        assert await compute() == 7  # the decorator logs and computes
    await compute.cache.close()
    await cache.close()
    assert "Couldn't retrieve" in caplog.text


# --- several processes ---------------------------------------------------------------------


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _increments(url: str, n: int, text: bool) -> list[int]:
    serializer = JsonSerializer() if text else None
    cache = SharedStateCache(url=url, serializer=serializer)
    try:
        return [await cache.increment("n") for _ in range(n)]
    finally:
        await cache.close()


def _increment_many(url: str, n: int, text: bool, out: Any) -> None:
    out.put(_run(_increments(url, n, text)))


async def _add_once(url: str, barrier: Any) -> bool:
    cache = SharedStateCache(url=url)
    try:
        await cache.exists("warm-up")  # connected before the race
        barrier.wait()
        try:
            return bool(await cache.add("only-one", os.getpid(), ttl=30))
        except ValueError:
            return False
    finally:
        await cache.close()


def _add_in_a_race(url: str, barrier: Any, out: Any) -> None:
    out.put(_run(_add_once(url, barrier)))


async def _read(url: str) -> Any:
    cache = SharedStateCache(url=url)
    try:
        value = await cache.get("from-parent")
        await cache.set("from-child", {"seen": value}, ttl=30)
        return value
    finally:
        await cache.close()


def _read_and_write(url: str, out: Any) -> None:
    out.put(_run(_read(url)))


def _start(target: Any, *args: Any) -> list[Any]:
    procs = [SPAWN.Process(target=target, args=args) for _ in range(8)]
    for p in procs:
        p.start()
    return procs


def _join(procs: list[Any]) -> None:
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


@pytest.mark.parametrize("text", [False, True], ids=["int", "json-text"])
async def test_increment_from_8_processes_is_exact(url: str, text: bool) -> None:
    if text:  # a value a text serializer wrote: incremented by compare-and-set
        seed = SharedStateCache(url=url, serializer=JsonSerializer())
        await seed.set("n", 0)
        assert await seed.state.get("aiocache:n") == "0"
        await seed.close()
    out = SPAWN.Queue()
    n = 60 if text else 300  # compare-and-set retries under contention
    procs = _start(_increment_many, url, n, text, out)
    seen = [v for _ in procs for v in await asyncio.to_thread(out.get, True, 120)]
    _join(procs)
    assert sorted(seen) == list(range(1, 8 * n + 1))


async def test_add_from_8_processes_has_one_winner(url: str) -> None:
    barrier, out = SPAWN.Barrier(8), SPAWN.Queue()
    procs = _start(_add_in_a_race, url, barrier, out)
    results = [await asyncio.to_thread(out.get, True, 60) for _ in procs]
    _join(procs)
    assert sorted(results) == [False] * 7 + [True]


async def test_a_value_set_in_one_process_is_a_hit_in_another(cache: SharedStateCache) -> None:
    await cache.state.set("aiocache:from-parent", [1, 2])
    out = SPAWN.Queue()
    child = SPAWN.Process(target=_read_and_write, args=(cache.state.url, out))
    child.start()
    assert await asyncio.to_thread(out.get, True, 60) == [1, 2]
    child.join(60)
    assert child.exitcode == 0
    assert await cache.state.get("aiocache:from-child") == {"seen": [1, 2]}
