"""Work that must run once: leases with fencing, run_once, periodic jobs.

Every engine; the workers are real processes, the deaths real SIGKILLs.
Those with several processes are marked ``stress``: the same code on every
Python, so tox runs them on the default one only.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from conftest import join_or_kill
from shared_core import (
    AsyncScheduler,
    AsyncSharedState,
    FencedError,
    LockTimeout,
    Occurrence,
    RunOnceFailed,
    Scheduler,
    SharedState,
    deployment_start,
)
from shared_core.testing import wait_for

SPAWN = multiprocessing.get_context("spawn")


def _in_thread(func: Any) -> Any:
    """``func()`` in another thread (a lock lives on its thread's connection);
    what it returns, or what it raised."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(func())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]
    return out[0]


# -- leases -------------------------------------------------------------------------------


def test_a_lease_has_one_holder_and_each_holder_a_larger_token(url: str) -> None:
    state = SharedState(url)
    first = state.lease("leader", ttl=5)
    assert first.acquire()
    assert first.held
    assert first.token is not None
    other = state.lease("leader", ttl=5)
    # Another holder (another thread: a lock lives on its thread's connection).
    assert _in_thread(lambda: other.acquire(0.2)) is False
    holder = _in_thread(other.holder)
    assert holder is not None
    assert holder["pid"] == os.getpid()
    assert holder["token"] == first.token
    first.release()
    assert not first.held
    assert _in_thread(other.holder) is None

    def take_and_give_back() -> int | None:
        assert other.acquire(1)
        token = other.token
        other.release()
        return token

    second = _in_thread(take_and_give_back)
    assert second is not None
    assert second > first.token
    state.close()


def test_a_lease_is_renewed_past_its_ttl_while_held(url: str) -> None:
    state = SharedState(url)
    # Renewed every ttl/3: a renewal may come 2 s late on a loaded machine
    # before the lease (on Redis) runs out.
    lease = state.lease("renewed", ttl=3.0)
    assert lease.acquire()
    time.sleep(5.0)  # 2 s past the ttl: only renewals keep it
    assert lease.held
    assert _in_thread(lambda: state.lease("renewed", ttl=3.0).acquire(0)) is False
    lease.release()
    state.close()


def test_a_lease_is_released_by_the_thread_that_holds_it(url: str, engine: str) -> None:
    state = SharedState(url)
    lease = state.lease("mine", ttl=5)
    assert lease.acquire()
    if engine != "redis":  # a lock of the engine: it belongs to its thread
        with pytest.raises(RuntimeError):
            _in_thread(lease.release)
        assert lease.held
        # Another lease object of the holding thread is another holder.
        assert state.lease("mine", ttl=5).acquire(0) is False
    lease.release()
    assert not lease.held

    def take_and_give_back() -> bool:
        other = state.lease("mine", ttl=5)
        taken = other.acquire(0)
        other.release()
        return taken

    assert _in_thread(take_and_give_back) is True
    state.close()


def test_lease_arguments_are_checked(url: str) -> None:
    state = SharedState(url)
    with pytest.raises(ValueError):
        state.lease("x", ttl=0)
    with pytest.raises(TypeError):
        state.lease(3, ttl=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        state.lease("x", ttl=1).acquire(-1)
    state.close()


def _hold_lease(url: str, ttl: float, ready: Any) -> None:
    state = SharedState(url)
    lease = state.lease("leader", ttl=ttl)
    assert lease.acquire(10)
    lease.fenced_set("report", "old holder")
    ready.send(lease.token)
    # Once thawed (SIGCONT), try a late write with the old token.
    ready.recv()
    try:
        lease.fenced_set("report", "late write")
        ready.send("written")
    except FencedError as exc:
        ready.send(f"refused: {exc}")
    time.sleep(60)


@pytest.mark.stress
def test_a_dead_holder_loses_the_lease_and_a_frozen_one_is_fenced(url: str, engine: str) -> None:
    """Embedded and PostgreSQL free the lease the moment its holder dies;
    Redis once its ttl runs out. Either way the old holder's token is
    refused after another took over."""
    ttl = 1.0
    parent_end, child_end = SPAWN.Pipe()
    holder = SPAWN.Process(target=_hold_lease, args=(url, ttl, child_end), daemon=True)
    holder.start()
    pid = holder.pid
    assert pid is not None
    state = SharedState(url)
    try:
        assert parent_end.poll(30)
        old_token = parent_end.recv()
        lease = state.lease("leader", ttl=ttl)
        assert lease.acquire(0) is False
        frozen = time.monotonic()  # before: a stall after the kill only adds to took_over
        os.kill(pid, signal.SIGSTOP)
        if engine == "redis":
            # A frozen holder keeps nothing past its ttl on Redis.
            assert lease.acquire(ttl + 5)
            took_over = time.monotonic() - frozen
            # Renewed every ttl/3: it runs out between 2/3 of the ttl and the ttl.
            assert took_over >= ttl / 2, took_over
            print(f"redis: a frozen holder's lease taken over {took_over:.2f} s later (ttl {ttl})")
            assert lease.token is not None
            assert lease.token > old_token
            lease.fenced_set("report", "new holder")
            os.kill(pid, signal.SIGCONT)
            parent_end.send("go")
            assert parent_end.poll(15)
            answer = parent_end.recv()
            assert answer.startswith("refused"), answer
            assert lease.fenced_get("report") == "new holder"
        else:
            # ... while the embedded engine and PostgreSQL keep a frozen
            # holder's lease (its connection lives) and free it at its death.
            assert lease.acquire(ttl * 1.5) is False
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            assert lease.acquire(10)
            took_over = time.monotonic() - killed
            # At its death, not at an expiry: it outlived 1.5 ttls frozen above.
            assert took_over < 5.0, took_over
            print(f"{engine}: a killed holder's lease taken over {took_over * 1000:.0f} ms later")
            assert lease.token is not None
            assert lease.token > old_token
            lease.fenced_set("report", "new holder")
            assert lease.fenced_get("report") == "new holder"
        lease.release()
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        holder.join(10)
        state.close()


def test_a_lease_lost_while_its_lock_lived_can_be_acquired_again(url: str) -> None:
    """A renewal that failed for a whole ttl marks the lease lost, while its
    lock (embedded, PostgreSQL) may live on: acquiring it again lets go of
    that lock first instead of being refused by it forever."""
    state = SharedState(url)
    lease = state.lease("flaky", ttl=5)
    assert lease.acquire()
    first = lease.token
    lease._lost = True  # what a renewal that gave up leaves
    assert not lease.held
    assert lease.acquire(2)
    assert lease.held
    assert lease.token is not None
    assert first is not None
    assert lease.token > first
    lease.release()

    def take_and_give_back() -> bool:
        other = state.lease("flaky", ttl=5)
        taken = other.acquire(0)
        other.release()  # and its renewer stops
        return taken

    assert _in_thread(take_and_give_back) is True
    state.close()


def test_a_holder_that_released_cannot_write_after_a_newer_one(url: str) -> None:
    state = SharedState(url)
    old = state.lease("writer", ttl=5)
    assert old.acquire()
    old.fenced_set("k", 1)
    old.release()

    def newer_writes() -> None:
        new = state.lease("writer", ttl=5)
        assert new.acquire(1)
        new.fenced_set("k", 2)
        new.release()

    _in_thread(newer_writes)
    with pytest.raises(FencedError):
        old.fenced_set("k", 3)
    assert old.fenced_get("k") == 2
    state.close()


def test_an_async_lease_is_exclusive_and_fenced(url: str) -> None:
    async def main() -> None:
        state = AsyncSharedState(url)
        first, second = state.lease("a", ttl=5), state.lease("a", ttl=5)
        assert await first.acquire()
        assert await second.acquire(0.2) is False
        assert (await second.holder() or {}).get("token") == first.token
        await first.fenced_set("k", "first")
        await first.release()
        async with second.hold(2) as held:
            assert held.token is not None
            assert first.token is not None
            assert held.token > first.token
            await held.fenced_set("k", "second")
        with pytest.raises(FencedError):
            await first.fenced_set("k", "late")
        assert await first.fenced_get("k") == "second"
        await state.aclose()

    asyncio.run(main())


def test_an_async_lease_released_by_a_cancelled_task_is_released(url: str) -> None:
    """A worker stopping cancels its tasks: a release under way still frees
    the lease (and its connection), then the cancellation goes on."""

    async def main() -> bool:
        state = AsyncSharedState(url)
        lease = state.lease("stopping", ttl=5)
        assert await lease.acquire()

        async def release() -> None:
            await lease.release()

        task = asyncio.create_task(release())
        await asyncio.sleep(0)  # the release has started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        other = state.lease("stopping", ttl=5)
        taken = await other.acquire(0)
        await other.release()
        await state.aclose()
        return taken

    assert asyncio.run(main()) is True


# -- run_once ------------------------------------------------------------------------------


def _start_worker(url: str, how: str, go: Any, out: Any) -> None:
    os.environ["SHARED_STATE_START"] = "deployment-1"
    state = SharedState(url)

    def task() -> None:
        state.incr("ran")
        time.sleep(0.5)
        if how == "fail":
            raise RuntimeError("the migration failed")
        if how == "die":
            os.kill(os.getpid(), signal.SIGKILL)

    # A short ttl only where the runner dies (Redis frees its lease then): a
    # runner of a loaded machine that stalls past it would lose it midway.
    ttl = 1.5 if how == "die" else 30.0
    go.wait(30)
    try:
        out.put(
            ("ran" if state.run_once("warm", task, wait=20, ttl=ttl) else "waited", os.getpid())
        )
    except RunOnceFailed as exc:
        out.put((f"failed: {exc}", os.getpid()))


def _run_workers(url: str, how: str, n: int) -> list[str]:
    go, out = SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_start_worker, args=(url, how, go, out)) for _ in range(n)]
    for proc in procs:
        proc.start()
    go.set()
    results = []
    join_or_kill(procs, 40)
    while not out.empty():
        results.append(out.get(timeout=5)[0])
    return results


