"""shared_core.contrib.cachelib (and .flask_caching): cachelib's interface on a
real state, on both engines, with real processes where atomicity matters;
flask-caching and Flask-Session apps on it."""

from __future__ import annotations

import datetime as dt
import logging
import math
import multiprocessing
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import flask_caching
import flask_session  # type: ignore[import-untyped]
import pytest
from flask import Flask, session

from conftest import redis_url
from shared_core import SharedState, StateUnavailable
from shared_core.contrib import flask_caching as sc_flask_caching
from shared_core.contrib.cachelib import SharedStateCache, UnstorableValue
from shared_core.flask import SharedStateExtension

SPAWN = multiprocessing.get_context("spawn")


@dataclass
class Point:  # any picklable class: stored on the embedded engine
    x: int
    y: int


@pytest.fixture
def shared_state(url: str) -> Iterator[SharedState]:
    state = SharedState(url)
    yield state
    state.close()


@pytest.fixture
def cache(shared_state: SharedState) -> SharedStateCache:
    return SharedStateCache(shared_state, default_timeout=60)


# --- cachelib's interface ----------------------------------------------------------------

JSON_LIKE = [None, True, False, 0, -7, 2.5, "spam", [], {}, [1, "a", [2]], {"a": {"b": [None]}}]
PICKLED_ONLY = [(1, 2), {1, 2}, b"bytes", {1: "int key"}, Point(1, 2), dt.date(2024, 1, 2)]


@pytest.mark.parametrize("value", JSON_LIKE, ids=repr)
def test_set_get_json_like_values_on_every_engine(cache: SharedStateCache, value: Any) -> None:
    assert cache.set("k", value) is True
    got = cache.get("k")
    assert got == value
    assert type(got) is type(value)
    assert cache.has("k")


@pytest.mark.parametrize("value", PICKLED_ONLY, ids=repr)
def test_any_picklable_value_on_the_embedded_engine(
    cache: SharedStateCache, engine: str, value: Any
) -> None:
    if engine == "manager":
        assert cache.set("k", value)
        assert cache.get("k") == value
        return
    # Redis takes JSON-like values unless the URL opts in to pickle: refused
    # with an error that is both the state's TypeError and cachelib's PicklingError.
    for write in (
        lambda: cache.set("k", value),
        lambda: cache.add("k", value),
        lambda: cache.set_many({"j": 1, "k": value}),
    ):
        with pytest.raises(UnstorableValue) as caught:
            write()
        assert isinstance(caught.value, TypeError)
        assert isinstance(caught.value, pickle.PicklingError)
    assert cache.get_many("j", "k") == [None, None]  # nothing written, not even "j"


@pytest.mark.parametrize("value", PICKLED_ONLY, ids=repr)
def test_redis_with_serializer_pickle_takes_any_picklable_value(
    redis_socket: str, app: str, value: Any
) -> None:
    cache = SharedStateCache(url=redis_url(redis_socket, app, serializer="pickle"))
    assert cache.set("k", value)
    assert cache.get("k") == value
    cache.close()


def test_missing_and_deleted(cache: SharedStateCache) -> None:
    assert cache.get("nope") is None
    assert not cache.has("nope")
    assert cache.delete("nope") is False
    cache.set("k", 1)
    assert cache.delete("k") is True
    assert cache.get("k") is None


def test_add_only_when_missing(cache: SharedStateCache) -> None:
    assert cache.add("k", "first") is True
    assert cache.add("k", "second") is False
    assert cache.get("k") == "first"


def test_timeouts_follow_cachelib(cache: SharedStateCache) -> None:
    cache.set("default", 1)  # None: default_timeout (60)
    cache.set("never", 1, timeout=0)
    cache.set("seconds", 1, timeout=30)
    cache.set("delta", 1, timeout=dt.timedelta(seconds=20))
    cache.add("added", 1, timeout=10)
    cache.set_many({"m1": 1, "m2": 2}, timeout=40)
    assert 59 < cache.ttl("default") <= 60  # type: ignore[operator]
    assert cache.ttl("never") == math.inf
    assert 29 < cache.ttl("seconds") <= 30  # type: ignore[operator]
    assert 19 < cache.ttl("delta") <= 20  # type: ignore[operator]
    assert 9 < cache.ttl("added") <= 10  # type: ignore[operator]
    assert 39 < cache.ttl("m2") <= 40  # type: ignore[operator]
    cache.set("default", 2, timeout=0)  # a set without expiry removes the old one
    assert cache.ttl("default") == math.inf


