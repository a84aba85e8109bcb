"""A FastAPI counter whose state is the same in every worker process.

``create_app()`` builds the app; ``fastapi_counter.main:app`` is what servers load.
"""

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from shared_core import LockTimeout
from shared_core.starlette import SharedStateDep, background_task, init_app, lifespan

# What a copy changes: the name of its state (it picks a private socket), the limits.
APP_NAME = "fastapi_counter"
MAX_BY = 1000
MAX_BODY = 16 * 1024
MAX_JOB_SECONDS = 30

Key = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.:-]+$", min_length=1, max_length=64)]
By = Annotated[int, Query(ge=1, le=MAX_BY)]
Seconds = Annotated[int, Query(ge=0, le=MAX_JOB_SECONDS)]
templates = Jinja2Templates(Path(__file__).parent / "templates")


def create_app(state_url: str | None = None) -> FastAPI:
    """Build the app on the state at ``state_url`` (else ``$SHARED_STATE_URL``, else embedded)."""
    app = FastAPI(title=APP_NAME, lifespan=lifespan)
    shared_state = init_app(app, state_url, app_name=APP_NAME)  # with signed sessions, 503s
    app.state.generation = 0  # this worker's own, like a loaded config, a cache, a model

    async def listen_for_reloads() -> None:
        async def catch_up() -> None:  # on subscribing: what was sent before is missed
            app.state.generation = await shared_state.get("config:generation", 0)

        async with shared_state.subscribe("reload", on_connect=catch_up) as messages:
            async for _, generation in messages:
                app.state.generation = max(app.state.generation, generation)

    background_task(app, listen_for_reloads)  # in every worker

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return JSONResponse({"error": "request body too large"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        message = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in errors)
        return JSONResponse({"error": message, "detail": errors}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    @app.api_route("/increment", methods=["GET", "POST"])
    async def increment(state: SharedStateDep, key: Key = "counter", by: By = 1) -> dict[str, Any]:
        return {"count": await state.incr(f"count:{key}", by), "key": key, "pid": os.getpid()}

    @app.get("/report")
    async def report(state: SharedStateDep, key: Key = "counter") -> dict[str, Any]:
        count, generation = await state.get(f"count:{key}", 0), app.state.generation
        return {"count": count, "key": key, "pid": os.getpid(), "generation": generation}

    @app.api_route("/reset", methods=["GET", "POST"])
    async def reset(state: SharedStateDep, key: Key = "counter") -> dict[str, Any]:
        await state.set(f"count:{key}", 0)
        return {"count": 0, "key": key, "pid": os.getpid()}

    @app.post("/broadcast/reload")
    async def broadcast_reload(state: SharedStateDep) -> dict[str, Any]:
        # Every worker loads the new generation, not only the one answering.
        generation = await state.incr("config:generation")
        await state.publish("reload", generation)
        return {"generation": generation, "pid": os.getpid()}

    @app.post("/jobs/report", responses={409: {"description": "already running"}})
    async def run_job(state: SharedStateDep, seconds: Seconds = 1) -> Any:
        try:  # one worker of the whole deployment at a time
            async with state.lock("job:report", timeout=0):
                await state.set("job:report:holder", os.getpid())
                await asyncio.sleep(seconds)  # the work; a worker killed here frees the lock
        except LockTimeout:
            error = {"error": "the report job is already running in another worker"}
            return JSONResponse(error, status_code=409)
        return {"ran": True, "seconds": seconds, "pid": os.getpid()}

    @app.get("/jobs/report")
    async def job_status(state: SharedStateDep) -> dict[str, Any]:
        return {"holder": await state.get("job:report:holder"), "pid": os.getpid()}

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else None
        return {"client": client, "scheme": request.url.scheme, "pid": os.getpid()}

    @app.get("/healthz")
    async def healthz(state: SharedStateDep) -> dict[str, Any]:
        await state.get("config:generation")  # a 503 while the state is unavailable
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/session")
    async def visits(request: Request) -> dict[str, Any]:
        # Only grows if every worker accepts the session cookie signed by another.
        request.session["visits"] = request.session.get("visits", 0) + 1
        return {"visits": request.session["visits"], "pid": os.getpid()}

    see_page: dict[int | str, Any] = {303: {"description": "POST counts you, then shows the page"}}

    @app.api_route("/", methods=["GET", "POST"], response_class=HTMLResponse, responses=see_page)
    async def index(request: Request, state: SharedStateDep) -> Any:
        if request.method == "POST":
            number = await state.incr("count:visitors")
            request.session.setdefault("flash", []).append(f"You are visitor number {number}.")
            return RedirectResponse("/", status_code=303)
        page = {"messages": request.session.pop("flash", []), "pid": os.getpid()}
        return templates.TemplateResponse(request, "index.html", page)

    return app
