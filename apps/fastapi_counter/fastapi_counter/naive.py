"""Only to show the bug that shared_core fixes (``COUNTER_MODE=naive``): do not copy it.

The usual first try, globals of the module: each worker has its own count and
session key, so numbers repeat across pids and ``/session`` starts over. slowapi's
``memory://`` storage and aiocache's memory cache are per worker too: with 4
workers a client gets up to 4 times the limit through, and each worker computes
and serves a value of its own.
And a periodic job as a loop in each worker: every worker runs every
occurrence (``/ticks``).
"""

import os
import secrets
import threading
import time
from typing import Any

from aiocache import SimpleMemoryCache  # type: ignore[import-untyped]
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request

from . import CACHE_FOR, LIMIT, TICK_SECONDS

app = FastAPI()
app.add_middleware(SessionMiddleware, secret_key=secrets.token_hex(32))  # one per worker
count = 0
limiter = app.state.limiter = Limiter(get_remote_address, storage_uri="memory://")  # per worker
cache = SimpleMemoryCache(ttl=CACHE_FOR)  # a cache per worker


@app.get("/increment", operation_id="increment_get")
@app.post("/increment", operation_id="increment")
async def increment() -> dict[str, int]:
    global count
    count += 1
    return {"count": count, "pid": os.getpid()}


@app.get("/report")
@app.get("/healthz")
async def report() -> dict[str, int]:
    return {"count": count, "pid": os.getpid()}


@app.get("/session")
async def visits(request: Request) -> dict[str, int]:
    request.session["visits"] = request.session.get("visits", 0) + 1
    return {"visits": request.session["visits"], "pid": os.getpid()}


@app.get("/limited")
@limiter.limit(LIMIT)
async def limited(request: Request) -> dict[str, Any]:
    return {"ok": True, "pid": os.getpid()}


@app.exception_handler(RateLimitExceeded)
async def too_many(request: Request, exc: RateLimitExceeded) -> JSONResponse:
    return JSONResponse({"error": f"rate limit exceeded: {exc.detail}", "pid": os.getpid()}, 429)


@app.get("/cached")
async def cached() -> dict[str, Any]:
    value = await cache.get("value")
    if value is None:
        value = {"computed_by": os.getpid(), "at": time.time()}
        await cache.set("value", value)
    return {"value": value, "pid": os.getpid()}


ticks: list[int] = []  # the occurrences of the job this worker ran (the latest 50)
ticks_run = 0  # how many it ran in all


def tick_forever() -> None:
    # The usual first try at a periodic job: a loop in each worker, so every
    # worker runs every occurrence.
    global ticks_run
    while True:
        time.sleep(TICK_SECONDS - time.time() % TICK_SECONDS)
        ticks.append(int(time.time() // TICK_SECONDS))
        del ticks[:-50]
        ticks_run += 1


if TICK_SECONDS > 0:
    threading.Thread(target=tick_forever, name="naive ticks", daemon=True).start()


@app.get("/ticks")
async def ticks_seen() -> dict[str, Any]:
    return {"ticks": ticks_run, "slots": ticks, "pid": os.getpid()}
