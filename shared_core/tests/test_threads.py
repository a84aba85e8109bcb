"""Threads and event loops: one client shared by many, on a bounded number of connections.

A process opens at most ``max_connections`` connections to the embedded state
server however many threads it runs (granian's WSGI workers and gunicorn's
gthread workers run dozens); its threads take turns on them. A thread that
holds a lock keeps its connection and makes its other calls there. One
``AsyncSharedState`` serves several event loops, each in its own thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from shared_core import (
    AsyncSharedState,
    CapacityError,
    ConfigError,
    LockTimeout,
    SharedState,
    StateUnavailable,
)
from shared_core._config import DEFAULT_MAX_CONNECTIONS, resolve


def in_threads(n: int, target: Callable[[int], Any], timeout: float = 120) -> list[Any]:
    """Run ``target(i)`` in ``n`` threads at once; their results, or the first error."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = target(i)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish in time"
    if errors:
        raise errors[0]
    return results


def started(app: str) -> None:
    """Start the app's state server with the default timeouts, so that a
    test's short ``connect_timeout`` bounds the wait it is about, not a start
    on a loaded machine."""
    with SharedState(f"local://{app}?linger=10") as state:
        state.incr("started")


def clients(state: SharedState) -> int:
    """Connections the server has now, minus the one that asks."""
    return int(state.info()["clients"]) - 1


def test_64_threads_share_one_state_on_at_most_max_connections(app: str) -> None:
    state = SharedState(f"local://{app}?linger=10")
    peak = [0]
    stop = threading.Event()
    watcher = SharedState(f"local://{app}?linger=10")  # a second client, to look

    def watch() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], clients(watcher))

    looking = threading.Thread(target=watch)
    looking.start()
    try:
        counts = in_threads(64, lambda i: [state.incr("n") for _ in range(150)])
    finally:
        stop.set()
        looking.join()
    numbers = sorted(n for each in counts for n in each)
    assert numbers == list(range(1, 64 * 150 + 1)), "every increment exactly once"
    assert 1 <= peak[0] <= DEFAULT_MAX_CONNECTIONS, peak[0]
    state.close()
    watcher.close()


def test_a_full_pool_gives_state_unavailable_within_connect_timeout_and_changes_nothing(
    app: str,
) -> None:
    started(app)
    state = SharedState(f"local://{app}?linger=10&max_connections=1&connect_timeout=1")
    state.set("n", 5)
    with state.lock("held"):  # the only connection is this thread's now
        asked = time.monotonic()
        with pytest.raises(StateUnavailable, match="max_connections"):
            in_threads(1, lambda i: state.incr("n"))
        took = time.monotonic() - asked
        assert 0.9 < took < 4.0, took
        assert state.get("n") == 5  # the holder's own calls go on its connection
    assert in_threads(1, lambda i: state.incr("n")) == [6]  # given back: usable again


def test_a_lock_holder_is_never_stuck_behind_threads_that_wait_for_it(app: str) -> None:
    # 2 connections, 12 threads that want the same lock: while one holds it,
    # another waits on the server and the rest wait for a connection; the
    # holder's calls inside the lock use its own connection.
    state = SharedState(f"local://{app}?linger=10&max_connections=2")

    def work(i: int) -> list[int]:
        seen = []
        for _ in range(5):
            with state.lock("one-at-a-time", timeout=60):
                a = state.incr("inside")
                time.sleep(0.002)
                seen.append(state.incr("inside") - a)
        return seen

    gaps = in_threads(12, work)
    assert all(g == 1 for each in gaps for g in each), "another thread ran inside the lock"
    assert state.get("inside") == 12 * 5 * 2


def test_nested_locks_and_mutate_in_one_thread_share_its_connection(app: str) -> None:
    state = SharedState(f"local://{app}?linger=10&max_connections=1")
    with state.lock("a"), state.lock("b"), state.mutate("doc", {}) as doc:
        doc["n"] = state.incr("n")
        with pytest.raises(LockTimeout):
            # Another thread cannot take "a", nor wait for a connection for ever.
            in_threads(1, lambda i: state.lock("a", timeout=0.2).__enter__())
    assert state.get("doc") == {"n": 1}
    # All three let go: the only connection is back in the pool for any thread.
    assert in_threads(1, lambda i: state.incr("n")) == [2]
    with state.lock("a", timeout=1), state.lock("b", timeout=1):
        pass  # both released, by the thread that held them


def test_plain_calls_are_not_starved_by_threads_waiting_for_a_lock(app: str) -> None:
    # 2 connections: one held by the lock's holder for 3 s, the other wanted
    # by 6 threads waiting for that lock. A lock wait gives its connection
    # back every half second, so plain calls get one well within
    # connect_timeout (2 s) instead of failing.
    started(app)
    state = SharedState(f"local://{app}?linger=10&max_connections=2&connect_timeout=2")
    held = threading.Event()

    def holder(i: int) -> None:
        with state.lock("long"):
            held.set()
            time.sleep(3)

    def waiter(i: int) -> None:
        held.wait(10)
        with state.lock("long", timeout=30):
            pass

    def plain(i: int) -> float:
        held.wait(10)
        time.sleep(0.5)  # the waiters are in line by now
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            state.incr("plain")
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
        return slowest

    roles = [holder, *[waiter] * 6, plain]
    results = in_threads(len(roles), lambda i: roles[i](i))
    assert results[-1] < 1.5, f"a plain call waited {results[-1]:.2f}s for a connection"
    assert state.get("plain") == 20


