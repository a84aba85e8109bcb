"""Many processes, threads and tasks on one state: atomicity and start-up."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import pytest

from conftest import LOCK_LEASE, engine_url, server_processes
from shared_core import AsyncSharedState, SharedState

SPAWN = multiprocessing.get_context("spawn")


def _incr_many(url: str, n: int, out: Any) -> None:
    state = SharedState(url)
    out.put([state.incr("n") for _ in range(n)])


def _append_many(url: str, tag: int, n: int) -> None:
    state = SharedState(url)
    for i in range(n):
        with state.mutate("items", []) as items:
            items.append([tag, i])


def _start_together(url: str, barrier: Any, out: Any) -> None:
    state = SharedState(url)
    barrier.wait()
    state.incr("started")
    out.put(state.info()["pid"])


def _hold_lock_forever(url: str, held: Any) -> None:
    state = SharedState(url)
    with state.lock("L"):
        held.set()
        time.sleep(3600)


def _set_and_die(url: str, done: Any) -> None:
    state = SharedState(url)
    state.set("survivor", {"from": os.getpid()})
    done.set()
    time.sleep(3600)


def _join(procs: list[Any]) -> None:
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"{p} exited with {p.exitcode}"


@pytest.mark.stress
def test_8_processes_x_2000_incr_is_exactly_16000(url: str) -> None:
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_incr_many, args=(url, 2000, out)) for _ in range(8)]
    for p in procs:
        p.start()
    seen = [n for _ in procs for n in out.get(timeout=120)]
    _join(procs)
    assert sorted(seen) == list(range(1, 16001))
    assert SharedState(url).get("n") == 16000


@pytest.mark.stress
def test_8_processes_mutate_one_list_and_lose_nothing(url: str) -> None:
    procs = [SPAWN.Process(target=_append_many, args=(url, tag, 50)) for tag in range(8)]
    for p in procs:
        p.start()
    _join(procs)
    items = SharedState(url).get("items")
    assert sorted(items) == sorted([tag, i] for tag in range(8) for i in range(50))


@pytest.fixture
def steady_url(app: str) -> str:
    """The embedded engine, with a server that outlives short idle gaps on a
    loaded machine (killed at teardown; the exit rule has tests of its own)."""
    return f"local://{app}?linger=10"


@pytest.mark.stress
def test_16_spawned_processes_starting_at_once_make_one_server(app: str, steady_url: str) -> None:
    url = steady_url
    barrier = SPAWN.Barrier(16)
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_start_together, args=(url, barrier, out)) for _ in range(16)]
    for p in procs:
        p.start()
    pids = {out.get(timeout=60) for _ in procs}
    _join(procs)
    servers = server_processes(app)
    assert len(servers) == 1, servers
    assert pids == {servers[0].pid}
    assert SharedState(url).get("started") == 16


def _daemonic_incr(url: str, out: Any) -> None:
    out.put(SharedState(url).incr("n"))


def test_a_daemonic_process_starts_the_server(app: str, steady_url: str) -> None:
    manager_url = steady_url
    # hypercorn's workers are daemonic: multiprocessing forbids them children,
    # so the server must be started some other way.
    out = SPAWN.Queue()
    proc = SPAWN.Process(target=_daemonic_incr, args=(manager_url, out), daemon=True)
    proc.start()
    assert out.get(timeout=60) == 1
    proc.join(30)
    assert proc.exitcode == 0
    assert len(server_processes(app)) == 1
    assert SharedState(manager_url).get("n") == 1


def test_state_survives_sigkill_of_the_process_that_started_the_server(
    app: str, steady_url: str
) -> None:
    url = steady_url
    done = SPAWN.Event()
    starter = SPAWN.Process(target=_set_and_die, args=(url, done))
    starter.start()
    assert done.wait(30)
    server = server_processes(app)
    assert len(server) == 1
    assert starter.pid is not None
    os.kill(starter.pid, signal.SIGKILL)
    starter.join(10)
    state = SharedState(url)
    assert state.get("survivor") == {"from": starter.pid}
    assert state.info()["pid"] == server[0].pid


def test_sigkilled_lock_holder_releases_the_lock(url: str, engine: str) -> None:
    held = SPAWN.Event()
    holder = SPAWN.Process(target=_hold_lock_forever, args=(url, held))
    holder.start()
    assert held.wait(30)
    state = SharedState(url)
    state.info()  # connected before the kill, so only the release is timed
    with pytest.raises(TimeoutError), state.lock("L", timeout=0.1):
        pass
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    killed = time.monotonic()
    with state.lock("L", timeout=LOCK_LEASE + 5):
        waited = time.monotonic() - killed
    holder.join(10)
    if engine == "manager":
        # The holder's connection closed: the server frees its locks at once.
        assert waited < 1.0, f"lock freed {waited:.2f}s after its holder died"
    else:
        # Redis frees a dead holder's lock when its lease runs out.
        assert waited < LOCK_LEASE + 1.0, f"lock freed {waited:.2f}s after its holder died"


def test_the_first_call_after_a_server_restart_succeeds(
    app: str, request: pytest.FixtureRequest
) -> None:
    """Several idle connections died with the server: the next call is sent
    on a new one (to the server it starts), not lost on a dead one."""
    state = SharedState(engine_url("manager", app, request))
    together = threading.Barrier(8)

    def hold() -> None:  # each held lock has a connection of its own
        with state.lock(f"held:{threading.get_ident()}"):
            together.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert state.incr("n") == 1
    pid = state.info()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid in [p.pid for p in server_processes(app)]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert state.incr("n") == 1  # the state died with the server
    finally:
        state.close()


def test_threads_share_one_instance_safely(url: str) -> None:
    state = SharedState(url)
    seen: list[int] = []

    def work() -> None:
        seen.extend(state.incr("n") for _ in range(500))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(1, 4001))


def test_a_forked_child_gets_its_own_connection(url: str) -> None:
    state = SharedState(url)
    state.incr("n")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            values = [state.incr("n") for _ in range(200)]
            os.write(write, f"{values[-1]} {state.info()['clients']}".encode())
        finally:
            os._exit(0)
    parent_values = [state.incr("n") for _ in range(200)]
    _, status = os.waitpid(pid, 0)
    child_last, clients = map(int, os.read(read, 100).split())
    assert os.waitstatus_to_exitcode(status) == 0
    assert state.get("n") == 401
    assert max(parent_values[-1], child_last) == 401
    assert clients >= 2  # the child did not talk over the parent's socket


def test_async_calls_do_not_block_the_event_loop(
    url: str, engine: str, app: str, request: pytest.FixtureRequest
) -> None:
    if engine == "postgres":
        # 200 calls at once queue for its 10 connections; on a loaded machine
        # the last one waited past the default connect_timeout (5 s). Their
        # speed is not the point here: that the loop goes on meanwhile is.
        url = engine_url(engine, app, request, connect_timeout=30)
    elif engine == "redis":
        # The holder's lease must outlast a slow start of the waiter below.
        url = engine_url(engine, app, request, lock_lease=60)
    held = SPAWN.Event()
    holder = SPAWN.Process(target=_hold_lock_forever, args=(url, held))
    holder.start()
    assert held.wait(30)

    async def main() -> tuple[int, int]:
        state = AsyncSharedState(url)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(TimeoutError):
            async with state.lock("L", timeout=1.0):
                pass
        during_wait = ticks
        numbers = await asyncio.gather(*(state.incr("n") for _ in range(200)))
        task.cancel()
        await state.aclose()
        assert sorted(numbers) == list(range(1, 201))
        return during_wait, len(numbers)

    try:
        ticks, _ = asyncio.run(main())
    finally:
        holder.kill()
        holder.join(10)
    # ~100 ticks fit in the 1 s wait; a blocked loop would give about none.
    assert ticks >= 30, ticks


def test_async_lock_is_released_when_the_waiting_task_is_cancelled(
    url: str, engine: str, app: str, request: pytest.FixtureRequest
) -> None:
    if engine == "redis":
        # a's lease must outlast the body on a loaded machine (2 s did not);
        # a claim the cancelled waiter kept would still outlast b's timeout.
        url = engine_url(engine, app, request, lock_lease=30)

    async def main() -> None:
        a, b = AsyncSharedState(url), AsyncSharedState(url)
        async with a.lock("L"):
            waiter = asyncio.create_task(_take(b))
            await asyncio.sleep(0.2)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                # Bounded: a waiter that lost its cancellation would sleep on.
                await asyncio.wait_for(waiter, 30)
        # Had the cancelled waiter kept a claim, this would time out.
        async with b.lock("L", timeout=2):
            pass
        await a.aclose()
        await b.aclose()

    async def _take(state: AsyncSharedState) -> None:
        async with state.lock("L"):
            await asyncio.sleep(3600)

    asyncio.run(main())


def test_a_task_that_handled_its_cancellation_can_still_lock(url: str) -> None:
    """Clean-up after a cancellation, under a lock: the cancellation was
    delivered, so the lock and mutate calls that follow go through."""

    async def main() -> Any:
        state = AsyncSharedState(url)
        done: list[Any] = []

        async def work() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                async with state.lock("cleanup", timeout=5), state.mutate("cleaned", {}) as cleaned:
                    cleaned["done"] = True
                done.append(await state.get("cleaned"))
                raise

        task = asyncio.create_task(work())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await state.aclose()
        return done

    assert asyncio.run(main()) == [{"done": True}]


def test_the_async_api_works_on_uvloop(url: str) -> None:
    # uvicorn runs on uvloop whenever it is installed (uvicorn[standard]).
    import uvloop

    async def main() -> list[Any]:
        state = AsyncSharedState(url)
        got = []
        async with state.subscribe("c") as messages:
            numbers = await asyncio.gather(*(state.incr("n") for _ in range(50)))
            async with state.lock("L", timeout=5), state.mutate("cfg", {}) as cfg:
                cfg["a"] = sorted(numbers)
            await state.publish("c", "hi")
            async for _, message in messages:
                got.append(message)
                break
        got.append((await state.get("cfg"))["a"])
        await state.aclose()
        return got

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == ["hi", list(range(1, 51))]
    finally:
        loop.close()
