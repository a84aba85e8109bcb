"""Expiry, batch calls and compare-and-set: the contract on every engine and API."""

from __future__ import annotations

import math
import multiprocessing
import time
from typing import Any

import pytest

from shared_core import SharedState

SPAWN = multiprocessing.get_context("spawn")
SHORT = 0.3  # seconds: a ttl that runs out within a test


def test_set_with_ttl_expires_and_is_never_returned(state: Any) -> None:
    state.set("k", "v", ttl=SHORT)
    state.set("stay", 1)
    assert state.get("k") == "v"
    assert 0 < state.ttl("k") <= SHORT
    time.sleep(SHORT + 0.1)
    assert state.get("k") is None
    assert state.get("k", "gone") == "gone"
    assert state.ttl("k") is None
    assert state.keys() == ["stay"]
    assert state.get_many(["k", "stay"]) == {"stay": 1}
    assert state.get_versioned("k") == (None, None)
    assert state.delete("k") is False
    assert state.expire("k", 10) is False
    assert state.clear() == 1


def test_ttl_reports_missing_and_no_expiry(state: Any) -> None:
    assert state.ttl("missing") is None
    state.set("k", 1)
    assert state.ttl("k") == math.inf
    state.set("k", 1, ttl=100)
    assert 99 < state.ttl("k") <= 100


def test_set_without_ttl_removes_the_expiry(state: Any) -> None:
    state.set("k", 1, ttl=SHORT)
    state.set("k", 2)
    time.sleep(SHORT + 0.1)
    assert state.get("k") == 2
    assert state.ttl("k") == math.inf


def test_expire_sets_and_removes_an_expiry(state: Any) -> None:
    assert state.expire("missing", 5) is False
    state.set("k", 1)
    assert state.expire("k", SHORT) is True
    assert 0 < state.ttl("k") <= SHORT
    assert state.expire("k", None) is True
    assert state.ttl("k") == math.inf
    assert state.expire("k", SHORT) is True
    time.sleep(SHORT + 0.1)
    assert state.get("k") is None


def test_incr_ttl_is_a_fixed_window(state: Any) -> None:
    assert state.incr("hits", ttl=SHORT + 0.2) == 1
    first = state.ttl("hits")
    time.sleep(0.1)
    # Later increments keep the window's end: they do not extend it.
    assert state.incr("hits", ttl=100) == 2
    assert state.ttl("hits") <= first
    time.sleep(SHORT + 0.2)
    assert state.get("hits") is None
    assert state.incr("hits", ttl=100) == 1, "an expired counter starts again"
    assert 99 < state.ttl("hits") <= 100


def test_incr_without_ttl_keeps_an_existing_expiry(state: Any) -> None:
    state.set("n", 5, ttl=100)
    assert state.incr("n") == 6
    assert 99 < state.ttl("n") <= 100


def test_add_only_if_missing_or_expired(state: Any) -> None:
    assert state.add("k", "first", ttl=SHORT) is True
    assert state.add("k", "second") is False
    assert state.get("k") == "first"
    time.sleep(SHORT + 0.1)
    assert state.add("k", "third") is True
    assert state.get("k") == "third"
    assert state.ttl("k") == math.inf


def test_setdefault_on_an_expired_key_stores_the_new_value(state: Any) -> None:
    state.set("k", "old", ttl=SHORT)
    time.sleep(SHORT + 0.1)
    assert state.setdefault("k", "new") == "new"


def test_get_many_set_many_delete_many(state: Any) -> None:
    state.set_many({"a": 1, "b": [2], "c": {"x": "3"}})
    assert state.get_many(["a", "b", "c", "missing"]) == {"a": 1, "b": [2], "c": {"x": "3"}}
    assert state.get_many([]) == {}
    assert state.get_many(k for k in ("a",)) == {"a": 1}
    assert state.delete_many(["a", "b", "missing"]) == 2
    assert state.keys() == ["c"]
    assert state.delete_many([]) == 0


def test_set_many_with_ttl_and_a_key_expiring_within_a_batch(state: Any) -> None:
    state.set_many({"short": 1, "also_short": 2}, ttl=SHORT)
    state.set("long", 3, ttl=100)
    assert state.get_many(["short", "also_short", "long"]) == {
        "short": 1,
        "also_short": 2,
        "long": 3,
    }
    time.sleep(SHORT + 0.1)
    assert state.get_many(["short", "also_short", "long"]) == {"long": 3}
    assert state.delete_many(["short", "long"]) == 1


