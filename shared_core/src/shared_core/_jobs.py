"""Periodic jobs that fire once per period across every worker of a deployment.

Every worker runs the same scheduler. Time is cut into slots of the job's
interval since the Unix epoch (slot ``n`` is due at ``n * interval``); when a
slot is due, each worker tries to claim it with one atomic ``add`` of
``shared_core:job:NAME:SLOT``, and only the worker whose claim succeeds runs
it. So an occurrence runs once whichever workers are alive, and the job keeps
firing when the worker that ran the last one dies: the others claim the next
slots. Workers on several machines need synchronised clocks (NTP).

At most once: an occurrence whose worker dies mid-run is not run again (it
may have had effects, such as sending mail, that a second run would repeat).
A slot every worker missed (all busy, the state unavailable) is skipped, not
caught up. With ``overlap=False`` (the default) an occurrence that finds the
previous one still running, in any worker, is skipped too: it holds a lease
while it runs. That lease is freed at once when its worker dies on the
embedded engine and PostgreSQL; on Redis it runs out after 3 intervals (at
least 1.5 s, at most 10 s), skipping the occurrences due until then.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._checks import check_key
from ._errors import StateError

if TYPE_CHECKING:
    from ._aio import AsyncSharedState
    from ._state import SharedState

log = logging.getLogger("shared_core.jobs")

PREFIX = "shared_core:job:"
MIN_CLAIM_TTL = 60.0  # a claim outlives any worker's late try at its slot
MAX_CLAIM_TTL = 86400.0
STOP_TIMEOUT = 5.0
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Occurrence:
    """One run of a job: handed to a job function that takes an argument."""

    job: str
    slot: int  # the number of the interval since the epoch
    due: float  # when it was due (``time.time()`` seconds)


@dataclass
class _Job:
    name: str
    func: Callable[..., Any]
    interval: float
    overlap: bool
    takes_occurrence: bool
    next_slot: int = 0

    @property
    def claim_ttl(self) -> float:
        return min(MAX_CLAIM_TTL, max(MIN_CLAIM_TTL, 10 * self.interval))

    @property
    def lease_ttl(self) -> float:
        # Short on Redis, where a worker killed mid-run holds it until it
        # expires (renewed while the run goes on): at most 3 slots, 10 s.
        return min(10.0, max(1.5, 3 * self.interval))


class _Plan:
    """The jobs of one scheduler and when each is next due (no I/O)."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Job] = {}

    def add(
        self, func: Callable[..., Any], seconds: float, name: str | None, overlap: bool
    ) -> None:
        if not callable(func):
            raise TypeError(f"a job is a callable, not {func!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"a job's interval is a number of seconds, not {seconds!r}")
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"a job's interval must be > 0 seconds, not {seconds!r}")
        name = check_key(name if name is not None else _qualname(func))
        if name in self.jobs:
            raise ValueError(f"a job named {name!r} is scheduled already")
        takes = bool(inspect.signature(func).parameters)
        self.jobs[name] = _Job(name, func, float(seconds), bool(overlap), takes)

    def reset(self, now: float) -> None:
        for job in self.jobs.values():
            job.next_slot = _slot(now, job.interval) + 1

    def wait(self, now: float) -> float:
        """Seconds until the next slot of any job is due."""
        due = [job.next_slot * job.interval for job in self.jobs.values()]
        return max(0.0, min(due) - now) if due else 1.0

    def due(self, now: float) -> list[tuple[_Job, Occurrence]]:
        """The occurrences due by ``now``: the current slot of each job whose
        next slot has come (missed slots are skipped, not caught up)."""
        found = []
        for job in self.jobs.values():
            if job.next_slot * job.interval <= now:
                slot = max(job.next_slot, _slot(now, job.interval))
                found.append((job, Occurrence(job.name, slot, slot * job.interval)))
                job.next_slot = slot + 1
        return found


def _slot(now: float, interval: float) -> int:
    return math.floor(now / interval + 1e-9)


