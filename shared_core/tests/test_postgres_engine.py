"""What only the PostgreSQL engine does: its tables, its locks that die with
their holder's connection, mutate holding the row, NOTIFY payloads past
8000 bytes, restarts and forks. The contract itself is in test_contract.py
and test_expiry_batch_cas.py, on every engine."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from shared_core import AsyncSharedState, LockTimeout, SharedState, StateError, StateUnavailable
from shared_core.engines.postgres import schema_name
from shared_core.testing import PostgresServer, wait_for

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def url(postgres_server: PostgresServer, app: str) -> str:
    return postgres_server.url(app)


@pytest.fixture
def state(url: str) -> Iterator[SharedState]:
    state = SharedState(url)
    yield state
    state.close()


def sql(server: PostgresServer, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run ``query`` on a connection of its own, as another program would."""
    with psycopg.connect(
        host=str(server.socket_dir), port=server.port, user="postgres", autocommit=True
    ) as conn:
        return conn.execute(query, params or None).fetchall()


def test_an_apps_values_live_in_its_own_schema(
    state: SharedState, postgres_server: PostgresServer, app: str
) -> None:
    state.set("n", 7)
    state.set("doc", {"a": 1})
    state.set("huge", 2**70)
    state.secret("key")
    schema = schema_name(app)
    rows = sql(postgres_server, f'SELECT key, num, data FROM "{schema}".kv ORDER BY key')
    # An int in 64 bits is a number PostgreSQL adds to; anything else is the codec's bytes.
    assert rows == [("doc", None, b'j{"a":1}'), ("huge", None, b"1180591620717411303424"),
                    ("n", 7, None)]  # fmt: skip
    assert state.keys() == ["doc", "huge", "n"], "secrets are kept apart"
    assert schema_name("x" * 64).startswith("shared_core_x")
    assert len(schema_name("x" * 64)) <= 63


_start: Any = None


def _wait_for(start: Any) -> None:
    global _start
    _start = start


def _incr_once(url: str) -> int:
    _start.wait(60)
    return SharedState(url).incr("n")


def test_sixteen_processes_create_the_schema_at_once(url: str) -> None:
    start = SPAWN.Event()
    with SPAWN.Pool(16, initializer=_wait_for, initargs=(start,)) as pool:
        results = pool.map_async(_incr_once, [url] * 16)
        time.sleep(1.0)  # every process is waiting on the event
        start.set()
        assert sorted(results.get(120)) == list(range(1, 17))


def test_incr_past_64_bits_fails_and_changes_nothing(state: SharedState) -> None:
    state.set("huge", 2**70)
    with pytest.raises(TypeError, match="64-bit"):
        state.incr("huge")
    assert state.get("huge") == 2**70
    state.set("max", 2**63 - 1)
    with pytest.raises(StateError, match="64-bit"):
        state.incr("max")
    assert state.get("max") == 2**63 - 1


def test_a_key_with_a_nul_is_refused(state: SharedState) -> None:
    with pytest.raises(ValueError, match="NUL"):
        state.set("a\0b", 1)


def test_a_write_during_a_mutate_waits_for_its_commit(state: SharedState) -> None:
    # mutate holds the key's row (SELECT ... FOR UPDATE): a plain write waits
    # and lands after it, instead of being overwritten by it.
    state.set("k", {"n": 0})
    written = threading.Event()

    def write() -> None:
        state.set("k", "later")
        written.set()

    with state.mutate("k") as value:
        writer = threading.Thread(target=write)
        writer.start()
        assert not written.wait(0.5), "the write went through during the mutate"
        value["n"] = 1
    writer.join(10)
    assert state.get("k") == "later"


def test_a_write_blocked_past_op_timeout_raises_and_changes_nothing(
    postgres_server: PostgresServer, app: str
) -> None:
    state = SharedState(postgres_server.url(app, op_timeout=0.5))
    state.set("k", 1)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            state.set("k", 2)
        except BaseException as exc:
            errors.append(exc)

    with state.mutate("k") as value:
        writer = threading.Thread(target=write)
        writer.start()
        writer.join(10)
        assert value == 1
    # StateUnavailable, as a server that does not answer in time: the apps
    # answer 503; and nothing was written.
    assert len(errors) == 1, errors
    assert isinstance(errors[0], StateUnavailable), errors
    assert "row lock" in str(errors[0])
    assert state.get("k") == 1


def _hold(url: str, held: Any) -> None:
    state = SharedState(url)
    with state.lock("job"):
        held.set()
        time.sleep(60)


def test_a_lock_is_free_as_soon_as_its_holder_is_killed(url: str) -> None:
    held = SPAWN.Event()
    holder = SPAWN.Process(target=_hold, args=(url, held))
    holder.start()
    try:
        assert held.wait(60)
        state = SharedState(url)
        with pytest.raises(LockTimeout), state.lock("job", timeout=0.2):
            pass
        os.kill(holder.pid or 0, signal.SIGKILL)
        killed = time.monotonic()
        with state.lock("job", timeout=5):
            waited = time.monotonic() - killed
        assert waited < 1.0, f"free {waited:.2f}s after the holder died"
    finally:
        holder.kill()
        holder.join()


