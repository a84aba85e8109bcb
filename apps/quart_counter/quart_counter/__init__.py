"""A Quart counter whose state is the same in every worker process.

``create_app()`` builds the app; ``quart_counter.asgi:app`` is what servers load.
"""

import asyncio
import json
import math
import os
import re
import time
from datetime import timedelta
from typing import Any

from quart import (
    Quart,
    abort,
    flash,
    get_flashed_messages,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from quart_rate_limiter import RateLimiter, RateLimitExceeded, rate_limit
from werkzeug.exceptions import HTTPException

from shared_core import AsyncScheduler, AsyncSharedState, LockTimeout, Occurrence, RunOnceFailed
from shared_core.contrib.aiocache import SharedStateCache
from shared_core.contrib.quart_rate_limiter import SharedStateStore
from shared_core.quart import SharedStateExtension, background_task


def tick_seconds(value: str | float) -> float:
    """``TICK_SECONDS`` checked: a finite number of seconds >= 0 (0: no scheduled job)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(
            f"TICK_SECONDS must be a finite number of seconds >= 0 (0: no job), not {value!r}"
        )
    return seconds


# What a copy changes: the name of its state (it picks a private socket), the limits.
# The counts are kept in each worker between writes (a near cache): /report reads
# them without a round trip on the embedded engine and on Redis.
shared = SharedStateExtension(app_name="quart_counter", near_cache=("count:",))
MAX_BY = 1000
MAX_JOB_SECONDS = 30
SEEN_FOR = 60  # seconds a worker stays on the page's list of workers after it served the page
LIMIT, LIMIT_PERIOD = 10, timedelta(minutes=1)  # /limited, per client address
CACHE_FOR = 30  # seconds /cached keeps the value it computed
START_WAIT = 60  # seconds a worker waits for the start-up task another one runs
TICK_SECONDS = tick_seconds(os.environ.get("TICK_SECONDS", "2"))  # the scheduled job; 0: none
TICKS_KEPT = 600  # seconds /ticks shows an occurrence of the scheduled job


def create_app(test_config: dict[str, Any] | None = None) -> Quart:
    """Build the app; ``test_config`` overrides settings such as ``SHARED_STATE_URL``."""
    app = Quart(__name__)
    app.config.update(MAX_CONTENT_LENGTH=16 * 1024, TICK_SECONDS=TICK_SECONDS)
    app.config.update(test_config or {})
    tick_every = tick_seconds(app.config["TICK_SECONDS"])  # 0: no scheduled job
    state = shared.init_app(app)
    RateLimiter(app, store=SharedStateStore(state))  # one limit for all the workers
    cache = SharedStateCache(state, ttl=CACHE_FOR)  # an aiocache cache all the workers share
    loaded = {"generation": 0}  # this worker's own, like a loaded config, a cache, a model
    alone = {"count": 0}  # what a per-worker global (naive.py) would say: this worker's count

    async def add(key: str, by: int) -> int:
        count = await state.incr(f"count:{key}", by)
        if key == "counter":
            alone["count"] += by
        return count

    async def zero(key: str) -> None:
        await state.set(f"count:{key}", 0)
        if key == "counter":
            alone["count"] = 0  # in this worker only, as a global would be

    async def listen_for_reloads() -> None:
        # In every worker. The state is the truth: a message sent while it resubscribes is missed.
        async def load_config() -> None:
            loaded["generation"] = await state.get("config:generation", 0)

        async with state.subscribe("reload", on_connect=load_config) as messages:
            async for _ in messages:
                await load_config()

    background_task(app, listen_for_reloads)

    started = {"here": "pending"}  # what this worker saw of the start-up task

    async def warm_up() -> None:
        # A start-up task (a migration, a cache to fill): one worker runs it
        # per start of the deployment, the others wait for it to finish.
        await state.incr("startup:runs")
        await state.set("startup:by", os.getpid())
        if os.environ.get("START_UP_FAIL"):  # only to show a failure reaching every worker
            raise RuntimeError("the start-up task failed (START_UP_FAIL is set)")

    async def start_up() -> None:
        try:
            ran = await state.run_once("warm-up", warm_up, wait=START_WAIT)
            started["here"] = "ran here" if ran else "done by another worker"
        except RunOnceFailed as exc:  # in every worker, not only the one that ran it
            started["here"] = f"failed: {exc}"

    # At start-up, beside serving (the worker answers 503s while the state is
    # away, and the task is tried again).
    background_task(app, start_up)

    scheduler = AsyncScheduler(state)

    @scheduler.every(tick_every or 1, name="tick")
    async def tick(occurrence: Occurrence) -> None:
        # Once per period across all the workers, whichever are alive.
        await state.incr("ticks")
        await state.incr(f"tick:{occurrence.slot}", ttl=TICKS_KEPT)
        await state.set("tick:last", {"pid": os.getpid(), "slot": occurrence.slot})

    if tick_every > 0:
        background_task(app, scheduler.run)  # in every worker, cancelled at shutdown

    @app.before_request
    async def read_body() -> None:
        await request.get_data()  # a 413 over MAX_CONTENT_LENGTH, before any view runs

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        response = exc.get_response()  # keeps headers such as Allow on a 405
        response.set_data(json.dumps({"error": exc.description}))
        response.content_type = "application/json"
        return response

    @app.errorhandler(RateLimitExceeded)
    async def too_many(exc: RateLimitExceeded) -> Any:
        response = exc.get_response()  # keeps Retry-After
        error = f"rate limit exceeded: retry after {exc.retry_after} s"
        response.set_data(json.dumps({"error": error, "pid": os.getpid()}))
        response.content_type = "application/json"
        return response

    @app.route("/increment", methods=["GET", "POST"])
    async def increment() -> Any:
        key, by = _key(), _number("by", 1, 1, MAX_BY)
        return {"count": await add(key, by), "key": key, "pid": os.getpid()}

    @app.get("/report")
    async def report() -> Any:
        key = _key()
        count = await state.get(f"count:{key}", 0)
        return {"count": count, "key": key, "pid": os.getpid(), **loaded}

    @app.route("/reset", methods=["GET", "POST"])
    async def reset() -> Any:
        key = _key()
        await zero(key)
        return {"count": 0, "key": key, "pid": os.getpid()}

    @app.post("/broadcast/reload")
    async def broadcast_reload() -> Any:
        # Every worker loads the new generation, not only the one answering.
        generation = await state.incr("config:generation")
        await state.publish("reload", generation)
        return {"generation": generation, "pid": os.getpid()}

    @app.post("/jobs/report")
    async def run_job() -> Any:
        seconds = _number("seconds", 1, 0, MAX_JOB_SECONDS)
        try:  # one worker of the whole deployment at a time
            async with state.lock("job:report", timeout=0):
                await state.set("job:report:holder", os.getpid())
                await asyncio.sleep(seconds)  # the work; a worker killed here frees the lock
        except LockTimeout:
            return {"error": "the report job is already running in another worker"}, 409
        return {"ran": True, "seconds": seconds, "pid": os.getpid()}

    @app.get("/jobs/report")
    async def job_status() -> Any:
        return {"holder": await state.get("job:report:holder"), "pid": os.getpid()}

    @app.get("/limited")
    @rate_limit(LIMIT, LIMIT_PERIOD)
    async def limited() -> Any:
        return {"ok": True, "pid": os.getpid()}

    @app.get("/cached")
    async def cached() -> Any:
        value = await cache.get("value")
        if value is None:
            async with state.lock("cached"):  # one worker computes, the others wait and read
                value = await cache.get("value")
                if value is None:
                    value = {"computed_by": os.getpid(), "at": time.time()}  # the work
                    await cache.set("value", value)
        return {"value": value, "pid": os.getpid()}

    @app.get("/ticks")
    async def ticks() -> Any:
        return {**await _ticks(state), "startup_here": started["here"]}

    @app.get("/whoami")
    async def whoami() -> Any:
        return {"client": request.remote_addr, "scheme": request.scheme, "pid": os.getpid()}

    @app.get("/healthz")
    async def healthz() -> Any:
        await state.get("config:generation")  # a 503 while the state is unavailable
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/session")
    async def visits() -> Any:
        # Only grows if every worker accepts the session cookie signed by another.
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"], "pid": os.getpid()}

    @app.get("/")
    async def index() -> Any:
        pid = os.getpid()
        await state.set(f"worker:{pid}", True, ttl=SEEN_FOR)  # on the list for a minute
        page = {
            "count": await state.get("count:counter", 0),  # the count that /increment raises
            "alone": alone["count"],
            "pid": pid,
            "workers": sorted(int(k.removeprefix("worker:")) for k in await state.keys("worker:")),
            "messages": get_flashed_messages(),
            "increment_url": url_for("increment", _external=True),
        }
        return await render_template("index.html", **page)

    @app.post("/")
    async def index_form() -> Any:
        # The page's buttons: post, then redirect (303) to the page, which shows the flash.
        button = (await request.form).get("button", "increment")
        if button == "increment":
            await flash(f"Worker {os.getpid()} raised the count to {await add('counter', 1)}.")
        elif button == "reset":
            await zero("counter")
            await flash(f"Worker {os.getpid()} reset the count to 0.")
        else:
            abort(400, "button must be increment or reset")
        return redirect(url_for("index"), 303)

    return app


def _key() -> str:
    key = request.args.get("key", "counter")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", key):
        abort(400, "key must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return key


def _number(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name, str(default))
    if not re.fullmatch(r"[0-9]{1,4}", raw) or not low <= int(raw) <= high:
        abort(400, f"{name} must be a whole number from {low} to {high}")
    return int(raw)


async def _ticks(state: AsyncSharedState) -> dict[str, Any]:
    """What the scheduled job and the start-up task did, across the workers."""
    found = await state.get_many(k for k in await state.keys("tick:") if k[5:].isdigit())
    runs = {int(k[5:]): n for k, n in found.items()}  # slot -> times it ran: always 1
    startup = {"runs": await state.get("startup:runs", 0), "by": await state.get("startup:by")}
    last = await state.get("tick:last")
    ticks = await state.get("ticks", 0)
    return {
        "ticks": ticks,
        "runs_per_slot": runs,
        "last": last,
        "startup": startup,
        "pid": os.getpid(),
    }
