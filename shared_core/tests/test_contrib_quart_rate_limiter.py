"""shared_core.contrib.quart_rate_limiter: quart-rate-limiter's limits on a real
state, shared by every worker, on both engines; no update lost across processes."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from quart import Quart
from quart_rate_limiter import RateLimiter, rate_limit

from shared_core import AsyncSharedState
from shared_core.contrib.quart_rate_limiter import SharedStateStore
from shared_core.quart import SharedStateExtension

pytestmark = pytest.mark.anyio

SPAWN = multiprocessing.get_context("spawn")
UTC = timezone.utc
PREFIX = "quart_rate_limiter:"


@pytest.fixture
async def shared_state(url: str) -> AsyncIterator[AsyncSharedState]:
    state = AsyncSharedState(url)
    yield state
    await state.aclose()


def limited_app(store: SharedStateStore, count: int, period: float, **config: Any) -> Quart:
    """A worker's app: one limited route."""
    app = Quart(__name__)
    app.config.update(config)
    if "SHARED_STATE_URL" in config:
        SharedStateExtension(sessions=False).init_app(app)  # its 503 handler

    @app.get("/")
    @rate_limit(count, timedelta(seconds=period))
    async def index() -> str:
        return "ok"

    RateLimiter(app, store=store)
    return app


async def tat_of(state: AsyncSharedState) -> datetime:
    keys = await state.keys(PREFIX)
    assert len(keys) == 1, keys
    micros = await state.get(keys[0])
    assert type(micros) is int
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


# --- the store ------------------------------------------------------------------------------


async def test_get_and_set_keep_exact_aware_times(shared_state: AsyncSharedState) -> None:
    store = SharedStateStore(shared_state)
    now = datetime.now(UTC)
    assert await store.get("k", now) is now  # missing: the default
    tat = now + timedelta(seconds=30, microseconds=7)
    await store.set("k", tat)
    got = await store.get("k", now)
    assert got == tat
    assert got.tzinfo is not None
    assert await shared_state.keys() == [f"{PREFIX}k"]
    # Kept until the TAT has passed, plus the margin: then it means nothing.
    assert 30 < await shared_state.ttl(f"{PREFIX}k") <= 31.01  # type: ignore[operator]


async def test_a_set_after_a_get_adds_its_step_to_what_another_worker_wrote(
    shared_state: AsyncSharedState,
) -> None:
    one, two = SharedStateStore(shared_state), SharedStateStore(url=shared_state.url)
    now = datetime.now(UTC)
    step = timedelta(seconds=2)
    try:
        # Both workers read the same TAT (none yet: now), then both advance it.
        for store in (one, two):
            await store.get("k", now)
        await one.set("k", now + step)
        await two.set("k", now + step)  # a plain set would write the same TAT again
        assert await one.get("k", now) == now + 2 * step
    finally:
        await two.after_serving()


async def test_a_set_without_a_get_writes_as_is(shared_state: AsyncSharedState) -> None:
    store = SharedStateStore(shared_state)
    tat = datetime.now(UTC) + timedelta(seconds=5)
    await store.set("k", tat)
    await store.set("k", tat)
    assert await store.get("k", datetime.now(UTC)) == tat


async def test_tats_expire_once_passed(shared_state: AsyncSharedState) -> None:
    store = SharedStateStore(shared_state, expiry_margin=0.2)
    now = datetime.now(UTC)
    await store.get("k", now)
    await store.set("k", now + timedelta(seconds=0.5))
    await asyncio.sleep(0.9)
    assert await shared_state.keys() == []


async def test_the_store_makes_its_state_and_closes_it(url: str) -> None:
    store = SharedStateStore(url=url)
    await store.before_serving()
    await store.set("k", datetime.now(UTC) + timedelta(seconds=9))
    await store.after_serving()
    with pytest.raises(TypeError, match="not both"):
        SharedStateStore(AsyncSharedState(url), url=url)
    with pytest.raises(ValueError, match="expiry_margin"):
        SharedStateStore(url=url, expiry_margin=0)


# --- the limiter, in apps --------------------------------------------------------------------


async def test_every_worker_enforces_one_limit(shared_state: AsyncSharedState) -> None:
    url = shared_state.url
    one = limited_app(SharedStateStore(shared_state), 2, 10)  # the app's state
    two = limited_app(SharedStateStore(url=url), 2, 10)  # another worker, a state of its own
    async with one.test_app() as a, two.test_app() as b:
        first = await a.test_client().get("/")
        assert first.status_code == 200
        assert first.headers["RateLimit-Remaining"] == "1"
        assert (await b.test_client().get("/")).status_code == 200
        refused = await a.test_client().get("/")
        assert refused.status_code == 429
        assert 4 <= int(refused.headers["Retry-After"]) <= 5
        assert (await b.test_client().get("/")).status_code == 429
    assert len(await shared_state.keys(PREFIX)) == 1


