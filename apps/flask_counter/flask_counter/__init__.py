"""A Flask counter whose state is the same in every worker process.

``create_app()`` builds the app; ``flask_counter.wsgi:app`` is what servers load.
Set ``COUNTER_MODE=naive`` to see the bug this fixes: a per-worker global.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from typing import Any

from flask import Flask, abort, flash, jsonify, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.wrappers import Response

from shared_core import SharedState, StateUnavailable

from .counters import Counters, NaiveCounters, SharedCounters

# What a user copying this app changes: the app name (it picks the private
# socket of the embedded state server) and the limits below.
APP_NAME = "flask_counter"
KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_BY = 1000
MAX_JOB_SECONDS = 30


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app; ``test_config`` overrides settings read from the environment."""
    app = Flask(__name__)
    app.config.from_mapping(
        COUNTER_MODE=os.environ.get("COUNTER_MODE", "shared"),
        SHARED_STATE_URL=os.environ.get("SHARED_STATE_URL"),
        MAX_CONTENT_LENGTH=16 * 1024,
    )
    if test_config:
        app.config.from_mapping(test_config)

    counters: Counters
    if app.config["COUNTER_MODE"] == "naive":
        # The usual bug: every worker makes up its own key, so a session cookie
        # signed by one worker is rejected by the others.
        app.secret_key = secrets.token_hex(32)
        counters = NaiveCounters()
    else:
        state = SharedState(app.config["SHARED_STATE_URL"], app=APP_NAME)
        counters = SharedCounters(state)
        app.session_interface = SharedKeySessionInterface(state)

    @app.before_request
    def limit_body() -> None:
        # Flask checks MAX_CONTENT_LENGTH only when a body is read; refuse
        # an oversized one at once, whatever the route.
        if (request.content_length or 0) > app.config["MAX_CONTENT_LENGTH"]:
            abort(413)

    app.extensions["counters"] = counters
    register_routes(app, counters)
    register_errors(app)
    return app


def _params() -> tuple[str, int]:
    """The validated ``key`` and ``by`` query parameters; 400 if bad."""
    key = request.args.get("key", "counter")
    if not KEY_RE.match(key):
        raise BadInput("key must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    raw = request.args.get("by", "1")
    if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= MAX_BY:
        raise BadInput(f"by must be a whole number from 1 to {MAX_BY}")
    return key, int(raw)


class BadInput(Exception):
    """A request parameter failed validation."""


class SharedKeySessionInterface(SecureCookieSessionInterface):
    """Signs sessions with a ``SECRET_KEY`` made once for the whole deployment,
    so that a session set by one worker is valid on every other.

    The key is fetched when the first session is opened, not at start-up, so
    that a worker starts (and answers 503) while the state server is away.
    """

    def __init__(self, state: SharedState) -> None:
        self.state = state

    def get_signing_serializer(self, app: Flask) -> Any:
        if not app.secret_key:
            app.secret_key = self.state.secret("SECRET_KEY")
        return super().get_signing_serializer(app)


def _job_seconds() -> int:
    raw = request.args.get("seconds", "1")
    if not re.fullmatch(r"[0-9]{1,2}", raw) or int(raw) > MAX_JOB_SECONDS:
        raise BadInput(f"seconds must be a whole number from 0 to {MAX_JOB_SECONDS}")
    return int(raw)


def register_routes(app: Flask, counters: Counters) -> None:
    mode = app.config["COUNTER_MODE"]

    @app.route("/increment", methods=["GET", "POST"])
    def increment() -> Any:
        key, by = _params()
        return {"count": counters.incr(key, by), "key": key, "pid": os.getpid()}

    @app.before_request
    def listen() -> None:
        counters.listen()

    @app.get("/report")
    def report() -> Any:
        key, _ = _params()
        return {
            "count": counters.get(key),
            "key": key,
            "pid": os.getpid(),
            "mode": mode,
            "generation": counters.generation,
        }

    @app.post("/broadcast/reload")
    def broadcast_reload() -> Any:
        # Every worker loads the new generation, not only the one answering.
        return {"generation": counters.reload(), "pid": os.getpid()}

    @app.route("/reset", methods=["GET", "POST"])
    def reset() -> Any:
        key, _ = _params()
        counters.reset(key)
        return {"count": 0, "key": key, "pid": os.getpid()}

    @app.post("/jobs/report")
    def run_job() -> Any:
        # Only one worker of the deployment may run it at a time.
        seconds = _job_seconds()
        if not counters.run_job(seconds):
            return {"error": "the report job is already running in another worker"}, 409
        return {"ran": True, "seconds": seconds, "pid": os.getpid()}

    @app.get("/jobs/report")
    def job_status() -> Any:
        return {"holder": counters.job_holder(), "pid": os.getpid()}

    @app.get("/whoami")
    def whoami() -> Any:
        # The client as the app sees it: behind a proxy, only right with ProxyFix.
        return {"client": request.remote_addr, "scheme": request.scheme, "pid": os.getpid()}

    @app.get("/healthz")
    def healthz() -> Any:
        counters.ping()
        return {"status": "ok", "pid": os.getpid(), "mode": mode}

    @app.get("/session")
    def visits() -> Any:
        # A per-user count kept in the signed session cookie: it only grows
        # if every worker accepts the signature of every other.
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"], "pid": os.getpid()}

    @app.route("/", methods=["GET", "POST"])
    def index() -> Any:
        if request.method == "POST":
            flash(f"You are visitor number {counters.incr('visitors', 1)}.")
            return redirect(url_for("index"))
        return render_template("index.html", pid=os.getpid(), mode=mode)


def register_errors(app: Flask) -> None:
    @app.errorhandler(BadInput)
    def bad_input(exc: BadInput) -> tuple[Response, int]:
        return jsonify(error=str(exc)), 400

    @app.errorhandler(StateUnavailable)
    def unavailable(exc: StateUnavailable) -> tuple[Response, int]:
        app.logger.error("state server unavailable: %s", exc)
        return jsonify(error="the shared state is unavailable, try again"), 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response | tuple[Response, int]:
        if isinstance(exc, InternalServerError) and isinstance(
            exc.original_exception, StateUnavailable
        ):
            # Raised while opening the session, before any view ran.
            return unavailable(exc.original_exception)
        response = exc.get_response()  # keeps headers such as Allow on a 405
        response.set_data(json.dumps({"error": exc.description}))
        response.content_type = "application/json"
        return response
