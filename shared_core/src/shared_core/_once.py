"""Run a start-up function in exactly one worker per start of the deployment.

One start of the deployment is the life of the app server's master process:
gunicorn's arbiter, hypercorn's, uvicorn's or granian's parent process, from
which it starts (and restarts) its workers. Workers restarted by the master
(``--max-requests``, a crash, ``SIGHUP``) belong to the same start, so they do
not run the function again; restarting the master is a new start. A process
whose parent is not one of those servers (``uvicorn app:app`` with no
``--workers``, ``flask run``) is a deployment of its own. Set
``SHARED_STATE_START`` (say, to a release id) to choose the start yourself,
for example to run once across several machines that share Redis.

The worker that runs the function holds a lease while it runs; the others
wait for the outcome. If that worker dies mid-run, its lease is freed (at
once on the embedded engine and PostgreSQL, after the lease's ttl on Redis)
and the next waiter runs the function again: at least once for a run that
crashed. Otherwise exactly once, unless the runner loses its lease while it
runs and does not die: frozen past the ttl on Redis, or cut from the state
(a restart of the state server) long enough for a waiter to take over.

Keys used: ``shared_core:once:NAME:START`` (the outcome of a start, kept
90 days after the last worker read it) and the leases
``shared_core:lease:once:NAME:START``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import multiprocessing
import os
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._checks import check_key, check_timeout
from ._errors import LockTimeout, RunOnceFailed, StateError

if TYPE_CHECKING:
    from ._aio import AsyncSharedState
    from ._state import SharedState

log = logging.getLogger("shared_core.once")

PREFIX = "shared_core:once:"
SERVERS = ("gunicorn", "hypercorn", "uvicorn", "granian", "fastapi")
KEEP = 90 * 86400.0  # seconds an outcome is kept, from the last worker that read it
ENV = "SHARED_STATE_START"
SLICE = 0.2  # seconds of one wait for the runner's lease


def deployment_start() -> str:
    """The id of this start of the deployment (see the module's doc)."""
    if chosen := os.environ.get(ENV):
        return chosen
    parent = os.getppid()
    # A worker started by multiprocessing (uvicorn's, ``fastapi run``'s) or
    # forked by a server master; otherwise a process of its own.
    spawned = multiprocessing.parent_process() is not None
    master = parent if spawned or _is_server(parent) else os.getpid()
    started = _started(master)
    if started == "?":
        _warn_no_proc()
    return f"{socket.gethostname()}:{master}:{started}"


@functools.cache
def _warn_no_proc() -> None:
    log.warning(
        "no /proc here: a worker cannot find its server's master, so each worker "
        "counts as a start of its own; set %s (a release id, say) to run "
        "start-up tasks once",
        ENV,
    )


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_server(pid: int) -> bool:
    return any(_program(_cmdline(pid)).startswith(name) for name in SERVERS)


def _program(cmd: list[str]) -> str:
    """What ``cmd`` runs: its program, or for Python the module (``-m``) or
    script after the interpreter's options; never another argument."""
    if not cmd:
        return ""
    # A title set with setproctitle ("gunicorn: master [app]") is one word.
    first = cmd[0] if os.path.exists(cmd[0]) else cmd[0].split(" ")[0]
    program = Path(first).name
    if not program.startswith("python"):
        return program
    words = iter(cmd[1:])
    for word in words:
        if word == "-m":
            return next(words, "")
        if word in ("-X", "-W", "--check-hash-based-pycs"):  # an option's value follows
            next(words, None)
        elif word == "-c" or not word.startswith("-"):
            return "" if word == "-c" else Path(word).name
    return ""


def _started(pid: int) -> str:
    """When ``pid`` started (with the boot it started in), so a reused pid is
    a new start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"
    # Field 22, counted after the command name (which may hold spaces).
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def _outcome(record: Any, start: str, name: str) -> bool:
    """True if this start's run is done; RunOnceFailed if it failed; False if
    it is still to run (or running)."""
    if not isinstance(record, dict) or record.get("start") != start:
        return False
    if record.get("status") == "done":
        return True
    if record.get("status") == "failed":
        raise RunOnceFailed(
            f"run_once {name!r} failed in pid {record.get('pid')}: {record.get('error')}"
        )
    return False


def _failed(name: str, exc: Exception) -> RunOnceFailed:
    return RunOnceFailed(
        f"run_once {name!r} failed in pid {os.getpid()}: {type(exc).__name__}: {exc}"
    )


def _status(start: str, status: str, error: BaseException | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "start": start,
        "status": status,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "at": time.time(),
    }
    if error is not None:
        record["error"] = f"{type(error).__name__}: {error}"
    return record


def _check(name: str, func: object, wait: object, ttl: object) -> tuple[float | None, float]:
    check_key(name)
    if not callable(func):
        raise TypeError(f"run_once needs a callable, not {func!r}")
    timeout = check_timeout(wait)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ValueError(f"ttl must be a number of seconds > 0, not {ttl!r}")
    return timeout, float(ttl)


def _write(attempt: Callable[[], Any], give_up_at: float) -> None:
    """Write an outcome, tried again for a while: a waiter that found none
    would run the function a second time."""
    pause = 0.05
    while True:
        try:
            attempt()
            return
        except StateError:
            if time.monotonic() + pause >= give_up_at:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


async def _awrite(attempt: Callable[[], Awaitable[Any]], give_up_at: float) -> None:
    """The async twin of :func:`_write`."""
    pause = 0.05
    while True:
        try:
            await attempt()
            return
        except StateError:
            if time.monotonic() + pause >= give_up_at:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


def _timed_out(name: str, timeout: float | None, deadline: float | None) -> bool:
    """Whether to stop waiting: False for ``wait=0``; LockTimeout past ``wait``."""
    if deadline is None or time.monotonic() < deadline:
        return False
    if timeout == 0:
        return True
    raise LockTimeout(f"run_once {name!r}: not done within {timeout:g}s")


def _slice(deadline: float | None) -> float:
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    return SLICE if left is None else min(SLICE, left)


def run_once(
    state: SharedState,
    name: str,
    func: Callable[[], Any],
    *,
    wait: float | None = 60.0,
    ttl: float = 30.0,
) -> bool:
    """Call ``func()`` in one worker of this start of the deployment; the
    other workers wait for it to finish (at most ``wait`` seconds, then
    LockTimeout; 0: do not wait; None: as long as it takes). Return True in
    the worker that ran it. ``ttl`` is the runner's lease.

    RunOnceFailed, in every worker of this start, if ``func`` raised (in the
    worker that ran it, with the original exception as its ``__cause__``)."""
    timeout, ttl = _check(name, func, wait, ttl)
    start = deployment_start()
    key = f"{PREFIX}{name}:{start}"
    deadline = None if timeout is None else time.monotonic() + timeout
    lease = state.lease(f"once:{name}:{start}", ttl=ttl)
    while True:
        if _outcome(state.get(key), start, name):
            state.expire(key, KEEP)
            return False
        if lease.acquire(_slice(deadline)):
            try:
                if _outcome(state.get(key), start, name):
                    return False
                state.set(key, _status(start, "running"), ttl=KEEP)
                try:
                    func()
                except Exception as exc:
                    # Not BaseException: a worker told to stop mid-run leaves
                    # the run to the next waiter, as a crash does.
                    failed = _status(start, "failed", exc)
                    _write(partial(state.set, key, failed, ttl=KEEP), time.monotonic() + ttl)
                    raise _failed(name, exc) from exc
                done = _status(start, "done")
                _write(partial(state.set, key, done, ttl=KEEP), time.monotonic() + ttl)
                return True
            finally:
                try:
                    lease.release()
                except StateError as exc:  # it frees itself; keep the outcome
                    log.warning("run_once %r: the lease could not be released: %s", name, exc)
        if _timed_out(name, timeout, deadline):
            return False


async def _arun(
    state: AsyncSharedState,
    key: str,
    start: str,
    name: str,
    ttl: float,
    func: Callable[[], Awaitable[Any]],
) -> None:
    """Await ``func()`` (and an awaitable it returns) and record its outcome."""
    try:
        result = await func()
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        failed = _status(start, "failed", exc)
        await _awrite(partial(state.set, key, failed, ttl=KEEP), time.monotonic() + ttl)
        raise _failed(name, exc) from exc
    done = _status(start, "done")
    await _awrite(partial(state.set, key, done, ttl=KEEP), time.monotonic() + ttl)


async def arun_once(
    state: AsyncSharedState,
    name: str,
    func: Callable[[], Awaitable[Any] | Any],
    *,
    wait: float | None = 60.0,
    ttl: float = 30.0,
) -> bool:
    """The async twin of :func:`run_once`: ``func`` may be a coroutine
    function; a plain function runs in a thread, off the event loop. A thread
    cannot be stopped: a caller cancelled while it runs waits for it to end
    (and its outcome to be recorded) before the cancellation goes on, so the
    lease is held as long as ``func`` runs."""
    timeout, ttl = _check(name, func, wait, ttl)
    start = deployment_start()
    key = f"{PREFIX}{name}:{start}"
    deadline = None if timeout is None else time.monotonic() + timeout
    lease = state.lease(f"once:{name}:{start}", ttl=ttl)
    while True:
        if _outcome(await state.get(key), start, name):
            await state.expire(key, KEEP)
            return False
        if await lease.acquire(_slice(deadline)):
            try:
                if _outcome(await state.get(key), start, name):
                    return False
                await state.set(key, _status(start, "running"), ttl=KEEP)
                if inspect.iscoroutinefunction(func):
                    await _arun(state, key, start, name, ttl, func)
                    return True
                # Off the loop: blocking it would also stop the lease's renewals.
                # A thread cannot be stopped: a cancelled caller waits for it and
                # its outcome, still holding the lease, so that no waiter runs
                # it beside it, or again once it is done.
                run = asyncio.ensure_future(
                    _arun(state, key, start, name, ttl, partial(asyncio.to_thread, func))
                )
                try:
                    await asyncio.shield(run)
                except asyncio.CancelledError:
                    await asyncio.wait([run])
                    if not run.cancelled() and run.exception() is not None:
                        log.warning("run_once %r, cancelled: %s", name, run.exception())
                    raise
                return True
            finally:
                try:
                    await lease.release()
                except StateError as exc:
                    log.warning("run_once %r: the lease could not be released: %s", name, exc)
        if _timed_out(name, timeout, deadline):
            return False
