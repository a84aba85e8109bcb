"""Only to show the bug that shared_core fixes (``COUNTER_MODE=naive``): do not copy it.

The usual first try, globals of the module: each worker has its own count and
``SECRET_KEY``, so numbers repeat across pids and ``/session`` starts over. The
rate limiter's default store and aiocache's memory cache are per worker too:
with 4 workers a client gets up to 4 times the limit through, and each worker
computes and serves a value of its own.
And a periodic job as a loop in each worker: every worker runs every
occurrence (``/ticks``).
"""

import json
import os
import secrets
import threading
import time
from typing import Any

from aiocache import SimpleMemoryCache  # type: ignore[import-untyped]
from quart import Quart, session
from quart_rate_limiter import RateLimiter, RateLimitExceeded, rate_limit

from . import CACHE_FOR, LIMIT, LIMIT_PERIOD, TICK_SECONDS

app = Quart(__name__)
app.secret_key = secrets.token_hex(32)  # a different one in every worker
count = 0
RateLimiter(app)  # its default MemoryStore: a limit per worker
cache = SimpleMemoryCache(ttl=CACHE_FOR)  # a cache per worker


@app.route("/increment", methods=["GET", "POST"])
async def increment() -> Any:
    global count
    count += 1
    return {"count": count, "key": "counter", "pid": os.getpid()}


@app.get("/report")
@app.get("/healthz")
async def report() -> Any:
    return {"count": count, "key": "counter", "pid": os.getpid()}


@app.get("/session")
async def visits() -> Any:
    session["visits"] = session.get("visits", 0) + 1
    return {"visits": session["visits"], "pid": os.getpid()}


@app.get("/limited")
@rate_limit(LIMIT, LIMIT_PERIOD)
async def limited() -> Any:
    return {"ok": True, "pid": os.getpid()}


@app.errorhandler(RateLimitExceeded)
async def too_many(exc: RateLimitExceeded) -> Any:
    error = f"rate limit exceeded: retry after {exc.retry_after} s"
    response = exc.get_response()
    response.set_data(json.dumps({"error": error, "pid": os.getpid()}))
    response.content_type = "application/json"
    return response


@app.get("/cached")
async def cached() -> Any:
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
async def ticks_seen() -> Any:
    return {"ticks": ticks_run, "slots": ticks, "pid": os.getpid()}