@pytest.mark.stress
def test_run_once_runs_in_one_worker_and_the_others_wait(url: str) -> None:
    results = _run_workers(url, "ok", 6)
    assert sorted(results) == ["ran"] + ["waited"] * 5
    state = SharedState(url)
    assert state.get("ran") == 1
    # A worker started later in the same start of the deployment (a
    # recycled one) does not run it again.
    assert _run_workers(url, "ok", 1) == ["waited"]
    assert state.get("ran") == 1
    state.close()


def test_a_failed_start_up_task_is_reported_to_every_worker(url: str) -> None:
    results = _run_workers(url, "fail", 4)
    assert len(results) == 4
    assert all(r.startswith("failed: ") and "the migration failed" in r for r in results)


@pytest.mark.stress
def test_a_runner_that_dies_mid_run_leaves_the_task_to_a_waiter(url: str, engine: str) -> None:
    results = _run_workers(url, "die", 3)
    # Every runner dies: each waiter in turn finds the run unfinished.
    assert results == [], results
    state = SharedState(url)
    assert state.get("ran") == 3
    state.close()


def test_run_once_bounds_the_wait(url: str) -> None:
    state = SharedState(url)
    started, finish = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        finish.wait(30)  # runs until the waits below are checked, however slow they are

    runner = threading.Thread(target=lambda: state.run_once("slow", slow))
    runner.start()
    try:
        assert started.wait(10)
        other = SharedState(url)
        other.get("warm-up")  # connected first: only the wait is timed
        t0 = time.monotonic()
        with pytest.raises(LockTimeout):
            other.run_once("slow", slow, wait=0.3)
        assert time.monotonic() - t0 < 2.0
        calls: list[int] = []
        assert other.run_once("slow", lambda: calls.append(1), wait=0) is False
        assert calls == []  # it went on without running it: the first worker does
    finally:
        finish.set()
    runner.join(10)
    assert other.run_once("slow", slow) is False
    with pytest.raises(TypeError):
        other.run_once("x", "not callable")  # type: ignore[arg-type]
    state.close()
    other.close()


