"""The app factory, its endpoints and its error handlers."""

from __future__ import annotations

import asyncio
import html
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared_core import StateUnavailable

from .counters import Counters, attach_counters
from .sessions import SharedSecretSessions
from .settings import MAX_BODY, MAX_BY, MAX_JOB_SECONDS, Settings

KeyParam = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.:-]+$", min_length=1, max_length=64)]
ByParam = Annotated[int, Query(ge=1, le=MAX_BY)]
SecondsParam = Annotated[int, Query(ge=0, le=MAX_JOB_SECONDS)]


def get_counters(request: Request) -> Counters:
    counters: Counters = request.app.state.counters
    return counters


CountersDep = Annotated[Counters, Depends(get_counters)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` default to the environment."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Runs once in every worker: attach to the one shared state.
        async with attach_counters(settings) as (counters, session_key):
            app.state.counters = counters
            app.state.session_key = session_key
            # One task per worker acts on reload broadcasts.
            listener = asyncio.ensure_future(counters.listen())
            try:
                yield
            finally:
                listener.cancel()
                with suppress(asyncio.CancelledError):
                    await listener

    app = FastAPI(title="fastapi_counter", lifespan=lifespan)
    app.add_middleware(SharedSecretSessions)
    register_routes(app, settings)
    register_errors(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return JSONResponse({"error": "request body too large"}, status_code=413)
        return await call_next(request)

    return app


def register_routes(app: FastAPI, settings: Settings) -> None:
    mode = settings.mode

    @app.api_route("/increment", methods=["GET", "POST"])
    async def increment(
        counters: CountersDep, key: KeyParam = "counter", by: ByParam = 1
    ) -> dict[str, Any]:
        return {"count": await counters.incr(key, by), "key": key, "pid": os.getpid()}

    @app.get("/report")
    async def report(counters: CountersDep, key: KeyParam = "counter") -> dict[str, Any]:
        count = await counters.get(key)
        return {
            "count": count,
            "key": key,
            "pid": os.getpid(),
            "mode": mode,
            "generation": counters.generation,
        }

    @app.post("/broadcast/reload")
    async def broadcast_reload(counters: CountersDep) -> dict[str, Any]:
        # Every worker loads the new generation, not only the one answering.
        return {"generation": await counters.reload(), "pid": os.getpid()}

    @app.api_route("/reset", methods=["GET", "POST"])
    async def reset(counters: CountersDep, key: KeyParam = "counter") -> dict[str, Any]:
        await counters.reset(key)
        return {"count": 0, "key": key, "pid": os.getpid()}

    @app.post("/jobs/report", responses={409: {"description": "already running"}})
    async def run_job(counters: CountersDep, seconds: SecondsParam = 1) -> Any:
        # Only one worker of the deployment may run it at a time.
        if not await counters.run_job(seconds):
            error = {"error": "the report job is already running in another worker"}
            return JSONResponse(error, status_code=409)
        return {"ran": True, "seconds": seconds, "pid": os.getpid()}

    @app.get("/jobs/report")
    async def job_status(counters: CountersDep) -> dict[str, Any]:
        return {"holder": await counters.job_holder(), "pid": os.getpid()}

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        # The client as the app sees it: behind a proxy, see main.py.
        client = request.client.host if request.client else None
        return {"client": client, "scheme": request.url.scheme, "pid": os.getpid()}

    @app.get("/healthz")
    async def healthz(counters: CountersDep) -> dict[str, Any]:
        await counters.ping()
        return {"status": "ok", "pid": os.getpid(), "mode": mode}

    @app.get("/session")
    async def visits(request: Request) -> dict[str, Any]:
        # A per-user count kept in the signed session cookie: it only grows
        # if every worker accepts the signature of every other.
        request.session["visits"] = request.session.get("visits", 0) + 1
        return {"visits": request.session["visits"], "pid": os.getpid()}

    @app.api_route(
        "/",
        methods=["GET", "POST"],
        response_class=HTMLResponse,
        responses={303: {"description": "POST counts you, then shows the page"}},
    )
    async def index(request: Request, counters: CountersDep) -> Any:
        if request.method == "POST":
            number = await counters.incr("visitors", 1)
            request.session.setdefault("flash", []).append(f"You are visitor number {number}.")
            return RedirectResponse("/", status_code=303)
        messages = request.session.pop("flash", [])
        flashes = "".join(f'<p class="flash">{html.escape(m)}</p>' for m in messages)
        return HTMLResponse(PAGE.format(mode=mode, flashes=flashes, pid=os.getpid()))


PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>FastAPI counter</title></head>
<body>
  <h1>FastAPI counter ({mode} mode)</h1>
  {flashes}
  <form method="post"><button type="submit">Count me</button></form>
  <p>Served by worker {pid}.</p>
</body>
</html>
"""


def register_errors(app: FastAPI) -> None:
    @app.exception_handler(StateUnavailable)
    async def unavailable(request: Request, exc: StateUnavailable) -> JSONResponse:
        return JSONResponse({"error": "the shared state is unavailable, try again"}, 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        message = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in errors)
        return JSONResponse({"error": message, "detail": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)
