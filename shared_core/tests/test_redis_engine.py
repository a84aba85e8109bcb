"""What only the Redis engine has: its layout, versions, scripts and errors."""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import redis_url
from shared_core import AsyncSharedState, SharedState, StateError
from shared_core._errors import CapacityError
from shared_core.testing import RedisServer


@pytest.fixture
def url(redis_socket: str, app: str) -> str:
    return redis_url(redis_socket, app, lock_lease=0.3)


@pytest.fixture
def direct(redis_socket: str) -> Iterator[redis.Redis]:
    """A plain redis-py client on the same server, to look at the layout."""
    client = redis.Redis(unix_socket_path=redis_socket)
    yield client
    client.close()


@pytest.fixture
def state(url: str) -> Iterator[SharedState]:
    with SharedState(url) as state:
        yield state


def test_a_value_is_a_hash_of_data_and_version_with_the_keys_expiry(
    state: SharedState, direct: redis.Redis, app: str
) -> None:
    state.set("n", 5, ttl=100)
    state.set("j", {"a": [1]})
    stored = direct.hgetall(f"shared_core:{app}:v:n")
    assert stored[b"d"] == b"5"
    _, version = state.get_versioned("n")
    assert stored[b"n"] == str(version).encode()
    assert 99_000 < direct.pttl(f"shared_core:{app}:v:n") <= 100_000
    assert direct.pttl(f"shared_core:{app}:v:j") == -1
    assert direct.hget(f"shared_core:{app}:v:j", "d") == b'j{"a":[1]}'
    # The engine hands ints back as ints, other values as the codec's bytes.
    engine: Any = state._engine
    assert engine.get("n") == 5
    assert engine.get_many(["n", "j", "x"]) == {"n": 5, "j": b'j{"a":[1]}'}


def test_the_counter_and_secrets_stay_out_of_keys_and_clear(
    state: SharedState, direct: redis.Redis, app: str
) -> None:
    state.set("a", 1)
    secret = state.secret("S")
    assert direct.exists(f"shared_core:{app}:version")
    assert direct.get(f"shared_core:{app}:s:S") == secret.encode()
    assert state.keys() == ["a"]
    assert state.clear() == 1
    assert direct.exists(f"shared_core:{app}:version")
    assert state.secret("S") == secret


def test_rotate_secret_replaces_it_for_everyone(url: str, state: SharedState) -> None:
    first = state.secret("S")
    rotated = state.rotate_secret("S", 16)
    assert rotated != first
    assert len(rotated) == 32
    assert SharedState(url).secret("S") == rotated


def test_a_lost_counter_starts_again_from_the_clock(
    state: SharedState, direct: redis.Redis, app: str
) -> None:
    state.set("k", 1)
    _, before = state.get_versioned("k")
    assert before is not None
    assert abs(before - time.time() * 1e6) < 60e6, "the first version is the clock in µs"
    for _ in range(5):
        state.set("k", 1)
    _, last = state.get_versioned("k")
    direct.delete(f"shared_core:{app}:version")
    state.set("other", 1)
    _, after = state.get_versioned("other")
    assert last is not None
    assert after is not None
    assert after > last


def test_expire_is_a_write_and_changes_the_version(state: SharedState) -> None:
    state.set("k", 1)
    _, version = state.get_versioned("k")
    assert state.expire("k", 100)
    assert state.set_if_version("k", 2, version) is False


def test_incr_of_an_int_beyond_64_bits_is_a_type_error_and_changes_nothing(
    state: SharedState,
) -> None:
    state.set("big", 2**80)
    before = state.get_versioned("big")
    with pytest.raises(TypeError, match=r"not an int \(64-bit in Redis\)"):
        state.incr("big")
    assert state.get_versioned("big") == before


def test_incr_overflow_and_huge_amounts_fail_and_change_nothing(state: SharedState) -> None:
    state.set("n", 2**63 - 1)
    before = state.get_versioned("n")
    with pytest.raises(StateError, match="64-bit"):
        state.incr("n")
    with pytest.raises(StateError, match="64-bit"):
        state.incr("fresh", 2**64)
    assert state.get_versioned("n") == before
    assert state.get("fresh") is None
    assert state.incr("n", -(2**63 - 1)) == 0


def test_incr_is_exact_over_the_whole_64_bits(state: SharedState) -> None:
    assert state.incr("n", 2**62 + 1) == 2**62 + 1
    assert state.incr("n", 2**62 - 2) == 2**63 - 1
    assert state.incr("m", -(2**63)) == -(2**63)


def test_a_huge_ttl_is_kept_as_the_longest_redis_takes(state: SharedState) -> None:
    state.set("k", 1, ttl=1e300)
    ttl = state.ttl("k")
    assert ttl is not None
    assert 1e15 < ttl < math.inf
    state.set("short", 1, ttl=0.0001)  # a millisecond at least
    time.sleep(0.01)
    assert state.get("short") is None