def test_a_cancelled_async_run_once_lets_its_thread_finish_first(url: str) -> None:
    """A plain function runs in a thread, which a cancellation cannot stop:
    the lease is held until it ends and its outcome is recorded, so a
    waiting worker neither runs it beside it nor again."""
    runs: list[int] = []
    # The thread ends when told, not after a sleep: the cancellation always
    # comes mid-run, however late a loaded machine runs the test's steps.
    finish = threading.Event()

    def migrate() -> None:
        runs.append(1)
        finish.wait(30)
        runs.append(-1)

    async def main() -> bool:
        state, other = AsyncSharedState(url), AsyncSharedState(url)
        try:
            first = asyncio.create_task(state.run_once("migrate", migrate, wait=None))
            deadline = time.monotonic() + 30
            while not runs and time.monotonic() < deadline:  # the state server starts
                await asyncio.sleep(0.02)
            assert runs == [1]
            waiter = asyncio.create_task(other.run_once("migrate", migrate, wait=30))
            await asyncio.sleep(0.1)
            first.cancel()
            await asyncio.sleep(0.3)  # time for a cancellation that does not wait to end it
            assert not first.done(), first  # it waits for the thread ...
            finish.set()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(first, 30)
            assert runs == [1, -1]  # ... and goes on once the thread ended
            ran = await asyncio.wait_for(waiter, 30)
        finally:
            finish.set()
        await state.aclose()
        await other.aclose()
        return ran

    assert asyncio.run(main()) is False  # done by the cancelled one: not run again
    assert runs == [1, -1]