def _qualname(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def _claim(occurrence: Occurrence) -> tuple[str, dict[str, Any]]:
    key = f"{PREFIX}{occurrence.job}:{occurrence.slot}"
    return key, {"pid": os.getpid(), "host": socket.gethostname(), "at": time.time()}


def _args(job: _Job, occurrence: Occurrence) -> tuple[Occurrence, ...]:
    return (occurrence,) if job.takes_occurrence else ()


class _Every:
    """The decorator both schedulers have."""

    def add(
        self, func: Callable[..., Any], seconds: float, *, name: str | None, overlap: bool
    ) -> None:
        raise NotImplementedError

    def every(
        self, seconds: float, *, name: str | None = None, overlap: bool = False
    ) -> Callable[[F], F]:
        """Decorator: run the function every ``seconds`` (see ``add``)."""

        def decorate(func: F) -> F:
            self.add(func, seconds, name=name, overlap=overlap)
            return func

        return decorate


class Scheduler(_Every):
    """Periodic jobs run by threads, once per period across the deployment.

    Start the same scheduler in every worker (in the app factory)::

        scheduler = Scheduler(state)

        @scheduler.every(60)
        def report(): ...

        scheduler.start()

    A job function takes no argument, or one :class:`Occurrence`. Jobs run
    on a pool of ``max_workers`` threads; a job that raises is logged.
    """

    def __init__(self, state: SharedState, *, max_workers: int = 4) -> None:
        if type(max_workers) is not int or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, not {max_workers!r}")
        self._state = state
        self._plan = _Plan()
        self._max_workers = max_workers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pid = 0  # of the process whose thread runs: none runs in a forked child

    def add(
        self,
        func: Callable[..., Any],
        seconds: float,
        *,
        name: str | None = None,
        overlap: bool = False,
    ) -> None:
        """Schedule ``func`` every ``seconds``, under ``name`` (default: its
        qualified name; the same in every worker). ``overlap=True`` lets an
        occurrence start while the previous one still runs."""
        if self._thread is not None:
            raise RuntimeError("add jobs before start()")
        self._plan.add(func, seconds, name, overlap)

    @property
    def running(self) -> bool:
        """Whether the scheduler's thread runs in this process (a child forked
        from a process where it ran has none: start it there again)."""
        thread = self._thread
        return thread is not None and self._pid == os.getpid() and thread.is_alive()

    def start(self) -> None:
        """Start the scheduler's thread (nothing if it runs already)."""
        with self._lock:
            if self.running:
                return
            self._stop = threading.Event()
            self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="shared_core job")
            self._pid = os.getpid()
            # Free threads of the pool: a worker with none claims nothing and
            # leaves the occurrence to another. Each start has its own count: a
            # run from before a restart gives its thread back to its own pool.
            free = threading.BoundedSemaphore(self._max_workers)
            self._thread = threading.Thread(
                target=self._loop,
                args=(self._stop, self._pool, free),
                name="shared_core scheduler",
                daemon=True,
            )
            self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop claiming occurrences (waiting at most ``timeout`` seconds for
        the scheduler's thread); those running finish on their own."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
            pool, self._pool = self._pool, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if pool is not None:
            pool.shutdown(wait=False)

    def _loop(
        self, stop: threading.Event, pool: ThreadPoolExecutor, free: threading.BoundedSemaphore
    ) -> None:
        self._plan.reset(time.time())
        while not stop.wait(self._plan.wait(time.time())):
            for job, occurrence in self._plan.due(time.time()):
                if not free.acquire(blocking=False):
                    log.info("job %s: slot %d left to another worker, all threads busy",
                             job.name, occurrence.slot)  # fmt: skip
                    continue
                submitted = False
                try:
                    key, claim = _claim(occurrence)
                    if self._state.add(key, claim, ttl=job.claim_ttl):
                        submitted = self._submit(stop, pool, free, job, occurrence)
                        if not submitted:
                            return  # stopped: the claim runs out unused
                except StateError as exc:
                    log.warning(
                        "job %s: could not claim slot %d: %s", job.name, occurrence.slot, exc
                    )
                finally:
                    if not submitted:
                        free.release()

    def _submit(
        self,
        stop: threading.Event,
        pool: ThreadPoolExecutor,
        free: threading.BoundedSemaphore,
        job: _Job,
        occurrence: Occurrence,
    ) -> bool:
        if stop.is_set():
            return False
        try:
            pool.submit(self._run, job, occurrence, free)
        except RuntimeError:  # shut down by stop() meanwhile
            return False
        return True

    def _run(self, job: _Job, occurrence: Occurrence, free: threading.BoundedSemaphore) -> None:
        try:
            if job.overlap:
                job.func(*_args(job, occurrence))
                return
            lease = self._state.lease(f"job:{job.name}", ttl=job.lease_ttl)
            if not lease.acquire(0):
                log.info(
                    "job %s: slot %d skipped, the previous run goes on", job.name, occurrence.slot
                )
                return
            try:
                job.func(*_args(job, occurrence))
            finally:
                lease.release()
        except Exception:
            log.exception("job %s failed (slot %d)", job.name, occurrence.slot)
        finally:
            free.release()


class AsyncScheduler(_Every):
    """The async twin of :class:`Scheduler`: jobs are coroutine functions
    (or plain functions, run in a thread) on the event loop.

    In Quart or Starlette/FastAPI, let the integration run it in every worker::

        background_task(app, scheduler.run)
    """

    def __init__(self, state: AsyncSharedState) -> None:
        self._state = state
        self._plan = _Plan()
        self._task: asyncio.Task[None] | None = None
        self._running = False

    def add(
        self,
        func: Callable[..., Awaitable[Any] | Any],
        seconds: float,
        *,
        name: str | None = None,
        overlap: bool = False,
    ) -> None:
        """See :meth:`Scheduler.add`."""
        if self._running:
            raise RuntimeError("add jobs before run()")
        self._plan.add(func, seconds, name, overlap)

    async def run(self) -> None:
        """Claim and run occurrences until cancelled; then cancel the running
        ones and wait for them (at most a few seconds)."""
        running: set[asyncio.Task[None]] = set()
        self._plan.reset(time.time())
        self._running = True
        try:
            while True:
                await asyncio.sleep(self._plan.wait(time.time()))
                for job, occurrence in self._plan.due(time.time()):
                    try:
                        key, claim = _claim(occurrence)
                        if not await self._state.add(key, claim, ttl=job.claim_ttl):
                            continue
                    except StateError as exc:
                        log.warning(
                            "job %s: could not claim slot %d: %s", job.name, occurrence.slot, exc
                        )
                        continue
                    task = asyncio.create_task(self._run(job, occurrence), name=f"job {job.name}")
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            self._running = False
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=STOP_TIMEOUT)

    def start(self) -> asyncio.Task[None]:
        """Run :meth:`run` as a task of the running loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="shared_core scheduler")
        return self._task

    async def stop(self) -> None:
        """Cancel the task :meth:`start` made and wait for it (at most
        ``2 * STOP_TIMEOUT`` seconds)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait(), not await: a cancellation of the caller still reaches it.
            # run() waits at most STOP_TIMEOUT for its running occurrences.
            await asyncio.wait([task], timeout=2 * STOP_TIMEOUT)

    async def _call(self, job: _Job, occurrence: Occurrence) -> None:
        if inspect.iscoroutinefunction(job.func):
            await job.func(*_args(job, occurrence))
            return
        # A plain function must not block the loop. A thread cannot be
        # cancelled: a cancelled run waits for it (bounded), so that its
        # lease is not given up while it still runs.
        thread = asyncio.ensure_future(asyncio.to_thread(job.func, *_args(job, occurrence)))
        try:
            result = await asyncio.shield(thread)
        except asyncio.CancelledError:
            await asyncio.wait([thread], timeout=STOP_TIMEOUT)
            raise
        if inspect.isawaitable(result):
            await result

    async def _run(self, job: _Job, occurrence: Occurrence) -> None:
        try:
            if job.overlap:
                await self._call(job, occurrence)
                return
            lease = self._state.lease(f"job:{job.name}", ttl=job.lease_ttl)
            if not await lease.acquire(0):
                log.info(
                    "job %s: slot %d skipped, the previous run goes on", job.name, occurrence.slot
                )
                return
            try:
                await self._call(job, occurrence)
            finally:
                await lease.release()
        except Exception:
            log.exception("job %s failed (slot %d)", job.name, occurrence.slot)
