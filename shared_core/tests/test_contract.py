"""Every operation of the public API, run once through each API (sync, async)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import ENGINES, engine_url
from shared_core import LockTimeout, SharedState, StateError


@dataclass
class Point:
    x: int
    y: int


# Each engine, then the two that have a near cache with it on every key: the
# contract is the same.
_VARIANTS = [(e, False) for e in ENGINES] + [("manager", True), ("redis", True)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames and "engine" not in _parametrized(metafunc):
        metafunc.parametrize(
            ("engine", "near"),
            _VARIANTS,
            ids=[e + ("-near" if near else "") for e, near in _VARIANTS],
        )


def _parametrized(metafunc: pytest.Metafunc) -> set[str]:
    return {
        name
        for mark in metafunc.definition.iter_markers("parametrize")
        for name in ([mark.args[0]] if isinstance(mark.args[0], str) else mark.args[0])
    }


@pytest.fixture
def url(engine: str, near: bool, app: str, request: pytest.FixtureRequest) -> str:
    if near:
        return engine_url(engine, app, request, near_cache="*")
    return engine_url(engine, app, request)


# What every engine round-trips as it is.
VALUES = [
    0,
    -7,
    2**62,
    2**80,
    3.5,
    "text",
    "",
    None,
    True,
    [1, [2, "3"]],
    {"a": {"b": [1, 2.5, None]}},
]
# What needs pickle: the manager engine's, or Redis and PostgreSQL with ?serializer=pickle.
PICKLED_ONLY = [b"\x00bytes", (1, "a"), {1, 2}, {1: "int key"}, Point(1, 2)]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_set_get_round_trips_the_value(state: Any, value: object) -> None:
    state.set("k", value)
    assert state.get("k") == value
    assert type(state.get("k")) is type(value)


@pytest.mark.parametrize("value", PICKLED_ONLY, ids=repr)
def test_values_beyond_json(state: Any, engine: str, value: object) -> None:
    if engine != "manager":
        # A shared Redis or database may hold bytes written by anyone: no
        # unpickling unless asked for, and no silent change of type either.
        with pytest.raises(TypeError, match="cannot store"):
            state.set("k", value)
        assert state.get("k") is None
    else:
        state.set("k", value)
        assert state.get("k") == value
        assert type(state.get("k")) is type(value)


@pytest.mark.parametrize("engine", ["redis", "postgres"])
@pytest.mark.parametrize("value", PICKLED_ONLY, ids=repr)
def test_pickles_by_opt_in(
    engine: str, app: str, request: pytest.FixtureRequest, value: object
) -> None:
    state = SharedState(engine_url(engine, app, request, serializer="pickle"))
    state.set("k", value)
    assert state.get("k") == value
    assert type(state.get("k")) is type(value)
    # A client that did not opt in refuses to unpickle it.
    with pytest.raises(StateError, match="serializer=pickle"):
        SharedState(engine_url(engine, app, request)).get("k")


def test_get_missing_returns_default(state: Any) -> None:
    assert state.get("missing") is None
    assert state.get("missing", 42) == 42


def test_stored_none_is_not_missing(state: Any) -> None:
    state.set("k", None)
    assert state.get("k", "default") is None
    assert state.keys() == ["k"]


def test_get_returns_a_copy(state: Any) -> None:
    state.set("cfg", {"a": [1]})
    copy = state.get("cfg")
    copy["a"].append(2)
    assert state.get("cfg") == {"a": [1]}


def test_delete(state: Any) -> None:
    state.set("k", 1)
    assert state.delete("k") is True
    assert state.delete("k") is False
    assert state.get("k") is None


def test_incr(state: Any) -> None:
    assert state.incr("n") == 1
    assert state.incr("n", 10) == 11
    assert state.incr("n", -12) == -1
    assert state.get("n") == -1


def test_incr_continues_from_a_set_int(state: Any) -> None:
    state.set("n", 41)
    assert state.incr("n") == 42


def test_incr_of_a_non_int_raises_and_changes_nothing(state: Any) -> None:
    state.set("s", "text")
    with pytest.raises(TypeError, match="not an int"):
        state.incr("s")
    assert state.get("s") == "text"


@pytest.mark.parametrize("amount", [1.5, "1", True, None])
def test_incr_amount_must_be_an_int(state: Any, amount: object) -> None:
    with pytest.raises(TypeError):
        state.incr("n", amount)
    assert state.get("n") is None


def test_setdefault(state: Any) -> None:
    assert state.setdefault("k", [1]) == [1]
    assert state.setdefault("k", [2]) == [1]
    assert state.get("k") == [1]


def test_keys_and_clear(state: Any) -> None:
    for key in ("b", "a", "x:1", "x:2"):
        state.set(key, 1)
    assert state.keys() == ["a", "b", "x:1", "x:2"]
    assert state.keys("x:") == ["x:1", "x:2"]
    assert state.clear("x:") == 2
    assert state.keys() == ["a", "b"]
    assert state.clear() == 2
    assert state.keys() == []


@pytest.mark.parametrize("key", [1, b"k", None, ("a",)])
def test_keys_must_be_str(state: Any, key: object) -> None:
    for call in (
        lambda: state.get(key),
        lambda: state.set(key, 1),
        lambda: state.incr(key),
        lambda: state.delete(key),
        lambda: state.setdefault(key, 1),
        lambda: state.secret(key),
    ):
        with pytest.raises(TypeError, match="keys are str"):
            call()
    assert state.keys() == []


def test_unpicklable_value_raises_type_error_and_changes_nothing(state: Any) -> None:
    state.set("k", 1)
    with pytest.raises(TypeError, match="cannot store"):
        state.set("k", threading.Lock())
    assert state.get("k") == 1


def test_secret_is_made_once_and_kept_apart_from_keys(state: Any) -> None:
    first = state.secret("SECRET_KEY")
    assert len(first) == 64
    assert int(first, 16) >= 0
    assert state.secret("SECRET_KEY") == first
    assert state.secret("OTHER") != first
    assert len(state.secret("SHORT", 16)) == 32
    assert state.keys() == []
    state.clear()
    assert state.secret("SECRET_KEY") == first


@pytest.mark.parametrize("nbytes", [0, 15, 1025, 32.0, "32"])
def test_secret_size_is_checked(state: Any, nbytes: object) -> None:
    with pytest.raises(ValueError, match="nbytes"):
        state.secret("S", nbytes)


def test_mutate_changes_nested_values(state: Any) -> None:
    with state.mutate("cfg", {"a": {}}) as cfg:
        cfg["a"]["b"] = 1
    assert state.get("cfg") == {"a": {"b": 1}}
    with state.mutate("cfg") as cfg:
        cfg["a"]["c"] = [1]
    assert state.get("cfg") == {"a": {"b": 1, "c": [1]}}


def test_mutate_writes_nothing_when_the_block_raises(state: Any) -> None:
    state.set("cfg", {"a": 1})
    with pytest.raises(KeyError), state.mutate("cfg", {}) as cfg:
        cfg["a"] = 2
        raise KeyError("boom")
    assert state.get("cfg") == {"a": 1}
    # The key is free again.
    with state.mutate("cfg", {}, timeout=1) as cfg:
        cfg["a"] = 3
    assert state.get("cfg") == {"a": 3}


def test_mutate_of_missing_key_without_change_stores_the_default(state: Any) -> None:
    with state.mutate("list", []) as items:
        items.append(1)
    assert state.get("list") == [1]


def test_lock_is_exclusive_and_times_out(state: Any, url: str) -> None:
    other = SharedState(url)
    try:
        with state.lock("L", timeout=1):
            with pytest.raises(LockTimeout), other.lock("L", timeout=0.2):
                pass
            with other.lock("M", timeout=0.2):
                pass
        with other.lock("L", timeout=1):
            pass
    finally:
        other.close()


def test_lock_is_released_when_the_block_raises(state: Any) -> None:
    with pytest.raises(ZeroDivisionError), state.lock("L"):
        1 / 0
    with state.lock("L", timeout=0):
        pass


def test_mutate_waits_for_a_concurrent_mutate(state: Any, url: str) -> None:
    other = SharedState(url)
    try:
        with (
            state.mutate("k", 0),
            pytest.raises(LockTimeout),
            other.mutate("k", 0, timeout=0.2),
        ):
            pass
    finally:
        other.close()


@pytest.mark.parametrize("timeout", [-1, "1", True])
def test_lock_timeout_is_checked(state: Any, timeout: object) -> None:
    with pytest.raises((TypeError, ValueError)), state.lock("L", timeout=timeout):
        pass


def test_info_reports_the_server(state: Any, engine: str) -> None:
    state.set("a", 1)
    info = state.info()
    assert info["engine"] == engine
    assert info["keys"] >= 1
    assert info["clients"] >= 1
    assert info["pid"] > 0
