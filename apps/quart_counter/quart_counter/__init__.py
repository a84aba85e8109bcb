"""A Quart counter whose state is the same in every worker process.

``create_app()`` builds the app; ``quart_counter.asgi:app`` is what servers load.
It attaches to the shared state in ``before_serving`` and uses the async API,
so waiting for the state server never blocks other requests.
Set ``COUNTER_MODE=naive`` to see the bug this fixes: a per-worker global.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
from contextlib import suppress
from typing import Any

from quart import Quart, abort, flash, jsonify, redirect, render_template, request, session, url_for
from quart.globals import request_ctx
from quart.wrappers import Response
from werkzeug.exceptions import HTTPException

from shared_core import AsyncSharedState, StateUnavailable

from .counters import Counters, NaiveCounters, SharedCounters

# What a user copying this app changes: the app name (it picks the private
# socket of the embedded state server) and the limits below.
APP_NAME = "quart_counter"
KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_BY = 1000
MAX_JOB_SECONDS = 30


def create_app(test_config: dict[str, Any] | None = None) -> Quart:
    """Build the app; ``test_config`` overrides settings read from the environment."""
    app = Quart(__name__)
    app.config.from_mapping(
        COUNTER_MODE=os.environ.get("COUNTER_MODE", "shared"),
        SHARED_STATE_URL=os.environ.get("SHARED_STATE_URL"),
        MAX_CONTENT_LENGTH=16 * 1024,
    )
    if test_config:
        app.config.from_mapping(test_config)

    counters: Counters
    # Registered first, so that at shutdown it stops before the state closes.
    listener: list[asyncio.Task[None]] = []

    @app.before_serving
    async def start_listening() -> None:
        # One task per worker acts on reload broadcasts.
        listener.append(asyncio.ensure_future(counters.listen()))

    @app.after_serving
    async def stop_listening() -> None:
        for task in listener:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    if app.config["COUNTER_MODE"] == "naive":
        # The usual bug: every worker makes up its own key, so a session cookie
        # signed by one worker is rejected by the others.
        app.secret_key = secrets.token_hex(32)
        counters = NaiveCounters()
    else:
        state = AsyncSharedState(app.config["SHARED_STATE_URL"], app=APP_NAME)
        counters = SharedCounters(state)

        @app.before_serving
        async def attach() -> None:
            # Made once for the whole deployment: a session signed by one
            # worker is valid on every other.
            try:
                app.secret_key = await state.secret("SECRET_KEY")
            except StateUnavailable as exc:
                # Start anyway (and answer 503) rather than fail to start.
                app.logger.warning("no SECRET_KEY yet: %s", exc)

        @app.before_request
        async def ensure_secret_key() -> None:
            if not app.secret_key:
                app.secret_key = await state.secret("SECRET_KEY")
                # The session was opened without a key: open it again.
                request_ctx.session = await app.session_interface.open_session(app, request)

        @app.after_serving
        async def detach() -> None:
            await state.aclose()

    @app.before_request
    async def limit_body() -> None:
        if (request.content_length or 0) > app.config["MAX_CONTENT_LENGTH"]:
            abort(413)

    register_routes(app, counters)
    register_errors(app)
    return app


class BadInput(Exception):
    """A request parameter failed validation."""


def _params() -> tuple[str, int]:
    """The validated ``key`` and ``by`` query parameters; 400 if bad."""
    key = request.args.get("key", "counter")
    if not KEY_RE.match(key):
        raise BadInput("key must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    raw = request.args.get("by", "1")
    if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= MAX_BY:
        raise BadInput(f"by must be a whole number from 1 to {MAX_BY}")
    return key, int(raw)


def _job_seconds() -> int:
    raw = request.args.get("seconds", "1")
    if not re.fullmatch(r"[0-9]{1,2}", raw) or int(raw) > MAX_JOB_SECONDS:
        raise BadInput(f"seconds must be a whole number from 0 to {MAX_JOB_SECONDS}")
    return int(raw)


def register_routes(app: Quart, counters: Counters) -> None:
    mode = app.config["COUNTER_MODE"]

    @app.route("/increment", methods=["GET", "POST"])
    async def increment() -> Any:
        key, by = _params()
        return {"count": await counters.incr(key, by), "key": key, "pid": os.getpid()}

    @app.get("/report")
    async def report() -> Any:
        key, _ = _params()
        count = await counters.get(key)
        return {
            "count": count,
            "key": key,
            "pid": os.getpid(),
            "mode": mode,
            "generation": counters.generation,
        }

    @app.post("/broadcast/reload")
    async def broadcast_reload() -> Any:
        # Every worker loads the new generation, not only the one answering.
        return {"generation": await counters.reload(), "pid": os.getpid()}

    @app.route("/reset", methods=["GET", "POST"])
    async def reset() -> Any:
        key, _ = _params()
        await counters.reset(key)
        return {"count": 0, "key": key, "pid": os.getpid()}

    @app.post("/jobs/report")
    async def run_job() -> Any:
        # Only one worker of the deployment may run it at a time.
        seconds = _job_seconds()
        if not await counters.run_job(seconds):
            return {"error": "the report job is already running in another worker"}, 409
        return {"ran": True, "seconds": seconds, "pid": os.getpid()}

    @app.get("/jobs/report")
    async def job_status() -> Any:
        return {"holder": await counters.job_holder(), "pid": os.getpid()}

    @app.get("/whoami")
    async def whoami() -> Any:
        # The client as the app sees it: behind a proxy, see asgi.py.
        return {"client": request.remote_addr, "scheme": request.scheme, "pid": os.getpid()}

    @app.get("/healthz")
    async def healthz() -> Any:
        await counters.ping()
        return {"status": "ok", "pid": os.getpid(), "mode": mode}

    @app.get("/session")
    async def visits() -> Any:
        # A per-user count kept in the signed session cookie: it only grows
        # if every worker accepts the signature of every other.
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"], "pid": os.getpid()}

    @app.route("/", methods=["GET", "POST"])
    async def index() -> Any:
        if request.method == "POST":
            await flash(f"You are visitor number {await counters.incr('visitors', 1)}.")
            return redirect(url_for("index"))
        return await render_template("index.html", pid=os.getpid(), mode=mode)


def register_errors(app: Quart) -> None:
    @app.errorhandler(BadInput)
    async def bad_input(exc: BadInput) -> tuple[Response, int]:
        return jsonify(error=str(exc)), 400

    @app.errorhandler(StateUnavailable)
    async def unavailable(exc: StateUnavailable) -> tuple[Response, int]:
        app.logger.error("state server unavailable: %s", exc)
        return jsonify(error="the shared state is unavailable, try again"), 503

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        response = exc.get_response()  # keeps headers such as Allow on a 405
        response.set_data(json.dumps({"error": exc.description}))
        response.content_type = "application/json"
        return response
