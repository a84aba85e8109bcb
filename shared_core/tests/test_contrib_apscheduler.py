"""shared_core.contrib.apscheduler: 4 worker processes, each with its own
scheduler, run every fire of a job once, on every engine; BackgroundScheduler,
AsyncIOScheduler and Flask-APScheduler; interval, date and cron triggers.

Each worker also runs a control job, the same but on a plain executor: it runs
in every worker, which shows what the shared executor prevents.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from apscheduler.events import (  # type: ignore[import-untyped]
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    JobEvent,
)
from apscheduler.executors.asyncio import AsyncIOExecutor  # type: ignore[import-untyped]
from apscheduler.executors.pool import ThreadPoolExecutor  # type: ignore[import-untyped]
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]
from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]

from conftest import join_or_kill
from shared_core import AsyncSharedState, SharedState
from shared_core.contrib.apscheduler import MARGIN, SharedExecutor
from shared_core.testing import IsolatedState, wait_for

SPAWN = multiprocessing.get_context("spawn")
WORKERS = 4
INTERVAL = 0.25  # seconds between two fires of the interval jobs
RUN = 3.0  # seconds each worker's scheduler runs
STAGGER = 0.037  # worker i starts i * STAGGER late: the workers fire out of phase
GRACE = 30  # misfire_grace_time: a loaded test machine delays fires, never drops them


# --- what the workers run ---------------------------------------------------------

_states: dict[str, SharedState] = {}


def _state(url: str) -> SharedState:
    if url not in _states:
        _states[url] = SharedState(url)
    return _states[url]


def record(url: str, prefix: str = "") -> None:
    """A job: count its run (``PREFIX:runs``)."""
    _state(url).incr(f"{prefix}runs")


def slot_recorder(url: str, job_id: str, length: float) -> Callable[[JobEvent], None]:
    """A listener counting each run of ``job_id`` by the slot of its scheduled
    time (``ran:N``); the job itself cannot tell which fire it is running for."""

    def on_executed(event: JobEvent) -> None:
        if event.job_id == job_id:
            slot = math.floor(event.scheduled_run_time.timestamp() / length)
            _state(url).incr(f"ran:{slot}")

    return on_executed


def _wait_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def _run(
    scheduler: Any,
    start_at: float,
    stop_at: float,
    out: Any,
    until: Callable[[], bool] | None = None,
) -> None:
    """Run ``scheduler`` from ``start_at`` to ``stop_at`` (and, if given, until
    ``until()``), then let the runs in flight end before shutting it down.
    Reports when it started and paused (not when the shutdown, slow on a
    loaded machine, ended)."""
    _wait_until(start_at)
    started = time.time()
    scheduler.start()
    _wait_until(stop_at)
    if until is not None:
        wait_for(until, 30, "the scheduler to submit what it had to")
    scheduler.pause()
    paused = time.time()
    time.sleep(0.3)
    scheduler.shutdown(wait=True)
    out.put((os.getpid(), started, paused))


def background_worker(url: str, i: int, ready: Any, go: Any, out: Any) -> None:
    state = _state(url)
    scheduler = BackgroundScheduler(
        executors={"default": SharedExecutor(state), "local": ThreadPoolExecutor()}
    )
    scheduler.add_job(
        record, "interval", seconds=INTERVAL, args=[url], id="tick", misfire_grace_time=GRACE
    )
    scheduler.add_job(
        record, "interval", seconds=INTERVAL, args=[url, "control:"], id="control",
        executor="local", misfire_grace_time=GRACE,
    )  # fmt: skip
    scheduler.add_listener(slot_recorder(url, "tick", INTERVAL), EVENT_JOB_EXECUTED)
    state.get("warm-up")  # connected (the server started) before the clock runs
    ready.put(i)
    start_at, stop_at = go.get(timeout=120)
    _run(scheduler, start_at + i * STAGGER, stop_at, out)


def asyncio_worker(url: str, i: int, ready: Any, go: Any, out: Any) -> None:
    async def main() -> None:
        astate = AsyncSharedState(url)

        async def tick() -> None:
            await astate.incr("runs")

        async def control() -> None:
            await astate.incr("control:runs")

        # No inner executor given: the scheduler's own default, an AsyncIOExecutor.
        shared, local = SharedExecutor(_state(url)), AsyncIOExecutor()
        scheduler = AsyncIOScheduler(executors={"default": shared, "local": local})
        scheduler.add_job(tick, "interval", seconds=INTERVAL, id="tick", misfire_grace_time=GRACE)
        scheduler.add_job(
            control,
            "interval",
            seconds=INTERVAL,
            id="control",
            executor="local",
            misfire_grace_time=GRACE,
        )
        scheduler.add_listener(slot_recorder(url, "tick", INTERVAL), EVENT_JOB_EXECUTED)
        await astate.get("warm-up")
        _state(url).get("warm-up")
        ready.put(i)
        loop = asyncio.get_running_loop()
        start_at, stop_at = await loop.run_in_executor(None, go.get, True, 120)
        await asyncio.sleep(start_at + i * STAGGER - time.time())
        started = time.time()
        scheduler.start()
        await asyncio.sleep(stop_at - time.time())
        scheduler.pause()
        paused = time.time()
        # The runs in flight end (shutdown cancels them, dropping a claimed
        # fire): waited for, as a loaded machine may take a while.
        inner = shared.inner
        assert inner is not None  # made at start
        deadline = time.monotonic() + 30
        while any(e._instances.values() for e in (inner, local)):
            assert time.monotonic() < deadline, "runs still in flight after 30 s"
            await asyncio.sleep(0.02)
        scheduler.shutdown()
        await asyncio.sleep(0.05)  # AsyncIOScheduler shuts down in a callback of the loop
        assert not scheduler.running
        await astate.aclose()
        out.put((os.getpid(), started, paused))

    asyncio.run(main())


def flask_worker(url: str, i: int, ready: Any, go: Any, out: Any) -> None:
    from flask import Flask
    from flask_apscheduler import APScheduler  # type: ignore[import-untyped]

    app = Flask(__name__)
    app.config["SCHEDULER_EXECUTORS"] = {
        "default": SharedExecutor(_state(url)),
        "local": {"type": "threadpool"},
    }
    job = {"func": f"{__name__}:record", "trigger": "interval", "seconds": INTERVAL}
    app.config["SCHEDULER_JOBS"] = [
        {**job, "id": "tick", "args": [url], "misfire_grace_time": GRACE},
        {**job, "id": "control", "args": [url, "control:"], "executor": "local",
         "misfire_grace_time": GRACE},
    ]  # fmt: skip
    scheduler = APScheduler()
    scheduler.init_app(app)
    scheduler.add_listener(slot_recorder(url, "tick", INTERVAL), EVENT_JOB_EXECUTED)
    _state(url).get("warm-up")
    ready.put(i)
    start_at, stop_at = go.get(timeout=120)
    _run(scheduler, start_at + i * STAGGER, stop_at, out)


def date_worker(url: str, i: int, ready: Any, go: Any, out: Any) -> None:
    state = _state(url)
    scheduler = BackgroundScheduler(
        executors={"default": SharedExecutor(state), "local": ThreadPoolExecutor()}
    )
    state.get("warm-up")
    ready.put(i)
    start_at, stop_at = go.get(timeout=120)
    run_date = datetime.fromtimestamp(stop_at - 1.0, timezone.utc)
    # No id: APScheduler draws a random one per worker; the fire is still one.
    scheduler.add_job(record, "date", run_date=run_date, args=[url], misfire_grace_time=GRACE)
    scheduler.add_job(
        record, "date", run_date=run_date, args=[url, "control:"], executor="local",
        misfire_grace_time=GRACE,
    )  # fmt: skip
    # A worker of a loaded machine may start after stop_at: it still submits
    # both fires (a date job leaves the store once submitted) before pausing.
    _run(scheduler, start_at, stop_at, out, until=lambda: not scheduler.get_jobs())


def cron_worker(url: str, i: int, ready: Any, go: Any, out: Any) -> None:
    state = _state(url)
    scheduler = BackgroundScheduler(
        executors={"default": SharedExecutor(state), "local": ThreadPoolExecutor()}
    )
    # Each worker draws its own delay of up to a second after every even second.
    scheduler.add_job(
        record, CronTrigger(second="*/2", jitter=1), args=[url], id="tick",
        misfire_grace_time=GRACE,
    )  # fmt: skip
    scheduler.add_job(
        record, CronTrigger(second="*/2", jitter=1), args=[url, "control:"], id="control",
        executor="local", misfire_grace_time=GRACE,
    )  # fmt: skip
    scheduler.add_listener(slot_recorder(url, "tick", 2), EVENT_JOB_EXECUTED)
    state.get("warm-up")
    ready.put(i)
    start_at, stop_at = go.get(timeout=120)
    _run(scheduler, start_at, stop_at, out)


# --- the parent: start the workers together, then read what they did ----------------


def run_workers(
    target: Callable[..., None], url: str, window: Callable[[float], tuple[float, float]]
) -> tuple[float, float]:
    """Run ``WORKERS`` processes of ``target``; once all are ready, each gets
    ``window(now)``, (start, stop) as times of the epoch. Returns the earliest
    start and the latest pause of a scheduler."""
    ready, go, out = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(url, i, ready, go, out)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start_stop = window(time.time())
        for _ in procs:
            go.put(start_stop)
        results = [out.get(timeout=60) for _ in procs]
    finally:
        join_or_kill(procs, 30)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    assert len({pid for pid, _, _ in results}) == WORKERS
    return min(r[1] for r in results), max(r[2] for r in results)


def for_run(now: float) -> tuple[float, float]:
    return now + 0.2, now + 0.2 + RUN


def check_once_per_fire(state: SharedState, elapsed: float) -> int:
    """Every fire ran once, about as many as one scheduler fires in ``elapsed``,
    each of its claims ran, and the control job ran in every worker."""
    runs = state.get("runs")
    slots = state.get_many(state.keys("ran:"))
    assert set(slots.values()) == {1}, slots  # not one fire run twice
    assert runs == len(slots)
    expected = elapsed / INTERVAL
    assert 0.6 * expected <= runs <= 1.1 * expected, (runs, expected)
    assert len(state.keys("apscheduler:tick:")) == runs  # no claimed fire was dropped
    control = state.get("control:runs")
    # The same job unshared runs in every worker (a worker of a loaded machine
    # coalesces the runs it missed, so not always 4 times as often).
    assert control > 2 * runs, (control, runs)
    return int(runs)


@pytest.fixture
def shared_state(url: str) -> Iterator[SharedState]:
    state = SharedState(url)
    yield state
    state.close()


# The claim is one atomic add on every engine: the plain scheduler runs on all
# three; the others, whose difference is in APScheduler, on two (time: each
# test starts 4 processes).
TWO_ENGINES = pytest.mark.parametrize("engine", ["manager", "redis"])


def test_an_interval_job_runs_once_per_fire_in_4_background_schedulers(
    url: str, shared_state: SharedState
) -> None:
    started, stopped = run_workers(background_worker, url, for_run)
    check_once_per_fire(shared_state, stopped - started)


@TWO_ENGINES
def test_an_async_interval_job_runs_once_per_fire_in_4_asyncio_schedulers(
    url: str, shared_state: SharedState
) -> None:
    started, stopped = run_workers(asyncio_worker, url, for_run)
    check_once_per_fire(shared_state, stopped - started)


@TWO_ENGINES
def test_an_interval_job_runs_once_per_fire_in_4_flask_apscheduler_apps(
    url: str, shared_state: SharedState
) -> None:
    started, stopped = run_workers(flask_worker, url, for_run)
    check_once_per_fire(shared_state, stopped - started)


@TWO_ENGINES
def test_a_date_job_without_an_id_runs_once_in_4_workers(
    url: str, shared_state: SharedState
) -> None:
    run_workers(date_worker, url, lambda now: (now + 0.1, now + 1.6))
    assert shared_state.get("runs") == 1
    assert shared_state.get("control:runs") == WORKERS
    [claim] = shared_state.keys("apscheduler:")
    assert claim.startswith("apscheduler:record~")
    assert shared_state.get(claim)["pid"] != os.getpid()  # a worker's


def test_a_cron_job_with_a_jitter_runs_once_per_fire_in_4_workers(
    isolated_state: IsolatedState,
) -> None:
    url = f"local://{isolated_state.app}?linger=10"

    def window(now: float) -> tuple[float, float]:
        # An even second at least 2 s ahead, so that a worker of a loaded machine
        # starting up to 1.9 s late still sees it. The window opens after the even
        # second before it (a scheduler fires no cron time earlier than its start)
        # and closes after this fire's latest jittered run (fire + 1), before the
        # next one's earliest (fire + 2).
        fire = 2 * math.ceil((now + 2.0) / 2)
        return max(now + 0.1, fire - 1.9), fire + 1.9

    run_workers(cron_worker, url, window)
    with SharedState(url) as state:
        runs = state.get("runs")
        # One fire, or two when a worker of a loaded machine paused its scheduler
        # late: each ran once, under the claim of its cron time.
        ran = state.get_many(state.keys("ran:"))
        assert set(ran.values()) == {1}, ran
        assert runs == len(ran), (runs, ran)
        assert runs in (1, 2), (runs, ran)
        claims = state.keys("apscheduler:tick:")
        assert len(claims) == runs, claims
        # the cron time (an even second), not the run's
        assert all(int(claim[-3:-1]) % 2 == 0 for claim in claims), claims
        control = state.get("control:runs")
        assert control >= WORKERS, control  # each worker at its own time
        assert control > runs, (control, runs)


# --- in one process: max_instances, an unavailable state, the inner executor --------


def test_a_busy_worker_leaves_the_fire_to_an_idle_one(url: str, shared_state: SharedState) -> None:
    """Two schedulers in one process, as two workers: a job that runs longer than
    its interval, max_instances=1. A worker still running it does not claim the
    next fire (no claimed fire is dropped); the other takes it."""
    ran: dict[str, int] = {"a": 0, "b": 0}
    skipped: list[str] = []
    lock = threading.Lock()

    def slow(worker: str) -> None:
        time.sleep(0.6)
        with lock:
            ran[worker] += 1

    schedulers, states = [], []
    for worker in ("a", "b"):
        states.append(SharedState(url))
        scheduler = BackgroundScheduler(executors={"default": SharedExecutor(states[-1])})
        scheduler.add_job(
            slow,
            "interval",
            seconds=INTERVAL,
            args=[worker],
            id="slow",
            max_instances=1,
            misfire_grace_time=GRACE,
        )
        scheduler.add_listener(lambda event, w=worker: skipped.append(w), EVENT_JOB_MAX_INSTANCES)
        schedulers.append(scheduler)
    began = time.monotonic()
    for scheduler in schedulers:
        scheduler.start()
    time.sleep(2.5)
    for scheduler in schedulers:
        scheduler.pause()
    elapsed = time.monotonic() - began  # 2.5 s, more on a loaded machine
    time.sleep(0.8)
    for scheduler in schedulers:
        scheduler.shutdown()
    for state in states:
        state.close()
    assert skipped  # each was busy at times: APScheduler's own max_instances check
    assert ran["a"] > 0, ran
    assert ran["b"] > 0, ran
    assert len(shared_state.keys("apscheduler:slow:")) == ran["a"] + ran["b"]
    # Never more than one at a time in one worker, so at most one fire per 0.6 s each.
    assert ran["a"] + ran["b"] <= 2 * (elapsed / 0.6 + 1), (ran, elapsed)


def test_an_unavailable_state_skips_the_fire(
    unreachable: str, caplog: pytest.LogCaptureFixture
) -> None:
    ran = threading.Event()
    state = SharedState(unreachable)
    scheduler = BackgroundScheduler(executors={"default": SharedExecutor(state)})
    soon = datetime.now(timezone.utc) + timedelta(seconds=0.1)
    scheduler.add_job(ran.set, "date", run_date=soon, id="once")

    def refused() -> bool:
        return any("Error submitting job" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.ERROR, logger="apscheduler"):
        scheduler.start()
        # past the state's connect_timeout (0.5 s)
        wait_for(refused, 10, "the scheduler to log the failed claim")
        time.sleep(0.2)
        scheduler.shutdown()
    state.close()
    assert not ran.is_set()  # at most once: not run without a claim


def test_the_inner_executor_is_the_schedulers_default_unless_given(
    isolated_state: IsolatedState,
) -> None:
    background = SharedExecutor()
    scheduler = BackgroundScheduler(executors={"default": background})
    scheduler.start(paused=True)
    assert isinstance(background.inner, ThreadPoolExecutor)
    scheduler.shutdown()
    background.state.close()

    async def on_a_loop() -> None:
        shared = SharedExecutor()
        scheduler = AsyncIOScheduler(executors={"default": shared})
        scheduler.start(paused=True)
        assert isinstance(shared.inner, AsyncIOExecutor)
        scheduler.shutdown()
        await asyncio.sleep(0.05)
        shared.state.close()

    asyncio.run(on_a_loop())
    given = ThreadPoolExecutor(max_workers=2)
    shared = SharedExecutor(inner=given)
    scheduler = BackgroundScheduler(executors={"default": shared})
    scheduler.start(paused=True)
    assert shared.inner is given
    assert shared.state.url == "local://default"
    scheduler.shutdown()
    shared.state.close()


# --- claim keys and ttls --------------------------------------------------------------


@pytest.fixture
def scheduler(isolated_state: IsolatedState) -> Iterator[Any]:
    """A paused scheduler: its jobs have their defaults and never run."""
    executor = SharedExecutor(prefix="jobs")
    scheduler = BackgroundScheduler(executors={"default": executor})
    scheduler.start(paused=True)
    yield scheduler
    scheduler.shutdown()
    executor.state.close()


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def test_claim_keys_name_the_fire(scheduler: Any) -> None:
    executor: SharedExecutor = scheduler._lookup_executor("default")
    tick = scheduler.add_job(record, "interval", seconds=0.25, args=["u"], id="tick")
    key = executor.claim_key
    # Interval: the slot, so workers firing milliseconds apart claim one key.
    assert key(tick, at("2025-01-01 12:00:00.260000")) == "jobs:tick:2025-01-01T12:00:00.250000Z"
    assert key(tick, at("2025-01-01 12:00:00.499999")) == "jobs:tick:2025-01-01T12:00:00.250000Z"
    assert key(tick, at("2025-01-01 12:00:00.500000")) == "jobs:tick:2025-01-01T12:00:00.500000Z"
    # Cron with a jitter: the cron time the run time was drawn from.
    cron = scheduler.add_job(record, CronTrigger(second="*/2", jitter=1), args=["u"], id="c")
    assert key(cron, at("2025-01-01 12:00:02.700000")) == "jobs:c:2025-01-01T12:00:02Z"
    assert key(cron, at("2025-01-01 12:00:04")) == "jobs:c:2025-01-01T12:00:04Z"
    # Without an id: the same job in another worker (another scheduler) gets the same key.
    other_executor = SharedExecutor(prefix="jobs")
    other = BackgroundScheduler(executors={"default": other_executor})
    other.start(paused=True)
    mine = scheduler.add_job(record, "date", run_date=at("2030-01-01 00:00:00"), args=["u"])
    theirs = other.add_job(record, "date", run_date=at("2030-01-01 00:00:00"), args=["u"])
    also = other.add_job(record, "date", run_date=at("2030-01-01 00:00:00"), args=["v"])
    other.shutdown()
    other_executor.state.close()
    assert mine.id != theirs.id
    run_time = at("2030-01-01 00:00:00")
    assert key(mine, run_time) == key(theirs, run_time)
    assert key(mine, run_time).startswith("jobs:record~")
    assert key(also, run_time) != key(mine, run_time)  # other arguments: another job


def test_claim_ttls_outlive_every_late_claim(scheduler: Any) -> None:
    executor: SharedExecutor = scheduler._lookup_executor("default")
    ttl = executor.claim_ttl
    interval = scheduler.add_job(record, "interval", seconds=10, args=["u"], id="i")
    assert ttl(interval) == 10 + 1 + MARGIN  # misfire_grace_time 1 s (the default)
    lenient = scheduler.add_job(
        record, "interval", seconds=10, args=["u"], misfire_grace_time=None, coalesce=False
    )
    assert ttl(lenient) == 10 + 86400 + MARGIN  # no grace: a day
    coalescing = scheduler.add_job(
        record, "interval", seconds=10, args=["u"], misfire_grace_time=None
    )
    assert ttl(coalescing) == 10 + 10 + MARGIN  # a late worker submits its latest fire only
    cron = scheduler.add_job(record, CronTrigger(hour=3, jitter=30), args=["u"])
    assert ttl(cron) == 30 + 1 + MARGIN
    assert SharedExecutor(ttl=5).claim_ttl(cron) == 5


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"state": "redis://localhost"}, TypeError, "state must be a SharedState, not str"),
        ({"inner": "threadpool"}, TypeError, "inner must be an APScheduler executor"),
        ({"prefix": ""}, ValueError, "prefix must not be empty"),
        ({"prefix": b"jobs"}, TypeError, "prefix must be a str"),
        ({"ttl": 0}, ValueError, "ttl must be a finite number"),
        ({"ttl": math.inf}, ValueError, "ttl must be a finite number"),
        ({"ttl": "60"}, TypeError, "ttl must be a number"),
        ({"ttl": True}, TypeError, "ttl must be a number"),
    ],
)
def test_bad_arguments_are_refused(
    isolated_state: IsolatedState, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SharedExecutor(**kwargs)


def test_an_async_state_or_a_nested_shared_executor_is_refused(
    isolated_state: IsolatedState,
) -> None:
    with pytest.raises(TypeError, match="not AsyncSharedState"):
        SharedExecutor(AsyncSharedState())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a SharedExecutor"):
        SharedExecutor(inner=SharedExecutor())


def test_submitting_before_start_is_refused(scheduler: Any) -> None:
    job = scheduler.add_job(record, "interval", seconds=1, args=["u"], id="early")
    unstarted = SharedExecutor()
    with pytest.raises(RuntimeError, match="not been started"):
        unstarted.submit_job(job, [datetime.now(timezone.utc)])
    unstarted.state.close()


# --- under a real app server ------------------------------------------------------

GUNICORN_APP = """
import os