async def test_the_limiters_clock_decides_not_the_machines(
    shared_state: AsyncSharedState, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As quart-rate-limiter's own tests do: its "now" is frozen in 2019. The
    # TAT's expiry is reckoned from that "now", not from the machine's clock.
    import quart_rate_limiter

    frozen = datetime(2019, 3, 4, tzinfo=UTC)

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> FrozenDatetime:
            return cls.fromtimestamp(frozen.timestamp(), tz)

    monkeypatch.setattr(quart_rate_limiter, "datetime", FrozenDatetime)
    app = limited_app(SharedStateStore(shared_state), 1, 2)
    async with app.test_app() as running:
        client = running.test_client()
        first = await client.get("/")
        assert first.status_code == 200
        assert first.headers["RateLimit-Reset"] == "2"
        refused = await client.get("/")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "2"
    assert await tat_of(shared_state) == frozen + timedelta(seconds=2)
    assert 2 < await shared_state.ttl((await shared_state.keys())[0]) <= 3  # type: ignore[operator]


async def test_while_the_state_is_unavailable(
    unreachable: str, caplog: pytest.LogCaptureFixture
) -> None:
    strict = limited_app(SharedStateStore(url=unreachable), 1, 10, SHARED_STATE_URL=unreachable)
    async with strict.test_app() as app:
        response = await app.test_client().get("/")
        assert response.status_code == 503
        assert await response.get_json() == {"error": "the shared state is unavailable, try again"}
    lenient = limited_app(SharedStateStore(url=unreachable, fail_open=True), 1, 10)
    with caplog.at_level(logging.WARNING, logger="shared_core.contrib.quart_rate_limiter"):
        async with lenient.test_app() as app:
            for _ in range(2):  # over the limit, but nothing can be counted
                assert (await app.test_client().get("/")).status_code == 200
    assert "the state is unavailable" in caplog.text


# --- several processes -------------------------------------------------------------------------


async def _requests(url: str, n: int, count: int, period: float, barrier: Any) -> list[int]:
    app = limited_app(SharedStateStore(url=url), count, period)
    async with app.test_app() as running:
        client = running.test_client()
        await asyncio.to_thread(barrier.wait)
        return [(await client.get("/")).status_code for _ in range(n)]


def _worker(url: str, n: int, count: int, period: float, barrier: Any, out: Any) -> None:
    out.put(asyncio.run(_requests(url, n, count, period, barrier)))


async def _run_workers(url: str, n: int, count: int, period: float) -> list[int]:
    barrier, out = SPAWN.Barrier(8), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_worker, args=(url, n, count, period, barrier, out)) for _ in range(8)
    ]
    for p in procs:
        p.start()
    statuses = [s for _ in procs for s in await asyncio.to_thread(out.get, True, 120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return statuses


async def test_8_processes_lose_no_update(shared_state: AsyncSharedState) -> None:
    # 400 requests, each worth 1 s of a limit they never reach (2000 per 2000 s):
    # the TAT ends 400 s after the first request's "now", exactly, if no update
    # is lost (with a plain set, workers overwrite each other's steps).
    before = datetime.now(UTC)
    statuses = await _run_workers(shared_state.url, 50, 2_000, 2_000)
    after = datetime.now(UTC)
    assert statuses == [200] * 400
    first_now = await tat_of(shared_state) - timedelta(seconds=400)
    assert before <= first_now <= after


async def test_every_admitted_request_is_counted(shared_state: AsyncSharedState) -> None:
    # 5 per minute; 8 workers × 4 requests at once. The decision is made on a
    # read (quart-rate-limiter's store interface): requests in flight together
    # may all pass, but each one that passed moves the TAT on.
    started = time.monotonic()
    before = datetime.now(UTC)
    statuses = await _run_workers(shared_state.url, 4, 5, 60)
    after = datetime.now(UTC)
    admitted = statuses.count(200)
    assert 5 <= admitted <= 5 + 7, statuses  # at most one extra per other worker
    assert statuses.count(429) == 32 - admitted
    first_now = await tat_of(shared_state) - timedelta(seconds=12 * admitted)
    assert before <= first_now <= after
    assert time.monotonic() - started < 60  # the limit was not reset meanwhile
