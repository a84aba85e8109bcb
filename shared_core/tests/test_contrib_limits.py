"""shared_core.contrib.limits: limits' storage on both engines, sync and async,
alone and under flask-limiter and slowapi, from several processes at once.

limits' own test suite runs against it too: python shared_core/tests/peers/run.py limits.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerSecond
from limits.aio.strategies import STRATEGIES as ASYNC_STRATEGIES
from limits.errors import ConfigurationError, StorageError
from limits.storage import storage_from_string
from limits.strategies import STRATEGIES

from shared_core import AsyncSharedState, SharedState, StateUnavailable
from shared_core.contrib.limits import AsyncSharedStorage, SharedStorage
from shared_core.testing import wait_for

SPAWN = multiprocessing.get_context("spawn")
PROCESSES = 8
N = 25  # the limit; 5 N hits are made
NAMES = list(STRATEGIES)  # fixed-window, moving-window, sliding-window-counter


def storage_uri(url: str, api: str = "sync") -> str:
    """Our URI for the state at ``url``: ``shared+URL`` (``async+shared+URL``)."""
    return ("async+" if api == "async" else "") + "shared+" + url


def away_from_a_window_edge(item: RateLimitItem, margin: float = 30) -> None:
    """Wait, if need be, so that the next ``margin`` seconds are in one window of
    time (the sliding window counter keeps a counter per window of the epoch)."""
    left = item.get_expiry() - time.time() % item.get_expiry()
    if left < margin:
        time.sleep(left + 0.1)


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _join(procs: list[Any]) -> None:
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"{p} exited with {p.exitcode}"


def run_at_once(target: Any, args: tuple[Any, ...], counts: list[int]) -> list[Any]:
    """Start one spawned process per count, released together; what each put."""
    barrier = SPAWN.Barrier(len(counts))
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(*args, n, barrier, out)) for n in counts]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    _join(procs)
    return results


# --- each strategy allows exactly N of 5 N hits from 8 processes ---------------


def _hit_many(uri: str, strategy: str, api: str, n: int, barrier: Any, out: Any) -> None:
    import shared_core.contrib.limits  # noqa: F401 - registers the schemes

    item = RateLimitItemPerDay(N)
    storage: Any = storage_from_string(uri)
    if api == "sync":
        limiter = STRATEGIES[strategy](storage)
        limiter.hit(item, "warm-up")  # connect before the race
        barrier.wait()
        out.put(sum(limiter.hit(item, "k") for _ in range(n)))
        return

    async def main() -> int:
        limiter: Any = cast(Any, ASYNC_STRATEGIES[strategy])(storage)
        await limiter.hit(item, "warm-up")
        barrier.wait()  # a few ms at most: all are already there
        hits = await asyncio.gather(*(limiter.hit(item, "k") for _ in range(n)))
        await storage.state.aclose()
        return sum(hits)

    out.put(asyncio.run(main()))


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("strategy", NAMES)
def test_8_processes_get_exactly_n_of_5n_hits(url: str, strategy: str, api: str) -> None:
    item = RateLimitItemPerDay(N)
    away_from_a_window_edge(item)
    uri = storage_uri(url, api)
    allowed = run_at_once(_hit_many, (uri, strategy, api), shares(5 * N, PROCESSES))
    assert sum(allowed) == N, allowed
    storage = SharedStorage(storage_uri(url))
    key = item.key_for("k")
    if strategy == "fixed-window":
        assert storage.get(key) == 5 * N  # every hit counted, none lost
    elif strategy == "moving-window":
        assert storage.get_moving_window(key, N, item.get_expiry())[1] == N
    else:  # the refused hits took their increment back
        assert storage.get_sliding_window(key, item.get_expiry())[2] == N


# --- one process: behaviour, expiry, reset, options ------------------------------


@pytest.fixture(params=["sync", "async"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Limiter:
    """A limits strategy on our storage behind one sync shape, for both APIs."""

    def __init__(self, uri: str, strategy: str, **options: Any) -> None:
        self.storage: Any = cast(Any, storage_from_string)(uri, **options)
        self.is_async = isinstance(self.storage, AsyncSharedStorage)
        table: Any = ASYNC_STRATEGIES if self.is_async else STRATEGIES
        self.limiter = table[strategy](self.storage)
        self.loop = asyncio.new_event_loop()

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.limiter, method)(*args, **kwargs)
        return self.loop.run_until_complete(result) if self.is_async else result

    def storage_call(self, method: str, *args: Any) -> Any:
        result = getattr(self.storage, method)(*args)
        return self.loop.run_until_complete(result) if self.is_async else result

    def close(self) -> None:
        if self.is_async:
            self.loop.run_until_complete(self.storage.state.aclose())
        else:
            self.storage.state.close()
        self.loop.close()


@pytest.fixture
def make(url: str, api: str) -> Iterator[Any]:
    made: list[Limiter] = []

    def factory(strategy: str, **options: Any) -> Limiter:
        made.append(Limiter(storage_uri(url, api), strategy, **options))
        return made[-1]

    yield factory
    for limiter in made:
        limiter.close()


@pytest.mark.parametrize("strategy", NAMES)
def test_hits_test_and_stats(make: Any, strategy: str) -> None:
    item = RateLimitItemPerDay(3)
    away_from_a_window_edge(item)
    hit = make(strategy)
    assert hit("get_window_stats", item, "a").remaining == 3
    assert [hit("hit", item, "a") for _ in range(4)] == [True, True, True, False]
    assert not hit("test", item, "a")
    stats = hit("get_window_stats", item, "a")
    assert stats.remaining == 0
    assert time.time() < stats.reset_time <= time.time() + item.get_expiry() + 1
    assert hit("hit", item, "b")  # another identity, its own limit
    assert not hit("hit", item, "c", cost=4)  # a cost above the limit is refused
    assert hit("hit", item, "d", cost=3)


@pytest.mark.parametrize("strategy", NAMES)
def test_limits_and_their_keys_expire(make: Any, strategy: str, url: str) -> None:
    item = RateLimitItemPerSecond(2, 2)
    hit = make(strategy)
    assert hit.storage_call("check")  # connected (a server started) before the clock runs
    away_from_a_window_edge(item, margin=1.5)
    assert [hit("hit", item) for _ in range(3)] == [True, True, False]
    # The sliding window counter weighs the previous window: two windows free it.
    time.sleep(2 * item.get_expiry() + 0.1)
    assert hit("hit", item)
    state = SharedState(url)
    wait_for(lambda: state.keys("limits:") == [], 2 * item.get_expiry() + 5, "keys to expire")


@pytest.mark.parametrize("strategy", NAMES)
def test_clear_and_reset_touch_only_the_limits_keys(make: Any, strategy: str, url: str) -> None:
    state = SharedState(url)
    state.set("visits", 7)  # the app's own key, in the same state
    item = RateLimitItemPerDay(1)
    away_from_a_window_edge(item)
    hit = make(strategy)
    other = make(strategy, key_prefix="other")
    assert hit("hit", item, "a")
    assert hit("hit", item, "b")
    assert other("hit", item, "a")
    assert not hit("hit", item, "a")
    hit("clear", item, "a")
    assert hit("hit", item, "a")  # cleared
    assert not hit("hit", item, "b")  # untouched
    removed = hit.storage_call("reset")
    assert removed == 2  # a and b, one key each
    assert hit("hit", item, "b")
    assert not other("hit", item, "a")  # another prefix: not reset
    assert state.get("visits") == 7


def test_fixed_window_counter_and_expiry(make: Any) -> None:
    hit = make("fixed-window")
    key = RateLimitItemPerDay(5).key_for("x")
    assert hit.storage_call("get", key) == 0
    assert hit.storage_call("get_expiry", key) == pytest.approx(time.time(), abs=1)
    assert hit.storage_call("incr", key, 60, 3) == 3
    assert hit.storage_call("incr", key, 1, 2) == 5  # the first ttl stays
    assert hit.storage_call("get", key) == 5
    assert hit.storage_call("get_expiry", key) == pytest.approx(time.time() + 60, abs=1)
    assert hit.storage_call("check")


# --- round trips ---------------------------------------------------------------


class Recorder:
    """A state that notes the name of every call (one round trip each)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.state, name)
        if not callable(attr) or name in ("close", "aclose"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


ROUND_TRIPS = {
    # strategy: (an accepted hit, a refused hit, test, get_window_stats)
    "fixed-window": (["incr"], ["incr"], ["get"], ["get", "ttl"]),
    "moving-window": (["get_versioned", "set_if_version"], ["get_versioned"], ["get"], ["get"]),
    "sliding-window-counter": (["get_many", "incr"], ["get_many"], ["get_many"], ["get_many"]),
}


@pytest.mark.parametrize("strategy", NAMES)
def test_round_trips_per_operation(url: str, api: str, strategy: str) -> None:
    state = Recorder(SharedState(url) if api == "sync" else AsyncSharedState(url))
    hit = Limiter(storage_uri(url, api), strategy, state=state)
    item = RateLimitItemPerDay(1)
    away_from_a_window_edge(item)
    try:
        accepted, refused, test, stats = ROUND_TRIPS[strategy]
        assert hit("hit", item)
        assert state.take() == accepted
        assert not hit("hit", item)
        assert state.take() == refused
        assert not hit("test", item)
        assert state.take() == test
        assert hit("get_window_stats", item).remaining == 0
        assert state.take() == stats
    finally:
        hit.close()


# --- URIs, options, errors --------------------------------------------------------


def test_uris_select_the_state(isolated_state: Any, redis_server: Any, monkeypatch: Any) -> None:
    app = isolated_state.app
    assert SharedStorage("shared://").state.url == "local://default"
    assert SharedStorage(f"shared://{app}").state.url == f"local://{app}"
    monkeypatch.setenv("SHARED_STATE_URL", redis_server.url(app))
    assert SharedStorage(f"shared://{app}").state.url == redis_server.url(app)  # follows it
    explicit = storage_from_string(f"shared+local://{app}?linger=3&key_prefix=mine")
    assert isinstance(explicit, SharedStorage)
    assert explicit.state.url == f"local://{app}?linger=3"
    assert repr(explicit) == f"SharedStorage('local://{app}?linger=3', key_prefix='mine')"
    redis_storage = storage_from_string(f"shared+redis+unix://{redis_server.socket}?app={app}")
    assert isinstance(redis_storage, SharedStorage)
    assert redis_storage.state.url == f"redis+unix://{redis_server.socket}?app={app}"
    async_storage = storage_from_string(f"async+shared+redis://localhost:1/0?app={app}")
    assert isinstance(async_storage, AsyncSharedStorage)
    assert async_storage.state.url == f"redis://localhost:1/0?app={app}"


@pytest.mark.parametrize(
    "uri",
    ["shared://app/more", "shared://app?linger=3", "shared+ftp://x", "shared://?key_prefix="],
)
def test_bad_uris_are_refused(uri: str, isolated_state: Any) -> None:
    with pytest.raises(ConfigurationError):
        SharedStorage(uri)


def test_unknown_options_are_refused(isolated_state: Any) -> None:
    with pytest.raises(ConfigurationError, match="socket_timeout"):
        storage_from_string("shared://", socket_timeout=3)


def test_an_existing_state_can_be_given(url: str) -> None:
    state = SharedState(url)
    # As flask-limiter's storage_options={"state": state, "key_prefix": "rl"} pass them.
    storage = cast(Any, storage_from_string)("shared://", state=state, key_prefix="rl")
    assert isinstance(storage, SharedStorage)
    assert storage.state is state
    storage.incr("k", 60)
    assert state.keys() == ["rl:c:k"]


@pytest.mark.parametrize("wrap", [False, True])
def test_an_unreachable_state_raises_and_check_says_false(
    unreachable: str, api: str, wrap: bool
) -> None:
    hit = Limiter(storage_uri(unreachable, api), "fixed-window", wrap_exceptions=wrap)
    try:
        assert hit.storage_call("check") is False
        with pytest.raises(StorageError if wrap else StateUnavailable) as caught:
            hit("hit", RateLimitItemPerDay(1))
        if wrap:
            assert isinstance(caught.value, StorageError)
            assert isinstance(caught.value.storage_error, StateUnavailable)
    finally:
        hit.close()


# --- flask-limiter and slowapi across processes ----------------------------------

WORKERS = 4


def _flask_hits(uri: str, strategy: str, n: int, barrier: Any, out: Any) -> None:
    from flask import Flask
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    import shared_core.contrib.limits  # noqa: F401 - registers the schemes

    app = Flask(__name__)
    Limiter(
        get_remote_address, app=app, storage_uri=uri, strategy=strategy,
        default_limits=[f"{N} per day"],
    )  # fmt: skip

    @app.get("/")
    def home() -> str:
        return "ok"

    @app.get("/free")
    def free() -> str:
        return "ok"

    client = app.test_client()
    client.get("/free")  # connect before the race (/ and /free count apart)
    barrier.wait()
    out.put([client.get("/").status_code for _ in range(n)])


@pytest.mark.parametrize("strategy", NAMES)
def test_flask_limiter_in_4_processes_allows_exactly_n(url: str, strategy: str) -> None:
    away_from_a_window_edge(RateLimitItemPerDay(N))
    statuses = run_at_once(_flask_hits, (storage_uri(url), strategy), shares(5 * N, WORKERS))
    codes = [code for worker in statuses for code in worker]
    assert (codes.count(200), codes.count(429)) == (N, 4 * N), statuses


@pytest.mark.parametrize("setting", ["none", "swallow_errors", "in_memory_fallback_enabled"])
def test_flask_limiter_when_the_state_is_unavailable(unreachable: str, setting: str) -> None:
    from flask import Flask
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    from shared_core.flask import SharedStateExtension

    app = Flask(__name__)
    SharedStateExtension(app, url=unreachable, sessions=False)  # StateUnavailable -> 503
    options: dict[str, Any] = {} if setting == "none" else {setting: True}
    Limiter(
        get_remote_address, app=app, storage_uri=storage_uri(unreachable),
        default_limits=["2 per day"], **options,
    )  # fmt: skip
    app.get("/")(lambda: "ok")
    client = app.test_client()
    codes = [client.get("/").status_code for _ in range(3)]
    assert (
        codes
        == {
            "none": [503, 503, 503],  # the error propagates to the extension's handler
            "swallow_errors": [200, 200, 200],  # fail open
            "in_memory_fallback_enabled": [200, 200, 429],  # each worker counts alone
        }[setting]
    )


def _slowapi_hits(uri: str, strategy: str, n: int, barrier: Any, out: Any) -> None:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    import shared_core.contrib.limits  # noqa: F401 - registers the schemes

    limiter = Limiter(key_func=get_remote_address, storage_uri=uri, strategy=strategy)

    @limiter.limit(f"{N}/day")
    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @limiter.limit(f"{N}/day")
    async def free(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_route("/", home)
    app.add_route("/free", free)
    with TestClient(app) as client:
        client.get("/free")  # connect before the race
        barrier.wait()
        out.put([client.get("/").status_code for _ in range(n)])


@pytest.mark.parametrize("strategy", NAMES)
def test_slowapi_in_4_processes_allows_exactly_n(url: str, strategy: str) -> None:
    away_from_a_window_edge(RateLimitItemPerDay(N))
    statuses = run_at_once(_slowapi_hits, (storage_uri(url), strategy), shares(5 * N, WORKERS))
    codes = [code for worker in statuses for code in worker]
    assert (codes.count(200), codes.count(429)) == (N, 4 * N), statuses
