"""A frozen state server (SIGSTOP): every path gives up in bounded time.

A stalled process, a swapped-out machine or a debugger freeze a server
without closing its sockets, so nothing but a deadline ends a wait. Each test
freezes the server, checks that one path raises ``StateUnavailable`` within
its bound, resumes the server, and checks that calls work again and that no
increment was applied twice.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import redis_url, server_processes
from shared_core import AsyncSharedState, SharedState, StateUnavailable
from shared_core.testing import PostgresServer, RedisServer, wait_for

CONNECT = 1.0  # connect_timeout in these tests
OP = 1.0  # op_timeout
# What a call may take at most: connecting, then waiting for one reply,
# plus scheduling slack on a loaded 2-core machine.
BOUND = CONNECT + OP + 1.5


class Frozen:
    """The server under test, and how to freeze and resume it (PostgreSQL:
    with its children, each connection's process among them)."""

    def __init__(self, url: str, pid: int, postgres: PostgresServer | None = None) -> None:
        self.url, self.pid, self.postgres = url, pid, postgres

    def after_one_sent(self, count: int) -> bool:
        """Whether ``count`` is right after 10 increments, those sent to the
        frozen server, and one more. The embedded server and Redis get one
        there (the other threads' calls wait to connect) and apply it on
        resume: 12. PostgreSQL's pool may lend the other thread a second idle
        connection, so one or two are sent, and each is applied once or not
        at all (once resumed, the server finds the client gone when it
        answers, and rolls back what it had not committed): 11 to 13. Never
        one twice."""
        return count == 12 or (self.postgres is not None and 11 <= count <= 13)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        # The postmaster first, so that it forks no backend while they are listed.
        os.kill(self.pid, signal.SIGSTOP)
        pids = [self.pid]
        if self.postgres is not None:
            pids = [p.pid for p in self.postgres.processes()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            # kill() returns before a process has stopped; wait until each has.
            for pid in pids:
                wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 5, "stop")
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)


@pytest.fixture
def redis_own() -> Iterator[RedisServer]:
    """A redis-server of this test's own: freezing it must not stall others."""
    workdir = Path(tempfile.mkdtemp(prefix="rf-"))
    server = RedisServer(workdir).start()
    try:
        yield server
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["manager", "redis", "postgres"])
def target(request: pytest.FixtureRequest, app: str) -> Frozen:
    query = f"connect_timeout={CONNECT}&op_timeout={OP}"
    if request.param == "manager":
        url = f"local://{app}?linger=5&{query}"
        # Started with the default timeouts: a loaded machine may need more
        # than one second to start a server, which is not what is tested here.
        pid = int(SharedState(f"local://{app}?linger=5").info()["pid"])
    elif request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_own")
        url = redis_url(str(redis.socket), app, lock_lease=2) + f"&{query}"
        assert redis.proc is not None
        pid = redis.proc.pid
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres_own")
        url = postgres.url(app) + f"&{query}"
        assert postgres.proc is not None
        return Frozen(url, postgres.proc.pid, postgres)
    return Frozen(url, pid)


def bounded(fn: Callable[[], Any], bound: float = BOUND) -> float:
    """Run ``fn``; it must raise StateUnavailable within ``bound`` seconds."""
    started = time.monotonic()
    with pytest.raises(StateUnavailable):
        fn()
    took = time.monotonic() - started
    assert took < bound, f"gave up after {took:.2f}s; the bound is {bound:g}s"
    return took


def test_sync_paths_give_up_in_time_and_recover(target: Frozen) -> None:
    warm = SharedState(target.url)
    for _ in range(10):
        warm.incr("n")
    with warm.lock("held"):
        pass
    with target.frozen():
        # A call on an open connection: sent, so it is applied on resume.
        bounded(lambda: warm.incr("n"), OP + 1.5)
        # A new state: connecting (authentication, handshake) is bounded.
        bounded(lambda: SharedState(target.url).incr("n"))
        # The same state from a new thread, which opens its own connection.
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                bounded(lambda: warm.incr("n"))
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(BOUND + 5)
        assert not thread.is_alive()
        assert not errors, errors
        # Locks and mutate that would wait for ever still notice the freeze.
        bounded(lambda: warm.lock("l").__enter__())
        bounded(lambda: warm.mutate("m").__enter__())
        bounded(lambda: warm.subscribe("c", callback=lambda c, m: None), CONNECT + OP + 6.5)
    # Resumed: the same objects work again, by themselves.
    count = warm.incr("n")
    assert target.after_one_sent(count), f"{count}: the increment sent was applied twice?"
    with warm.lock("l", timeout=5), warm.mutate("m", 0) as value:
        assert value == 0
    assert SharedState(target.url).get("n") == count


def test_async_paths_give_up_in_time_and_recover(target: Frozen) -> None:
    async def main() -> None:
        warm = AsyncSharedState(target.url)
        for _ in range(10):
            await warm.incr("n")
        await asyncio.sleep(0)
        with target.frozen():
            await abounded(warm.incr("n"), OP + 1.5)
            await abounded(AsyncSharedState(target.url).incr("n"))
            # Many callers at once on a broken connection: none waits longer.
            fresh = AsyncSharedState(target.url)
            started = time.monotonic()
            results = await asyncio.gather(
                *(fresh.incr("n") for _ in range(20)), return_exceptions=True
            )
            assert all(isinstance(r, StateUnavailable) for r in results), results
            assert time.monotonic() - started < BOUND
            await abounded(warm.lock("l").__aenter__())
            await abounded(warm.mutate("m").__aenter__())
            await abounded(warm.subscribe("c").__aenter__())
        count = await warm.incr("n")
        assert target.after_one_sent(count), count
        async with warm.lock("l", timeout=5), warm.mutate("m", 0) as value:
            assert value == 0
        await warm.aclose()
        await fresh.aclose()

    asyncio.run(main())


async def abounded(call: Any, bound: float = BOUND) -> None:
    started = time.monotonic()
    with pytest.raises(StateUnavailable):
        await call
    took = time.monotonic() - started
    assert took < bound, f"gave up after {took:.2f}s; the bound is {bound:g}s"


def test_held_lock_release_is_bounded(target: Frozen) -> None:
    state = SharedState(target.url)
    cm = state.lock("held", timeout=1)
    cm.__enter__()
    with target.frozen():
        bounded(lambda: cm.__exit__(None, None, None), OP + 1.5)
    # The holder's connection was dropped, so the lock is free again (Redis:
    # once its lease runs out).
    with state.lock("held", timeout=5):
        pass


def test_a_frozen_embedded_server_is_not_replaced(app: str) -> None:
    url = f"local://{app}?linger=5&connect_timeout={CONNECT}&op_timeout={OP}"
    SharedState(f"local://{app}?linger=5").incr("n")  # started with the default timeouts
    (server,) = server_processes(app)
    authkey = (Path(os.environ["XDG_RUNTIME_DIR"]) / "shared_core" / app / "authkey").read_bytes()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: server.status() == psutil.STATUS_STOPPED, 5, "the server to stop")
        for _ in range(3):
            bounded(lambda: SharedState(url).incr("n"))
    finally:
        os.kill(server.pid, signal.SIGCONT)
    # Starting a second server would have replaced the key under the first.
    assert [p.pid for p in server_processes(app)] == [server.pid]
    key_now = (Path(os.environ["XDG_RUNTIME_DIR"]) / "shared_core" / app / "authkey").read_bytes()
    assert key_now == authkey
    assert SharedState(url).incr("n") == 2