def test_a_negative_timeout_is_expired_at_once(cache: SharedStateCache) -> None:
    cache.set("k", 1)
    assert cache.set("k", 2, timeout=-1) is True
    assert not cache.has("k")
    assert cache.add("k", 3, timeout=-1) is True  # it could have been added ...
    assert not cache.has("k")  # ... and expired at once
    cache.set("k", 4)
    assert cache.add("k", 5, timeout=-1) is False
    cache.set_many({"a": 1, "k": 2}, timeout=-5)
    assert cache.get_many("a", "k") == [None, None]


def test_a_float_timeout_is_deprecated_by_cachelib_and_rounded_up(cache: SharedStateCache) -> None:
    with pytest.warns(DeprecationWarning, match="Float timeouts"):
        cache.set("k", 1, timeout=1.5)  # type: ignore[arg-type]
    assert 1 < cache.ttl("k") <= 2  # type: ignore[operator]


def test_entries_expire(shared_state: SharedState) -> None:
    cache = SharedStateCache(shared_state, default_timeout=1)
    cache.set("default", "v")
    cache.set("short", "v", timeout=1)
    cache.set("kept", "v", timeout=0)
    cache.inc("counter")
    time.sleep(1.3)
    assert cache.get_many("default", "short", "counter") == [None, None, None]
    assert not cache.has("short")
    assert cache.get("kept") == "v"


def test_get_many_set_many_delete_many_get_dict(cache: SharedStateCache) -> None:
    assert cache.get_many() == []
    assert cache.set_many({}) == []
    assert cache.delete_many() == []
    assert cache.set_many({"a": 1, "b": [2], "c": "3"}) == ["a", "b", "c"]
    assert cache.get_many("c", "missing", "a") == ["3", None, 1]
    assert cache.get_dict("a", "b") == {"a": 1, "b": [2]}
    assert cache.delete_many("a", "missing") == ["a", "missing"]  # a missing key counts
    assert cache.get_many("a", "b") == [None, [2]]


def test_strict_delete_many_has_nothing_to_complain_about(shared_state: SharedState) -> None:
    cache = SharedStateCache(shared_state, ignore_delete_many_errors=False)
    cache.set("a", 1)
    assert cache.delete_many("a", "b") == ["a", "b"]


def test_inc_and_dec_are_counters_on_the_server(cache: SharedStateCache) -> None:
    assert cache.inc("n") == 1
    assert cache.inc("n", 10) == 11
    assert cache.dec("n", 3) == 8
    assert cache.dec("m") == -1
    assert cache.get("n") == 8
    assert 59 < cache.ttl("n") <= 60  # type: ignore[operator]  # created with the default
    cache.set("s", 5, timeout=0)
    assert cache.inc("s") == 6
    assert cache.ttl("s") == math.inf  # an existing key keeps its expiry
    cache.set("text", "x")
    with pytest.raises(TypeError):
        cache.inc("text")
    with pytest.raises(TypeError):
        cache.inc("n", 1.5)  # type: ignore[arg-type]


def test_counters_never_expire_with_default_timeout_0(shared_state: SharedState) -> None:
    cache = SharedStateCache(shared_state, default_timeout=0)
    cache.inc("n")
    assert cache.ttl("n") == math.inf


def test_keys_live_under_the_prefix_and_clear_touches_nothing_else(
    shared_state: SharedState,
) -> None:
    pages = SharedStateCache(shared_state)  # the default prefix
    users = SharedStateCache(shared_state, key_prefix="users:")
    shared_state.set("visits", 41)  # the app's own key
    pages.set("home", "<html>")
    users.set("42", {"name": "Ada"})
    assert shared_state.keys() == ["cachelib:home", "users:42", "visits"]
    assert pages.clear() is True
    assert shared_state.keys() == ["users:42", "visits"]
    assert users.get("42") == {"name": "Ada"}
    assert shared_state.get("visits") == 41


def test_a_callable_prefix_is_called_on_every_use(shared_state: SharedState) -> None:
    tenant = ["a:"]
    cache = SharedStateCache(shared_state, key_prefix=lambda: tenant[0])
    cache.set("k", 1)
    tenant[0] = "b:"
    assert cache.get("k") is None
    cache.set("k", 2)
    assert shared_state.get_many(["a:k", "b:k"]) == {"a:k": 1, "b:k": 2}
    cache.clear()
    assert shared_state.keys() == ["a:k"]
    tenant[0] = ""
    with pytest.raises(ValueError, match="non-empty"):
        cache.get("k")


def test_an_empty_prefix_is_refused(shared_state: SharedState) -> None:
    with pytest.raises(ValueError, match="clear"):
        SharedStateCache(shared_state, key_prefix="")