def test_a_message_past_notifys_limit_arrives_whole(url: str) -> None:
    state = SharedState(url)
    got: list[Any] = []
    sub = state.subscribe("big", callback=lambda c, m: got.append(m))
    try:
        message = {"text": "x" * 20_000, "n": list(range(1000))}
        assert state.publish("big", message) == 1
        assert state.publish("big", "small") == 1
        wait_for(lambda: len(got) == 2, 10, "both messages")
        assert got == [message, "small"]
    finally:
        sub.close()


def test_binary_messages_by_opt_in(postgres_server: PostgresServer, app: str) -> None:
    state = SharedState(postgres_server.url(app, serializer="pickle"))
    got: list[Any] = []
    sub = state.subscribe("b", callback=lambda c, m: got.append(m))
    try:
        state.publish("b", b"\x00\xff" * 10)
        state.publish("b", {1, 2})
        wait_for(lambda: len(got) == 2, 10, "both messages")
        assert got == [b"\x00\xff" * 10, {1, 2}]
    finally:
        sub.close()


def test_expired_rows_are_reclaimed(
    state: SharedState, postgres_server: PostgresServer, app: str
) -> None:
    state.set_many({f"k{i}": i for i in range(50)}, ttl=0.1)
    state.set("kept", 1)
    time.sleep(0.2)
    engine: Any = state._engine
    engine._next_sweep = 0  # the next call sweeps
    assert state.get("kept") == 1
    count = sql(postgres_server, f'SELECT count(*) FROM "{schema_name(app)}".kv')
    assert count == [(1,)]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_the_first_call_after_a_restart_succeeds(
    postgres_own: PostgresServer, app: str, how: str
) -> None:
    # Idle connections of the pool died with the server: they are dropped
    # before use (their socket turned readable), never sent on.
    state = SharedState(postgres_own.url(app))
    threads = [threading.Thread(target=lambda: state.incr("n")) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    getattr(postgres_own, how)()
    postgres_own.start()
    assert state.incr("n") == 9


def _in_child(state: SharedState, out: Any) -> None:
    out.put(state.incr("n"))


def test_a_forked_child_makes_its_own_connections(state: SharedState) -> None:
    assert state.incr("n") == 1
    out = FORK.Queue()
    child = FORK.Process(target=_in_child, args=(state, out))
    child.start()
    assert out.get(timeout=30) == 2
    child.join(30)
    assert child.exitcode == 0
    # The parent's connection was left alone by the child.
    assert state.incr("n") == 3


def test_info_names_the_server_and_the_schema(state: SharedState, app: str) -> None:
    info = state.info()
    assert info["engine"] == "postgres"
    assert info["schema"] == schema_name(app)
    assert info["postgres"]


def test_a_lock_waiting_for_a_connection_counts_it_in_its_timeout(
    postgres_server: PostgresServer, app: str
) -> None:
    # A held lock keeps its connection: with max_connections=1, another lock
    # finds none free, and gives up within its own timeout, not connect_timeout.
    state = SharedState(postgres_server.url(app, max_connections=1))
    with state.lock("a"):
        started = time.monotonic()
        with pytest.raises(LockTimeout), state.lock("b", timeout=0.3):
            pass
        assert time.monotonic() - started < 2.0
    with state.lock("b", timeout=5):
        pass


def test_a_try_lock_on_a_fresh_state_takes_a_free_lock(url: str) -> None:
    # Its first connection is still being opened: that is not "all busy".
    with SharedState(url).lock("free", timeout=0):
        pass


def test_batches_in_opposite_orders_never_deadlock(state: SharedState) -> None:
    keys = [f"k{i}" for i in range(50)]
    errors: list[BaseException] = []

    def write(order: list[str]) -> None:
        try:
            for _ in range(20):
                state.set_many({k: 1 for k in order})
                state.delete_many(order[:10])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(o,)) for o in (keys, keys[::-1]) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_a_cancelled_call_gives_its_connection_back(url: str) -> None:
    async def main() -> None:
        state = AsyncSharedState(url + "&max_connections=1&connect_timeout=2")
        holder = SharedState(url)
        await state.set("k", 0)
        # The write waits for the mutate's row: it is cancelled meanwhile.
        with holder.mutate("k"), pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(state.set("k", 1), 0.3)
        started = time.monotonic()
        assert await state.incr("n") == 1, "the only connection is back in the pool"
        assert time.monotonic() - started < 1.0
        await state.aclose()

    asyncio.run(main())


def test_asyncio_run_ends_while_the_pool_is_still_connecting(url: str) -> None:
    # 20 calls at once grow the pool: connections are still being opened when
    # the loop ends without aclose(), which psycopg's pool tasks would outlive.
    async def main() -> None:
        state = AsyncSharedState(url)
        await asyncio.gather(*(state.incr("n") for _ in range(20)))

    def runs() -> None:
        for _ in range(10):
            asyncio.run(main())

    thread = threading.Thread(target=runs, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "asyncio.run() did not end"
    assert SharedState(url).get("n") == 200