def test_async_run_once_awaits_a_coroutine(url: str) -> None:
    async def main() -> tuple[bool, bool]:
        state, other = AsyncSharedState(url), AsyncSharedState(url)
        calls: list[int] = []

        async def task() -> None:
            await asyncio.sleep(0.1)
            calls.append(1)

        results = await asyncio.gather(state.run_once("t", task), other.run_once("t", task))
        assert calls == [1]
        await state.aclose()
        await other.aclose()
        return results[0], results[1]

    assert sorted(asyncio.run(main())) == [False, True]


def test_each_start_of_the_deployment_runs_it_once(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starts A, B, then A again (a worker of A restarted after B wrote):
    A's run is not repeated."""
    state = SharedState(url)
    ran: list[str] = []
    for start, expected in [("A", True), ("A", False), ("B", True), ("A", False)]:
        monkeypatch.setenv("SHARED_STATE_START", start)
        assert state.run_once("migrate", partial(ran.append, start)) is expected, start
    assert ran == ["A", "B"]
    state.close()


def test_async_run_once_runs_a_plain_function_off_the_loop(url: str) -> None:
    async def main() -> list[bool]:
        state = AsyncSharedState(url)
        on_loop: list[bool] = []

        def task() -> None:
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:
                on_loop.append(False)

        assert await state.run_once("plain", task) is True
        await state.aclose()
        return on_loop

    assert asyncio.run(main()) == [False]


@pytest.mark.parametrize(
    ("cmd", "program"),
    [
        (["/srv/venv/bin/gunicorn", "-w", "4", "app:app"], "gunicorn"),
        (["python", "-u", "-m", "gunicorn", "app:app"], "gunicorn"),
        (["/usr/bin/python3.11", "-X", "dev", "-W", "error", "-m", "uvicorn"], "uvicorn"),
        (["python3", "-O", "/srv/venv/bin/hypercorn", "app:app"], "hypercorn"),
        (["gunicorn: master [app:app]"], "gunicorn:"),
        (["python", "manage.py", "gunicorn"], "manage.py"),
        (["python", "-c", "import gunicorn"], ""),
        (["python", "-m"], ""),
        ([], ""),
    ],
)
def test_the_server_is_found_in_its_command_line(cmd: list[str], program: str) -> None:
    from shared_core._once import _program

    assert _program(cmd) == program


def test_the_start_of_a_deployment_is_its_server_master(tmp_path: Path) -> None:
    """Workers of one master share a start; another master is another start;
    a process with no server as its parent is a start of its own."""
    child = "from shared_core import deployment_start as d; print(d())"
    master = (
        "import subprocess, sys\n"
        "for _ in range(2):\n"
        f"    out = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True,"
        " text=True, check=True)\n"
        "    print(out.stdout.strip())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SHARED_STATE_START"}

    def starts(name: str) -> list[str]:
        # A master run as ``python .../gunicorn``, as gunicorn's script is.
        (tmp_path / name).write_text(master)
        cmd = [sys.executable, str(tmp_path / name)]
        return subprocess.run(
            cmd, capture_output=True, text=True, check=True, env=env
        ).stdout.split()

    first, second = starts("gunicorn"), starts("gunicorn")
    assert first[0] == first[1]
    assert second[0] == second[1]
    assert first[0] != second[0]
    alone = starts("manage.py")
    assert alone[0] != alone[1]
    assert deployment_start() != first[0]
    # Workers started by multiprocessing (uvicorn's, ``fastapi run``'s): their
    # parent is the master, whatever it is called.
    spawner = tmp_path / "serve.py"
    spawner.write_text(
        "import multiprocessing as mp\n"
        "from shared_core import deployment_start\n"
        "def work(q):\n"
        "    q.put(deployment_start())\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n"
        "    q = ctx.Queue()\n"
        "    ps = [ctx.Process(target=work, args=(q,)) for _ in range(2)]\n"
        "    [p.start() for p in ps]\n"
        "    print(q.get(timeout=60)); print(q.get(timeout=60))\n"
        "    [p.join() for p in ps]\n"
    )
    out = subprocess.run([sys.executable, str(spawner)], capture_output=True, text=True,
                         check=True, env=env)  # fmt: skip
    spawned = out.stdout.split()
    assert len(spawned) == 2
    assert spawned[0] == spawned[1]


# -- periodic jobs --------------------------------------------------------------------------

INTERVAL = 0.25


def _job_worker(url: str, seconds: float, shared: bool, ready: Any, go: Any) -> None:
    state = SharedState(url)
    state.get("connect")
    ready.put(os.getpid())

    def tick(occurrence: Occurrence) -> None:
        state.incr(f"ran:{occurrence.slot}")

    if shared:
        scheduler = Scheduler(state)
        scheduler.add(tick, INTERVAL, name="tick")
        go.wait(30)
        began = time.time()
        scheduler.start()
        time.sleep(seconds)
        scheduler.stop()
    else:  # what each worker does on its own: a loop of its own
        go.wait(30)
        began = time.time()
        end = began + seconds
        while (now := time.time()) < end:
            time.sleep(INTERVAL - now % INTERVAL)
            tick(Occurrence("tick", int(time.time() // INTERVAL), time.time()))
    ready.put((began, time.time()))


def _run_jobs(
    url: str, shared: bool, seconds: float = 3.0, n: int = 4
) -> tuple[Counter[int], float]:
    """The runs of each slot, and the seconds from the first worker's start
    to the last one's stop."""
    ready, go = SPAWN.Queue(), SPAWN.Event()
    args = (url, seconds, shared, ready, go)
    procs = [SPAWN.Process(target=_job_worker, args=args) for _ in range(n)]
    for proc in procs:
        proc.start()
    for _ in procs:  # every worker imported and connected
        ready.get(timeout=30)
    go.set()
    try:
        windows = [ready.get(timeout=seconds + 30) for _ in procs]
    finally:
        join_or_kill(procs, 30)
    assert [proc.exitcode for proc in procs] == [0] * n
    state = SharedState(url)
    found = state.get_many(state.keys("ran:"))
    state.close()
    elapsed = max(end for _, end in windows) - min(began for began, _ in windows)
    return Counter({int(k.split(":")[1]): v for k, v in found.items()}), elapsed


@pytest.mark.stress
def test_a_periodic_job_runs_each_occurrence_once_across_workers(url: str) -> None:
    runs, elapsed = _run_jobs(url, shared=True)
    assert set(runs.values()) == {1}, runs
    # A slot every worker missed (a loaded machine) is skipped, by design: the
    # lower bound is loose, the job only has to keep firing. The upper one
    # counts the slots of the time any worker ran (a loaded machine starts
    # and stops the workers apart).
    assert 3.0 / INTERVAL / 2 <= len(runs) <= elapsed / INTERVAL + 2, (runs, elapsed)
    print(f"4 workers, {len(runs)} occurrences in {elapsed:.2f} s, each once")


@pytest.mark.stress
def test_without_the_scheduler_each_worker_runs_every_occurrence(url: str) -> None:
    runs, _ = _run_jobs(url, shared=False)
    assert max(runs.values()) == 4, runs
    assert sum(runs.values()) >= 3 * len(runs), runs  # about 4 runs each


@pytest.mark.parametrize("overlap", [False, True])
def test_occurrences_never_overlap_unless_asked(url: str, overlap: bool) -> None:
    state = SharedState(url)
    states = [SharedState(url) for _ in range(3)]
    schedulers = [Scheduler(s) for s in states]
    seen: list[int] = []

    def slow() -> None:
        seen.append(state.incr("running"))
        time.sleep(0.6)
        state.incr("running", -1)

    began = time.monotonic()
    for scheduler in schedulers:
        scheduler.add(slow, 0.2, name="slow", overlap=overlap)
        scheduler.start()
    time.sleep(2.5)
    for scheduler in schedulers:
        scheduler.stop()
    elapsed = time.monotonic() - began  # 2.5 s, more on a loaded machine
    wait_for(lambda: state.get("running") == 0, 5, "the last run to end")
    assert seen, seen
    if overlap:
        assert max(seen) >= 2, seen  # a run every 0.2 s, each 0.6 s long
    else:
        assert max(seen) == 1, seen
        # A slot every 0.2 s, most skipped while one runs: a run per 0.6 s at most.
        assert len(seen) <= elapsed / 0.6 + 1, (seen, elapsed)
    for each in [state, *states]:
        each.close()


def test_a_scheduler_started_from_many_threads_runs_once(url: str) -> None:
    state = SharedState(url)
    scheduler = Scheduler(state)
    scheduler.add(lambda: None, 1, name="noop")
    threads = [threading.Thread(target=scheduler.start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    loops = [t for t in threading.enumerate() if t.name == "shared_core scheduler"]
    assert len(loops) == 1, loops
    scheduler.stop()
    assert scheduler.running is False
    state.close()


def test_a_restarted_scheduler_counts_its_own_threads(url: str) -> None:
    """Stopped and started again while a run goes on (one thread): the old run
    gives its thread back to the old pool, so the new one still leaves the
    slots it has no thread for to other workers, instead of queueing them."""
    state = SharedState(url)
    scheduler = Scheduler(state, max_workers=1)
    late: list[float] = []
    started = threading.Event()

    @scheduler.every(0.2, name="slow", overlap=True)
    def slow(occurrence: Occurrence) -> None:
        late.append(time.time() - occurrence.due)
        started.set()
        time.sleep(2.5)

    state.get("warm-up")  # connected before the first slot: only the restart is timed
    try:
        scheduler.start()
        assert started.wait(10)
        scheduler.stop()
        before = len(late)
        scheduler.start()
        time.sleep(5.5)
    finally:
        scheduler.stop()
    time.sleep(2.6)  # the runs end
    after = late[before:]
    # A queued occurrence would start almost a whole run (2.5 s) late; a
    # loaded machine starts one late by a fraction of that. The run before the
    # restart is not the point (a loaded machine started it 2.1 s late, connecting).
    assert after, late
    assert max(after) < 1.5, late
    state.close()


def test_the_scheduler_checks_its_jobs(url: str) -> None:
    scheduler = Scheduler(SharedState(url))
    with pytest.raises(ValueError):
        scheduler.add(lambda: None, 0, name="zero")
    with pytest.raises(TypeError):
        scheduler.add("nope", 1)  # type: ignore[arg-type]
    scheduler.add(lambda: None, 1, name="a")
    with pytest.raises(ValueError):
        scheduler.add(lambda: None, 1, name="a")


def test_async_schedulers_share_their_occurrences(url: str) -> None:
    """Three async schedulers on one loop, as three workers: each occurrence
    runs once. A stalled loop skips slots by design, so the test waits for
    enough occurrences (bounded) rather than counting those of a fixed time."""
    wanted = 6

    async def main() -> Counter[int]:
        counts: Counter[int] = Counter()
        schedulers, states = [], [AsyncSharedState(url) for _ in range(3)]
        for state in states:
            scheduler = AsyncScheduler(state)

            @scheduler.every(INTERVAL, name="tick")
            async def tick(occurrence: Occurrence) -> None:
                counts[occurrence.slot] += 1

            schedulers.append(scheduler)
            scheduler.start()
        deadline = time.monotonic() + 30
        while len(counts) < wanted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(INTERVAL / 2)  # a second run of the last slot would show
        for scheduler in schedulers:
            await scheduler.stop()
        for state in states:
            await state.aclose()
        return counts

    counts = asyncio.run(main())
    assert set(counts.values()) == {1}, counts
    assert len(counts) >= wanted, counts