def test_keys_are_str(cache: SharedStateCache) -> None:
    with pytest.raises(TypeError, match="str"):
        cache.set(1, "v")  # type: ignore[arg-type]


def test_the_cache_makes_its_state_from_url_and_closes_it(url: str) -> None:
    cache = SharedStateCache(url=url, key_prefix="p:")
    cache.set("k", "v")
    assert SharedState(url).get("p:k") == "v"
    cache.close()
    assert cache.get("k") == "v"  # closing drops connections; a later call reconnects
    cache.close()
    with pytest.raises(TypeError, match="not both"):
        SharedStateCache(SharedState(url), url=url)
    with pytest.raises(TypeError, match="SharedState"):
        SharedStateCache(url)  # type: ignore[arg-type]


def test_an_unavailable_state_raises_and_is_never_a_miss(unreachable: str) -> None:
    cache = SharedStateCache(url=unreachable)
    for call in (
        lambda: cache.get("k"),
        lambda: cache.set("k", 1),
        lambda: cache.has("k"),
        lambda: cache.inc("k"),
        lambda: cache.get_many("a", "b"),
        lambda: cache.clear(),
    ):
        with pytest.raises(StateUnavailable):
            call()


# --- several processes ---------------------------------------------------------------------


def _inc_many(url: str, n: int, out: Any) -> None:
    cache = SharedStateCache(url=url)
    out.put([cache.inc("hits") for _ in range(n)])
    cache.close()


def _get_then_set(url: str, out: Any) -> None:
    cache = SharedStateCache(url=url)
    out.put(cache.get("from-parent"))
    cache.set("from-child", {"pid": "child"}, timeout=30)
    cache.close()