def test_scripts_flushed_from_redis_are_loaded_again(
    state: SharedState, direct: redis.Redis
) -> None:
    state.incr("n")
    direct.script_flush()
    assert state.incr("n") == 2, "NOSCRIPT: loaded and sent once more, applied once"
    direct.script_flush()
    assert state.get_many(["n"]) == {"n": 2}


def test_a_key_not_written_by_this_version_says_so(
    state: SharedState, direct: redis.Redis, app: str
) -> None:
    direct.set(f"shared_core:{app}:v:old", "5")
    with pytest.raises(StateError, match="not a hash"):
        state.get("old")
    assert state.keys() == ["old"]
    assert state.delete("old") is True


class Counting:
    """Counts the commands an engine sends (each is one round trip)."""

    def __init__(self, engine: Any) -> None:
        self.sent: list[str] = []
        inner = engine._execute

        def execute(*args: Any) -> Any:
            self.sent.append(str(args[0]))
            return inner(*args)

        engine._execute = execute


def test_every_call_is_one_round_trip(state: SharedState) -> None:
    state.incr("warm")  # the scripts are loaded from here on
    state.set_many({"warm": 1}, ttl=5)
    state.set_if_version("warm", 1, None)
    state.expire("warm", 5)
    state.setdefault("warm", 1)
    state.get_many(["warm"])
    state.info()
    with state.mutate("warm"):
        pass
    with state.lock("warm"):
        pass
    state.secret("S")
    counting = Counting(state._engine)
    calls = [
        lambda: state.set("a", 1, ttl=5),
        lambda: state.set_many({"a": 1, "b": [2]}, ttl=5),
        lambda: state.set_if_version("a", 2, None),
        lambda: state.add("c", 3),
        lambda: state.get("a"),
        lambda: state.get_versioned("a"),
        lambda: state.get_many(["a", "b", "missing"]),
        lambda: state.incr("n", 2, ttl=5),
        lambda: state.setdefault("d", 4),
        lambda: state.expire("a", 10),
        lambda: state.ttl("a"),
        lambda: state.delete("a"),
        lambda: state.delete_many(["b", "c"]),
        lambda: state.secret("S"),
        lambda: state.rotate_secret("S"),
        lambda: state.publish("ch", 1),
        lambda: state.info(),
    ]
    for call in calls:
        counting.sent.clear()
        call()
        assert len(counting.sent) == 1, counting.sent
    counting.sent.clear()
    with state.mutate("d") as value:
        assert value == 4
    assert len(counting.sent) == 2, "take the lease and read; write and release"
    counting.sent.clear()
    state.get_many([])
    state.set_many({})
    state.delete_many([])
    assert counting.sent == [], "an empty batch sends nothing"


def test_async_calls_are_one_round_trip_too(url: str) -> None:
    async def main() -> None:
        state = AsyncSharedState(url)
        await state.set_many({"a": 1})
        await state.incr("a", 0)  # Redis knows every script used below (else: load, resend)
        await state.get_many(["a"])
        counting = Counting(state._engine)
        assert await state.incr("a", ttl=5) == 2
        assert await state.get_many(["a"]) == {"a": 2}
        assert len(counting.sent) == 2
        await state.aclose()

    asyncio.run(main())


def test_a_lock_that_outlived_its_lease_raises_on_release(state: SharedState) -> None:
    with pytest.raises(StateError, match="had expired"), state.lock("L"):
        time.sleep(0.5)
    with state.lock("L", timeout=0):
        pass


def test_a_mutate_that_outlived_its_lease_writes_nothing(url: str, state: SharedState) -> None:
    state.set("cfg", {"a": 1}, ttl=100)
    with pytest.raises(StateError, match="outlived its lease"), state.mutate("cfg") as cfg:
        cfg["a"] = 2
        time.sleep(0.5)
        with SharedState(url).mutate("cfg") as other:  # the lease is free again
            other["a"] = 3
    assert state.get("cfg") == {"a": 3}
    ttl = state.ttl("cfg")
    assert ttl is not None
    assert 98 < ttl <= 100


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to run out of memory."""
    workdir = Path(tempfile.mkdtemp(prefix="ro-"))
    try:
        with RedisServer(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_out_of_memory_is_a_capacity_error_and_writes_nothing(
    small_redis: RedisServer, app: str
) -> None:
    state = SharedState(small_redis.url(app))
    state.set("kept", 1)
    client = redis.Redis(unix_socket_path=str(small_redis.socket))
    client.config_set("maxmemory-policy", "noeviction")
    # Below anything Redis uses: its use moves by megabytes (a client's query
    # buffer is freed when its cron gets to it), so a limit just under it
    # could let a later write through.
    client.config_set("maxmemory", 1)
    with pytest.raises(CapacityError, match="nothing was written"):
        state.set_many({"a": 1, "b": 2})
    with pytest.raises(CapacityError):
        state.incr("kept")
    client.config_set("maxmemory", 0)
    assert state.get_many(["a", "b", "kept"]) == {"kept": 1}
    client.close()
    state.close()
