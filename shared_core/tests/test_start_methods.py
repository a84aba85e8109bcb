"""The state from child processes under every start method: fork, spawn, forkserver.

gunicorn forks its workers, uvicorn and hypercorn spawn them, and Python 3.14
makes ``forkserver`` the default on Linux, so user code (and servers that take
the default) may use any of the three.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest

from conftest import server_processes
from shared_core import AsyncSharedState, SharedState

METHODS = ["fork", "spawn", "forkserver"]
CHILDREN = 4
EACH = 500


def _incr_many(env: dict[str, str], url: str, n: int, out: Any) -> None:
    os.environ.update(env)
    state = SharedState(url)
    out.put([state.incr("n") for _ in range(n)])


def _incr_async(env: dict[str, str], url: str, n: int, out: Any) -> None:
    import asyncio

    os.environ.update(env)

    async def main() -> list[int]:
        state = AsyncSharedState(url)
        try:
            return [await state.incr("n") for _ in range(n)]
        finally:
            await state.aclose()

    out.put(asyncio.run(main()))


def _start_and_report(env: dict[str, str], url: str, out: Any) -> None:
    os.environ.update(env)
    state = SharedState(url)
    state.set("from", multiprocessing.current_process().name)
    out.put((state.incr("n"), state.info()["pid"]))


def _run(ctx: Any, target: Any, args: tuple[Any, ...], n: int, **kwargs: Any) -> list[Any]:
    """Start ``n`` children of ``ctx`` and return what each put on the queue."""
    # A forkserver child has the environment of the forkserver, which the
    # first test to use it started, not this test's private runtime directory.
    env = {"XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"]}
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(env, *args, out), **kwargs) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"{p} exited with {p.exitcode}"
    return results


@pytest.mark.parametrize("method", METHODS)
def test_4_children_x_500_incr_is_exactly_2000(url: str, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    parent = SharedState(url)
    # Connected before the children start: a forked child must not reuse this.
    parent.set("ready", True)
    seen = [n for values in _run(ctx, _incr_many, (url, EACH), CHILDREN) for n in values]
    assert sorted(seen) == list(range(1, CHILDREN * EACH + 1))
    assert parent.get("n") == CHILDREN * EACH


@pytest.mark.parametrize("method", METHODS)
def test_async_children_count_exactly(url: str, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    seen = [n for values in _run(ctx, _incr_async, (url, 200), 2) for n in values]
    assert sorted(seen) == list(range(1, 401))


@pytest.mark.parametrize("method", METHODS)
def test_a_daemonic_child_creates_the_state_itself(app: str, manager_url: str, method: str) -> None:
    # Nothing in the parent has touched the state: the child starts the server,
    # daemonic as hypercorn's workers are (multiprocessing forbids them children).
    ctx = multiprocessing.get_context(method)
    name = f"child-{method}"
    ((count, server_pid),) = _run(ctx, _start_and_report, (manager_url,), 1, daemon=True, name=name)
    assert count == 1
    servers = server_processes(app)
    assert [s.pid for s in servers] == [server_pid], "the child's server must outlive it"
    state = SharedState(manager_url)
    assert state.get("from") == name
    assert state.incr("n") == 2
