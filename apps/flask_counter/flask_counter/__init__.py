"""A Flask counter whose state is the same in every worker process.

``create_app()`` builds the app; ``flask_counter.wsgi:app`` is what servers load.
"""

import json
import math
import os
import re
import time
from typing import Any

from flask import (
    Flask,
    abort,
    flash,
    get_flashed_messages,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_caching import Cache
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from flask_session import Session  # type: ignore[import-untyped]
from werkzeug.exceptions import HTTPException

import shared_core.contrib.limits  # noqa: F401 - makes limits know shared://
from shared_core import LockTimeout, Occurrence, RunOnceFailed, Scheduler, StateError
from shared_core.contrib.cachelib import SharedStateCache
from shared_core.flask import SharedStateExtension, schedule, subscribe


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
shared = SharedStateExtension(app_name="flask_counter", near_cache=("count:",))
cache = Cache()  # CACHE_TYPE below: one cache for every worker
MAX_BY = 1000
MAX_JOB_SECONDS = 30
TICK_SECONDS = tick_seconds(os.environ.get("TICK_SECONDS", "2"))  # the scheduled job; 0: none
# Seconds a worker waits for the start-up task another one runs: below gunicorn's
# worker timeout (30 s), since the first wait is in the factory, as the worker boots.
START_WAIT = 20
TICKS_KEPT = 600  # seconds /ticks shows an occurrence of the scheduled job
SEEN_FOR = 60  # seconds a worker stays on the page's list of workers after it served the page
LIMIT = "10 per minute"  # /limited, per client address, across all workers
CACHE_SECONDS = 30  # how long /cached serves the value one worker computed


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app; ``test_config`` overrides settings such as ``SHARED_STATE_URL``."""
    app = Flask(__name__)
    app.config.from_mapping(
        MAX_CONTENT_LENGTH=16 * 1024,
        CACHE_TYPE="shared_core.contrib.flask_caching.SharedStateCache",
        SESSION_STORE=os.environ.get("SESSION_STORE", "cookie"),  # or "server"
        TICK_SECONDS=TICK_SECONDS,
    )
    app.config.from_mapping(test_config or {})
    tick_every = tick_seconds(app.config["TICK_SECONDS"])  # 0: no scheduled job

    @app.before_request
    def limit_body() -> None:
        # Flask checks MAX_CONTENT_LENGTH only when a body is read: refuse it at once.
        if (request.content_length or 0) > app.config["MAX_CONTENT_LENGTH"]:
            abort(413)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        response = exc.get_response()  # keeps headers such as Allow on a 405
        response.set_data(json.dumps({"error": exc.description}))
        response.content_type = "application/json"
        return response

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(exc: RateLimitExceeded) -> Any:
        return {"error": f"rate limit exceeded: {exc.description}", "pid": os.getpid()}, 429

    state = shared.init_app(app)
    # Rate limits, cache and server-side sessions on the app's state (after init_app).
    app.config.update(RATELIMIT_STORAGE_URI="shared://", RATELIMIT_STORAGE_OPTIONS={"state": state})
    limiter = Limiter(get_remote_address, app=app)
    cache.init_app(app)
    if app.config["SESSION_STORE"] == "server":
        app.config.update(SESSION_TYPE="cachelib", SESSION_CACHELIB=SharedStateCache(state))
        Session(app)
    loaded = {"generation": 0}  # this worker's own, like a loaded config, a cache, a model
    alone = {"count": 0}  # what a per-worker global (naive.py) would say: this worker's count

    def add(key: str, by: int) -> int:
        count = state.incr(f"count:{key}", by)
        if key == "counter":
            alone["count"] += by
        return count

    def zero(key: str) -> None:
        state.set(f"count:{key}", 0)
        if key == "counter":
            alone["count"] = 0  # in this worker only, as a global would be

    def load_config(*message: Any) -> None:
        # On each message and each (re)subscribe: one sent in between is missed.
        loaded["generation"] = state.get("config:generation", 0)

    subscribe(app, "reload", callback=load_config, on_connect=load_config)

    def warm_up() -> None:
        # A start-up task (a migration, a cache to fill): one worker runs it
        # per start of the deployment, the others wait for it to finish.
        state.incr("startup:runs")
        state.set("startup:by", os.getpid())
        if os.environ.get("START_UP_FAIL"):  # only to show a failure reaching every worker
            raise RuntimeError("the start-up task failed (START_UP_FAIL is set)")

    started = {"here": "pending"}  # what this worker saw of the start-up task

    @app.before_request
    def warm_up_once() -> None:
        # At start-up below; here again, before a request, while it is pending.
        if started["here"] == "pending":
            try:
                ran = state.run_once("warm-up", warm_up, wait=START_WAIT)
                started["here"] = "ran here" if ran else "done by another worker"
            except RunOnceFailed as exc:  # in every worker, not only the one that ran it
                started["here"] = f"failed: {exc}"
            except StateError as exc:
                # The state away, or another worker's run not done within START_WAIT
                # (LockTimeout): still pending, tried again before a later request,
                # as the Quart and FastAPI apps try again in the background.
                app.logger.warning("the start-up task is still pending: %s", exc)

    warm_up_once()  # a StateError only logged: the worker boots, a request tries again

    scheduler = Scheduler(state)

    @scheduler.every(tick_every or 1, name="tick")
    def tick(occurrence: Occurrence) -> None:
        # Once per period across all the workers, whichever are alive.
        state.incr("ticks")
        state.incr(f"tick:{occurrence.slot}", ttl=TICKS_KEPT)
        state.set("tick:last", {"pid": os.getpid(), "slot": occurrence.slot})

    if tick_every > 0:
        schedule(app, scheduler)  # in every worker, stopped with the app

    @app.route("/increment", methods=["GET", "POST"])
    def increment() -> Any:
        key, by = _key(), _number("by", 1, 1, MAX_BY)
        return {"count": add(key, by), "key": key, "pid": os.getpid()}

    @app.get("/report")
    def report() -> Any:
        key = _key()
        return {"count": state.get(f"count:{key}", 0), "key": key, "pid": os.getpid(), **loaded}

    @app.route("/reset", methods=["GET", "POST"])
    def reset() -> Any:
        key = _key()
        zero(key)
        return {"count": 0, "key": key, "pid": os.getpid()}

    @app.post("/broadcast/reload")
    def broadcast_reload() -> Any:
        # Every worker loads the new generation, not only the one answering.
        generation = state.incr("config:generation")
        state.publish("reload", generation)
        return {"generation": generation, "pid": os.getpid()}

    @app.post("/jobs/report")
    def run_job() -> Any:
        seconds = _number("seconds", 1, 0, MAX_JOB_SECONDS)
        try:  # one worker of the whole deployment at a time
            with state.lock("job:report", timeout=0):
                state.set("job:report:holder", os.getpid())
                time.sleep(seconds)  # the work; a worker killed here frees the lock
        except LockTimeout:
            return {"error": "the report job is already running in another worker"}, 409
        return {"ran": True, "seconds": seconds, "pid": os.getpid()}

    @app.get("/jobs/report")
    def job_status() -> Any:
        return {"holder": state.get("job:report:holder"), "pid": os.getpid()}

    @app.get("/ticks")
    def ticks() -> Any:
        found = state.get_many(k for k in state.keys("tick:") if k[5:].isdigit())
        runs = {int(k[5:]): n for k, n in found.items()}  # slot -> times it ran: always 1
        startup = {"runs": state.get("startup:runs", 0), "by": state.get("startup:by")}
        return {"ticks": state.get("ticks", 0), "runs_per_slot": runs,
                "last": state.get("tick:last"), "startup": startup,
                "startup_here": started["here"], "pid": os.getpid()}  # fmt: skip

    @app.get("/whoami")
    def whoami() -> Any:
        # Behind a proxy, only right with ProxyFix (wsgi.py).
        return {"client": request.remote_addr, "scheme": request.scheme, "pid": os.getpid()}

    @app.get("/healthz")
    def healthz() -> Any:
        state.get("config:generation")  # a 503 while the state is unavailable
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/limited")
    @limiter.limit(LIMIT)
    def limited() -> Any:
        return {"ok": True, "pid": os.getpid()}

    @app.get("/cached")
    def cached() -> Any:
        return {"value": computed(), "pid": os.getpid()}

    @app.get("/session")
    def visits() -> Any:
        # Only grows if every worker accepts the session set by another.
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"], "pid": os.getpid()}

    @app.get("/")
    def index() -> Any:
        pid = os.getpid()
        state.set(f"worker:{pid}", True, ttl=SEEN_FOR)  # on the list for a minute
        page = {
            "count": state.get("count:counter", 0),  # the count that /increment raises
            "alone": alone["count"],
            "pid": pid,
            "workers": sorted(int(k.removeprefix("worker:")) for k in state.keys("worker:")),
            "messages": get_flashed_messages(),
            "increment_url": url_for("increment", _external=True),
        }
        return render_template("index.html", **page)

    @app.post("/")
    def index_form() -> Any:
        # The page's buttons: post, then redirect (303) to the page, which shows the flash.
        button = request.form.get("button", "increment")
        if button == "increment":
            flash(f"Worker {os.getpid()} raised the count to {add('counter', 1)}.")
        elif button == "reset":
            zero("counter")
            flash(f"Worker {os.getpid()} reset the count to 0.")
        else:
            abort(400, "button must be increment or reset")
        return redirect(url_for("index"), 303)

    return app


@cache.cached(timeout=CACHE_SECONDS, key_prefix="computed")
def computed() -> dict[str, Any]:
    """The expensive work: done by one worker, then served by every worker."""
    return {"computed_by": os.getpid(), "at": time.time()}


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