def test_versions_change_on_every_write(state: Any) -> None:
    assert state.get_versioned("k") == (None, None)
    assert state.get_versioned("k", "dflt") == ("dflt", None)
    state.set("k", 1)
    value, v1 = state.get_versioned("k")
    assert value == 1
    assert isinstance(v1, int)
    state.set("k", 1)  # the same value written again is still a write
    _, v2 = state.get_versioned("k")
    assert v2 != v1
    state.incr("k")
    _, v3 = state.get_versioned("k")
    assert v3 not in (v1, v2)
    state.delete("k")
    state.set("k", 1)
    _, v4 = state.get_versioned("k")
    assert v4 not in (v1, v2, v3), "a deleted and rewritten key has a new version"


def test_set_if_version(state: Any) -> None:
    assert state.set_if_version("k", "a", None) is True, "None: only if absent"
    assert state.set_if_version("k", "b", None) is False
    value, version = state.get_versioned("k")
    assert value == "a"
    assert state.set_if_version("k", "b", version, ttl=100) is True
    assert state.set_if_version("k", "c", version) is False, "a stale version loses"
    assert state.get("k") == "b"
    assert 99 < state.ttl("k") <= 100
    _, version = state.get_versioned("k")
    state.delete("k")
    assert state.set_if_version("k", "d", version) is False


def test_mutate_keeps_the_keys_ttl(state: Any) -> None:
    state.set("cfg", {"a": 1}, ttl=100)
    with state.mutate("cfg") as cfg:
        cfg["b"] = 2
    assert state.get("cfg") == {"a": 1, "b": 2}
    assert 99 < state.ttl("cfg") <= 100


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), -0.5])
def test_bad_ttl_values_are_refused(state: Any, ttl: float) -> None:
    state.set("k", "kept")
    for call in (
        lambda: state.set("k", "new", ttl=ttl),
        lambda: state.add("new", 1, ttl=ttl),
        lambda: state.incr("n", ttl=ttl),
        lambda: state.expire("k", ttl),
        lambda: state.set_many({"k": "new"}, ttl=ttl),
        lambda: state.set_if_version("k", "new", None, ttl=ttl),
    ):
        with pytest.raises(ValueError, match="ttl"):
            call()
    assert state.get("k") == "kept"
    assert state.ttl("k") == math.inf
    assert state.keys() == ["k"]


@pytest.mark.parametrize("ttl", ["10", True, [1], b"1"])
def test_non_numeric_ttl_is_a_type_error(state: Any, ttl: object) -> None:
    with pytest.raises(TypeError, match="ttl"):
        state.set("k", 1, ttl=ttl)
    with pytest.raises(TypeError, match="ttl"):
        state.expire("k", ttl)
    assert state.get("k") is None


@pytest.mark.parametrize("keys", ["abc", b"ab", 5, None, ["a", 1], [None], [b"a"]])
def test_batch_keys_must_be_an_iterable_of_str(state: Any, keys: object) -> None:
    state.set("a", 1)
    with pytest.raises(TypeError):
        state.get_many(keys)
    with pytest.raises(TypeError):
        state.delete_many(keys)
    assert state.get("a") == 1


@pytest.mark.parametrize("mapping", [["a", 1], "ab", {1: "x"}, {"a": 1, b"b": 2}, None])
def test_set_many_needs_a_mapping_of_str(state: Any, mapping: object) -> None:
    with pytest.raises(TypeError):
        state.set_many(mapping)
    assert state.keys() == []


def test_set_many_is_all_or_nothing_when_a_value_cannot_be_encoded(state: Any) -> None:
    with pytest.raises(TypeError):
        state.set_many({"a": 1, "b": lambda: 0})
    assert state.keys() == []


@pytest.mark.parametrize("version", ["1", 1.0, True, [1]])
def test_a_version_is_an_int_or_none(state: Any, version: object) -> None:
    state.set("k", "kept")
    with pytest.raises(TypeError, match="version"):
        state.set_if_version("k", "new", version)
    assert state.get("k") == "kept"


# Many processes at once ---------------------------------------------------


def _add_once(url: str, barrier: Any, out: Any) -> None:
    state = SharedState(url)
    barrier.wait()
    out.put(state.add("winner", 1, ttl=60))


@pytest.mark.stress
def test_add_from_8_processes_at_once_has_exactly_one_winner(url: str) -> None:
    barrier, out = SPAWN.Barrier(8), SPAWN.Queue()
    procs = [SPAWN.Process(target=_add_once, args=(url, barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(results) == [False] * 7 + [True]


def _cas_increment(url: str, n: int) -> None:
    state = SharedState(url)
    done = 0
    while done < n:
        value, version = state.get_versioned("count", 0)
        if state.set_if_version("count", value + 1, version):
            done += 1


@pytest.mark.stress
def test_set_if_version_from_8_processes_loses_no_update(url: str) -> None:
    procs = [SPAWN.Process(target=_cas_increment, args=(url, 100)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert SharedState(url).get("count") == 800
