"""A FastAPI counter whose state is the same in every worker process.

``create_app()`` builds the app; ``fastapi_counter.main:app`` is what servers load.
"""

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

import shared_core.contrib.limits  # noqa: F401 - gives limits (so slowapi) the shared:// URIs
from shared_core import AsyncScheduler, AsyncSharedState, LockTimeout, Occurrence, RunOnceFailed
from shared_core.contrib.aiocache import SharedStateCache
from shared_core.starlette import SharedStateDep, background_task, init_app, lifespan


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
APP_NAME = "fastapi_counter"
MAX_BY = 1000
MAX_BODY = 16 * 1024
MAX_JOB_SECONDS = 30
SEEN_FOR = 60  # seconds a worker stays on the page's list of workers after it served the page
LIMIT = "10/minute"  # /limited, per client address
CACHE_FOR = 30  # seconds /cached keeps the value it computed
START_WAIT = 60  # seconds a worker waits for the start-up task another one runs
TICK_SECONDS = tick_seconds(os.environ.get("TICK_SECONDS", "2"))  # the scheduled job; 0: none
TICKS_KEPT = 600  # seconds /ticks shows an occurrence of the scheduled job

Key = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.:-]+$", min_length=1, max_length=64)]
By = Annotated[int, Query(ge=1, le=MAX_BY)]
Seconds = Annotated[int, Query(ge=0, le=MAX_JOB_SECONDS)]
Button = Annotated[Literal["increment", "reset"], Form()]
templates = Jinja2Templates(Path(__file__).parent / "templates")