def test_inc_from_8_processes_is_exact(url: str) -> None:
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_inc_many, args=(url, 500, out)) for _ in range(8)]
    for p in procs:
        p.start()
    seen = [n for _ in procs for n in out.get(timeout=120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(seen) == list(range(1, 4001))
    assert SharedStateCache(url=url).get("hits") == 4000


def test_a_value_set_in_one_process_is_a_hit_in_another(url: str) -> None:
    cache = SharedStateCache(url=url)
    cache.set("from-parent", [1, 2, 3])
    out = SPAWN.Queue()
    child = SPAWN.Process(target=_get_then_set, args=(url, out))
    child.start()
    assert out.get(timeout=60) == [1, 2, 3]
    child.join(60)
    assert child.exitcode == 0
    assert cache.get("from-child") == {"pid": "child"}


# --- flask-caching -----------------------------------------------------------------------

CACHE_TYPE = "shared_core.contrib.flask_caching.SharedStateCache"


def caching_app(config: dict[str, Any], *, extension: bool) -> tuple[Flask, Any, list[str]]:
    """An app as in an app factory, with a cached view; the list records the renders."""
    app = Flask(__name__)
    app.config.update(config)
    if extension:
        SharedStateExtension(sessions=False).init_app(app)
    cache = flask_caching.Cache(app)
    renders: list[str] = []

    @app.get("/page")
    @cache.cached(timeout=30)
    def page() -> str:
        renders.append("page")
        return f"rendered {len(renders)}"

    @cache.memoize(timeout=30)
    def square(n: int) -> int:
        renders.append(f"square {n}")
        return n * n

    app.extensions["square"] = square
    return app, cache, renders


def test_flask_caching_uses_the_apps_state_and_caches_for_every_worker(url: str) -> None:
    config = {"SHARED_STATE_URL": url, "CACHE_TYPE": CACHE_TYPE, "CACHE_DEFAULT_TIMEOUT": 120}
    one, cache_one, renders_one = caching_app(config, extension=True)
    two, _, renders_two = caching_app(config, extension=True)  # another worker
    backend = cache_one.cache
    assert isinstance(backend, sc_flask_caching.SharedStateCache)
    assert backend.state is one.extensions["shared_core"]  # one state per app
    assert backend.key_prefix == "flask_cache_"  # CACHE_KEY_PREFIX's default
    assert backend.default_timeout == 120

    assert one.test_client().get("/page").text == "rendered 1"
    assert two.test_client().get("/page").text == "rendered 1"  # a hit in the other worker
    assert renders_two == []
    with one.app_context():
        assert one.extensions["square"](7) == 49
    with two.app_context():
        assert two.extensions["square"](7) == 49
    assert renders_one == ["page", "square 7"]
    assert renders_two == []

    state = SharedState(url)
    state.set("visits", 1)
    names = state.keys()
    assert len(names) == 4  # the page, the memoized call, its version, visits
    assert all(k.startswith("flask_cache_") for k in names if k != "visits")
    with one.app_context():
        cache_one.clear()
    assert state.keys() == ["visits"]


def test_flask_caching_without_the_extension_reads_the_same_settings(url: str) -> None:
    config = {
        "SHARED_STATE_URL": url,
        "CACHE_TYPE": CACHE_TYPE,
        "CACHE_KEY_PREFIX": "views:",
        "CACHE_OPTIONS": {"default_timeout": 5},
    }
    app, cache, _ = caching_app(config, extension=False)
    assert cache.cache.state.url == SharedState(url).url
    assert cache.cache.default_timeout == 5  # CACHE_OPTIONS win
    assert app.test_client().get("/page").text == "rendered 1"
    names = SharedState(url).keys()
    assert names
    assert all(k.startswith("views:") for k in names)


def test_flask_caching_takes_the_cachelib_class_too(url: str) -> None:
    # A CACHE_TYPE path with "cachelib" in it is called without the app:
    # the cache then comes from CACHE_OPTIONS alone.
    config = {
        "CACHE_TYPE": "shared_core.contrib.cachelib.SharedStateCache",
        "CACHE_OPTIONS": {"url": url, "key_prefix": "cl:"},
    }
    app, cache, renders = caching_app(config, extension=False)
    assert type(cache.cache) is SharedStateCache
    assert app.test_client().get("/page").text == "rendered 1"
    assert app.test_client().get("/page").text == "rendered 1"
    assert renders == ["page"]
    assert SharedState(url).keys() != []


def test_flask_caching_renders_while_the_state_is_unavailable(
    unreachable: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = {"SHARED_STATE_URL": unreachable, "CACHE_TYPE": CACHE_TYPE}
    app, _, renders = caching_app(config, extension=True)
    with caplog.at_level(logging.ERROR, logger="flask_caching"):
        assert app.test_client().get("/page").text == "rendered 1"
    assert renders == ["page"]
    assert "Exception possibly due to cache backend" in caplog.text


# --- Flask-Session -----------------------------------------------------------------------


def session_app(state: SharedState, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SESSION_TYPE="cachelib",
        SESSION_CACHELIB=SharedStateCache(state, key_prefix="sessions:"),
        **config,
    )
    flask_session.Session(app)

    @app.get("/visit")
    def visit() -> Any:
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"]}

    return app


def cookie_of(response: Any) -> str:
    header = response.headers["Set-Cookie"]
    assert header.startswith("session=")
    return str(header.split(";", 1)[0].removeprefix("session="))


def test_flask_session_sessions_are_seen_by_every_worker(url: str) -> None:
    one, two = session_app(SharedState(url)), session_app(SharedState(url))
    first = one.test_client().get("/visit")
    assert first.json == {"visits": 1}
    sid = cookie_of(first)
    client = two.test_client()
    client.set_cookie("session", sid)
    assert client.get("/visit").json == {"visits": 2}
    state = SharedState(url)
    assert state.keys() == [f"sessions:session:{sid}"]
    lifetime = one.permanent_session_lifetime.total_seconds()
    assert lifetime - 5 < state.ttl(f"sessions:session:{sid}") <= lifetime  # type: ignore[operator]


def test_flask_session_sessions_expire(url: str) -> None:
    app = session_app(SharedState(url), PERMANENT_SESSION_LIFETIME=dt.timedelta(seconds=1))
    client = app.test_client()
    assert client.get("/visit").json == {"visits": 1}
    assert client.get("/visit").json == {"visits": 2}
    time.sleep(1.3)
    assert client.get("/visit").json == {"visits": 1}


def test_flask_session_while_the_state_is_unavailable(unreachable: str) -> None:
    # Flask opens the session outside its error handlers: alone, a 500.
    app = session_app(SharedState(unreachable))
    client = app.test_client()
    client.set_cookie("session", "some-session-id")
    assert client.get("/visit").status_code == 500
    # With shared_core.flask's extension, a 503 (through its 500 handler).
    app = session_app(SharedState(unreachable))
    SharedStateExtension(url=unreachable, sessions=False).init_app(app)
    client = app.test_client()
    client.set_cookie("session", "some-session-id")
    reply = client.get("/visit")
    assert reply.status_code == 503, reply.data
    assert "unavailable" in reply.json["error"]  # type: ignore[index]


def test_a_500_handler_of_the_app_is_kept(unreachable: str) -> None:
    app = session_app(SharedState(unreachable))

    @app.errorhandler(500)
    def mine(error: Any) -> Any:
        return {"mine": True}, 500

    SharedStateExtension(url=unreachable, sessions=False).init_app(app)
    client = app.test_client()
    client.set_cookie("session", "some-session-id")
    assert client.get("/visit").json == {"mine": True}