def test_a_refused_write_at_the_end_of_mutate_frees_its_lock_and_connection(app: str) -> None:
    state = SharedState(f"local://{app}?linger=10&max_connections=1&max_keys=1&eviction=noeviction")
    state.set("a", 1)
    with pytest.raises(CapacityError), state.mutate("b", {}) as doc:
        doc["x"] = 1

    # Neither the key's lock (else LockTimeout) nor the connection (else
    # StateUnavailable) stayed behind; this mutation gives up, writing nothing.
    def again(i: int) -> None:
        with pytest.raises(KeyError), state.mutate("b", {}, timeout=1):
            raise KeyError("given up")

    in_threads(1, again)
    assert state.get("b") is None


def test_a_lock_released_when_the_server_died_says_so_and_frees_the_connection(
    app: str,
) -> None:
    state = SharedState(f"local://{app}?linger=10&max_connections=1")
    with pytest.raises(StateUnavailable, match="lock was held"), state.lock("x"):
        for server in _servers(app):
            server.kill()
            server.wait(10)
        state.incr("n")
    # The broken connection left the pool: a new server, a new connection.
    assert state.incr("n") == 1


def _servers(app: str) -> list[Any]:
    from conftest import server_processes

    return server_processes(app)


def test_a_forked_child_has_its_own_pool_and_not_the_parents_locks(app: str) -> None:
    state = SharedState(f"local://{app}?linger=10&max_connections=1")
    state.incr("n")
    with state.lock("parent's"):
        # Forked by the thread that holds a lock: the child must neither use
        # nor release the parent's connection.
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                state.incr("n")
                with state.lock("child's", timeout=2):
                    state.incr("n")
                try:
                    with state.lock("parent's", timeout=0.3):
                        pass
                except LockTimeout:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert state.incr("n") == 4  # the parent's connection still works
    with state.lock("parent's", timeout=1):
        pass  # released by the parent


def test_one_async_state_serves_event_loops_in_several_threads(app: str) -> None:
    state = AsyncSharedState(f"local://{app}?linger=10")

    def loop_in_a_thread(i: int) -> list[int]:
        async def main() -> list[int]:
            got = await asyncio.gather(*(state.incr("n") for _ in range(100)))
            async with state.lock("shared", timeout=30):
                got.append(await state.incr("n"))
            await state.aclose()  # this loop's connections, before it ends
            return list(got)

        return asyncio.run(main())

    counts = in_threads(6, loop_in_a_thread)
    numbers = sorted(n for each in counts for n in each)
    assert numbers == list(range(1, 6 * 101 + 1))


def test_async_locks_hold_at_most_max_connections(app: str) -> None:
    url = f"local://{app}?linger=10&max_connections=2"
    state = AsyncSharedState(url)
    watcher = SharedState(url)
    peak = [0]

    async def hold(i: int) -> None:
        async with state.lock(f"lock-{i}", timeout=30):
            peak[0] = max(peak[0], clients(watcher))
            await asyncio.sleep(0.05)

    async def main() -> None:
        await state.incr("n")  # the pipelined connection
        await asyncio.gather(*(hold(i) for i in range(10)))
        await state.aclose()

    asyncio.run(main())
    # The pipelined connection and 2 held locks (clients() leaves out the
    # watcher's own connection).
    assert peak[0] <= 1 + 2, peak[0]


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_max_connections_must_be_a_positive_whole_number(app: str, value: str) -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        SharedState(f"local://{app}?max_connections={value}")


def test_max_connections_is_ours_on_a_redis_url_too() -> None:
    config = resolve("redis://127.0.0.1:6379/0?max_connections=3&health_check_interval=5")
    assert config.max_connections == 3
    assert "max_connections" not in str(config.address)
    assert "health_check_interval=5" in str(config.address)


def test_aclose_while_a_lock_is_held_leaves_the_waiters_served(app: str) -> None:
    state = AsyncSharedState(f"local://{app}?linger=10&max_connections=1")

    async def take(name: str) -> None:
        async with state.lock(name, timeout=10):
            pass

    async def main() -> None:
        async with state.lock("a"):
            waiting = asyncio.create_task(take("b"))  # waits for the only connection
            await asyncio.sleep(0.2)
            await state.aclose()  # a worker's lifespan ending, say
        # The holder gave its connection back to the line it came from.
        await asyncio.wait_for(waiting, 5)
        await take("c")
        await state.aclose()

    asyncio.run(main())