class LimitBody:
    """A 413 for a request that declares a body over ``MAX_BODY``, before anything
    reads it. Plain ASGI: Starlette's ``@app.middleware("http")`` runs a task
    group and a stream per request, a quarter of a light request's time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > MAX_BODY:
                response = JSONResponse({"error": "request body too large"}, status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state_url: str | None = None) -> FastAPI:
    """Build the app on the state at ``state_url`` (else ``$SHARED_STATE_URL``, else embedded)."""
    # FastAPIOffline: a FastAPI whose /docs and /redoc use assets it serves, not a CDN's.
    app = FastAPIOffline(title=APP_NAME, lifespan=lifespan)
    # With signed sessions and 503s; the counts kept in each worker between
    # writes (a near cache): /report reads them without a round trip.
    shared_state = init_app(app, state_url, app_name=APP_NAME, near_cache=("count:",))
    # slowapi calls limits' sync API: a sync client of the same state ("shared://APP_NAME"
    # by default), so each check blocks this worker for one round trip.
    storage = f"shared+{shared_state.url}"
    limiter = app.state.limiter = Limiter(get_remote_address, storage_uri=storage)
    cache = SharedStateCache(shared_state, ttl=CACHE_FOR)  # an aiocache cache all workers share
    app.state.generation = 0  # this worker's own, like a loaded config, a cache, a model
    alone = {"count": 0}  # what a per-worker global (naive.py) would say: this worker's count

    async def add(key: str, by: int) -> int:
        count = await shared_state.incr(f"count:{key}", by)
        if key == "counter":
            alone["count"] += by
        return count

    async def zero(key: str) -> None:
        await shared_state.set(f"count:{key}", 0)
        if key == "counter":
            alone["count"] = 0  # in this worker only, as a global would be

    async def listen_for_reloads() -> None:
        async def catch_up() -> None:  # on subscribing: what was sent before is missed
            app.state.generation = await shared_state.get("config:generation", 0)

        async with shared_state.subscribe("reload", on_connect=catch_up) as messages:
            async for _, generation in messages:
                app.state.generation = max(app.state.generation, generation)

    background_task(app, listen_for_reloads)  # in every worker

    started = {"here": "pending"}  # what this worker saw of the start-up task

    async def warm_up() -> None:
        # A start-up task (a migration, a cache to fill): one worker runs it
        # per start of the deployment, the others wait for it to finish.
        await shared_state.incr("startup:runs")
        await shared_state.set("startup:by", os.getpid())
        if os.environ.get("START_UP_FAIL"):  # only to show a failure reaching every worker
            raise RuntimeError("the start-up task failed (START_UP_FAIL is set)")

    async def start_up() -> None:
        try:
            ran = await shared_state.run_once("warm-up", warm_up, wait=START_WAIT)
            started["here"] = "ran here" if ran else "done by another worker"
        except RunOnceFailed as exc:  # in every worker, not only the one that ran it
            started["here"] = f"failed: {exc}"

    # At start-up, beside serving (the worker answers 503s while the state is
    # away, and the task is tried again).
    background_task(app, start_up)

    scheduler = AsyncScheduler(shared_state)

    @scheduler.every(TICK_SECONDS or 1, name="tick")
    async def tick(occurrence: Occurrence) -> None:
        # Once per period across all the workers, whichever are alive.
        await shared_state.incr("ticks")
        await shared_state.incr(f"tick:{occurrence.slot}", ttl=TICKS_KEPT)
        await shared_state.set("tick:last", {"pid": os.getpid(), "slot": occurrence.slot})

    if TICK_SECONDS > 0:
        background_task(app, scheduler.run)  # in every worker, cancelled at shutdown

    app.add_middleware(LimitBody)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        message = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in errors)
        return JSONResponse({"error": message, "detail": errors}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:  # Allow: the methods of every route of the path, not one's
            same_path = [r for r in app.routes if r.matches(request.scope)[0] != Match.NONE]
            methods = {m for r in same_path if isinstance(r, Route) for m in r.methods or ()}
            headers = {"Allow": ", ".join(sorted(methods))}
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=headers)

    @app.exception_handler(RateLimitExceeded)
    async def too_many(request: Request, exc: RateLimitExceeded) -> JSONResponse:
        error = {"error": f"rate limit exceeded: {exc.detail}", "pid": os.getpid()}
        return JSONResponse(error, 429)

    # A route per method, so that each has an operation id of its own.
    @app.get("/increment", operation_id="increment_get")
    @app.post("/increment", operation_id="increment")
    async def increment(key: Key = "counter", by: By = 1) -> dict[str, Any]:
        return {"count": await add(key, by), "key": key, "pid": os.getpid()}

    @app.get("/report", operation_id="report")
    async def report(state: SharedStateDep, key: Key = "counter") -> dict[str, Any]:
        count, generation = await state.get(f"count:{key}", 0), app.state.generation
        return {"count": count, "key": key, "pid": os.getpid(), "generation": generation}

    @app.get("/reset", operation_id="reset_get")
    @app.post("/reset", operation_id="reset")
    async def reset(key: Key = "counter") -> dict[str, Any]:
        await zero(key)
        return {"count": 0, "key": key, "pid": os.getpid()}

    @app.post("/broadcast/reload", operation_id="broadcast_reload")
    async def broadcast_reload(state: SharedStateDep) -> dict[str, Any]:
        # Every worker loads the new generation, not only the one answering.
        generation = await state.incr("config:generation")
        await state.publish("reload", generation)
        return {"generation": generation, "pid": os.getpid()}

    busy: dict[int | str, Any] = {409: {"description": "already running in another worker"}}

    @app.post("/jobs/report", operation_id="run_job", responses=busy)
    async def run_job(state: SharedStateDep, seconds: Seconds = 1) -> Any:
        try:  # one worker of the whole deployment at a time
            async with state.lock("job:report", timeout=0):
                await state.set("job:report:holder", os.getpid())
                await asyncio.sleep(seconds)  # the work; a worker killed here frees the lock
        except LockTimeout:
            error = {"error": "the report job is already running in another worker"}
            return JSONResponse(error, status_code=409)
        return {"ran": True, "seconds": seconds, "pid": os.getpid()}

    @app.get("/jobs/report", operation_id="job_status")
    async def job_status(state: SharedStateDep) -> dict[str, Any]:
        return {"holder": await state.get("job:report:holder"), "pid": os.getpid()}

    @app.get("/limited", operation_id="limited", responses={429: {"description": "too many"}})
    @limiter.limit(LIMIT)
    async def limited(request: Request) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid()}

    @app.get("/cached", operation_id="cached")
    async def cached() -> dict[str, Any]:
        value = await cache.get("value")
        if value is None:
            async with shared_state.lock("cached"):  # one worker computes, the others wait
                value = await cache.get("value")
                if value is None:
                    value = {"computed_by": os.getpid(), "at": time.time()}  # the work
                    await cache.set("value", value)
        return {"value": value, "pid": os.getpid()}

    @app.get("/ticks", operation_id="ticks")
    async def ticks() -> dict[str, Any]:
        return {**await _ticks(shared_state), "startup_here": started["here"]}

    @app.get("/whoami", operation_id="whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else None
        return {"client": client, "scheme": request.url.scheme, "pid": os.getpid()}

    @app.get("/healthz", operation_id="healthz")
    async def healthz(state: SharedStateDep) -> dict[str, Any]:
        await state.get("config:generation")  # a 503 while the state is unavailable
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/session", operation_id="visits")
    async def visits(request: Request) -> dict[str, Any]:
        # Only grows if every worker accepts the session cookie signed by another.
        request.session["visits"] = request.session.get("visits", 0) + 1
        return {"visits": request.session["visits"], "pid": os.getpid()}

    @app.get("/", operation_id="index", response_class=HTMLResponse)
    async def index(request: Request, state: SharedStateDep) -> Any:
        pid = os.getpid()
        await state.set(f"worker:{pid}", True, ttl=SEEN_FOR)  # on the list for a minute
        page = {
            "count": await state.get("count:counter", 0),  # the count that /increment raises
            "alone": alone["count"],
            "pid": pid,
            "workers": sorted(int(k.removeprefix("worker:")) for k in await state.keys("worker:")),
            "messages": request.session.pop("flash", []),
            "increment_url": request.url_for("increment"),
        }
        return templates.TemplateResponse(request, "index.html", page)

    @app.post("/", operation_id="index_form", status_code=303, response_class=RedirectResponse)
    async def index_form(request: Request, button: Button = "increment") -> Any:
        # The page's buttons: post, then redirect (303) to the page, which shows the flash.
        if (await request.form()).get("button") == "":  # FastAPI reads it as absent
            return JSONResponse({"error": "button: must be increment or reset"}, 422)
        if button == "increment":
            message = f"Worker {os.getpid()} raised the count to {await add('counter', 1)}."
        else:
            await zero("counter")
            message = f"Worker {os.getpid()} reset the count to 0."
        request.session.setdefault("flash", []).append(message)
        return RedirectResponse(request.url_for("index").path, status_code=303)  # relative

    return app


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
