"""Only to show the bug that shared_core fixes (``COUNTER_MODE=naive``): do not copy it.

The usual first try, globals of the module: each worker has its own count and
``SECRET_KEY``, so numbers repeat across pids and ``/session`` starts over; and
the defaults of flask-limiter (``memory://``) and flask-caching (``SimpleCache``),
so each worker lets ``LIMIT`` through and computes ``/cached`` for itself.
And a periodic job as a loop in each worker: every worker runs every
occurrence (``/ticks``).
"""

import os
import secrets
import threading
import time
from typing import Any

from flask import Flask, session
from flask_caching import Cache
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address

from . import CACHE_SECONDS, LIMIT, TICK_SECONDS

app = Flask(__name__)
app.secret_key = secrets.token_hex(32)  # a different one in every worker
count = 0
limiter = Limiter(get_remote_address, app=app, storage_uri="memory://")  # per worker
cache = Cache(app, config={"CACHE_TYPE": "SimpleCache"})  # per worker


@app.route("/increment", methods=["GET", "POST"])
def increment() -> Any:
    global count
    count += 1
    return {"count": count, "key": "counter", "pid": os.getpid()}


@app.get("/report")
@app.get("/healthz")
def report() -> Any:
    return {"count": count, "key": "counter", "pid": os.getpid()}


@app.get("/session")
def visits() -> Any:
    session["visits"] = session.get("visits", 0) + 1
    return {"visits": session["visits"], "pid": os.getpid()}


@app.get("/limited")
@limiter.limit(LIMIT)
def limited() -> Any:
    return {"ok": True, "pid": os.getpid()}


@app.errorhandler(RateLimitExceeded)
def rate_limited(exc: RateLimitExceeded) -> Any:
    return {"error": f"rate limit exceeded: {exc.description}", "pid": os.getpid()}, 429


@app.get("/cached")
@cache.cached(timeout=CACHE_SECONDS, key_prefix="computed")
def cached() -> Any:
    return {"value": {"computed_by": os.getpid(), "at": time.time()}, "pid": os.getpid()}


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
def ticks_seen() -> Any:
    return {"ticks": ticks_run, "slots": ticks, "pid": os.getpid()}