from apscheduler.schedulers.background import BackgroundScheduler

from shared_core import SharedState
from shared_core.contrib.apscheduler import SharedExecutor

state = SharedState(os.environ["STATE_URL"])
shared = os.environ["SHARED"] == "1"
scheduler = BackgroundScheduler(executors={"default": SharedExecutor(state)} if shared else {})
scheduler.add_job(state.incr, "interval", args=["runs"], seconds=0.5, id="tick",
                  misfire_grace_time=30)
scheduler.start()  # in every worker: gunicorn loads the app after the fork
state.incr("booted")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"""


def _gunicorn_runs(url: str, shared: bool, tmp_path: Any, state: SharedState) -> tuple[int, float]:
    """Runs of a job every 0.5 s in an app served by gunicorn with 4 workers."""
    (tmp_path / "aps_app.py").write_text(GUNICORN_APP)
    env = dict(os.environ, STATE_URL=url, SHARED="1" if shared else "0")
    cmd = [sys.executable, "-m", "gunicorn", "-w", "4", "-b", "127.0.0.1:0",
           "--chdir", str(tmp_path), "aps_app:app"]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: state.get("booted", 0) >= 4, 60, "4 workers to start")
        first = state.get("runs", 0)
        started = time.monotonic()
        time.sleep(4.0)
        runs = state.get("runs", 0) - first
        elapsed = time.monotonic() - started
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    how = "shared" if shared else "per-worker"
    print(f"gunicorn, 4 workers, {how}: {runs} runs in {elapsed:.1f} s")
    return runs, elapsed / 0.5


def test_gunicorn_with_4_workers_runs_each_fire_once(
    url: str, tmp_path: Any, shared_state: SharedState
) -> None:
    """The one-line switch in an app served by gunicorn: a job every 0.5 s
    runs about twice a second across the 4 workers ..."""
    runs, expected = _gunicorn_runs(url, True, tmp_path, shared_state)
    # Fewer when every worker of a loaded machine was late for a fire (skipped)
    # or the last runs lag; 4 times as many without the shared executor.
    assert 0.6 * expected <= runs <= expected + 2, (runs, expected)


@pytest.mark.parametrize("engine", ["manager"])
def test_gunicorn_without_it_runs_each_fire_in_every_worker(
    url: str, tmp_path: Any, shared_state: SharedState
) -> None:
    """... and 4 times as often without it."""
    runs, expected = _gunicorn_runs(url, False, tmp_path, shared_state)
    assert runs >= 3 * (expected - 2), (runs, expected)
