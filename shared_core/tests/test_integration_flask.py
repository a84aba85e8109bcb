"""shared_core.flask against real Flask apps (its test client) and a real state."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask, session
from flask.sessions import SecureCookieSessionInterface
from werkzeug.test import TestResponse

from shared_core import Scheduler, SharedState, StateUnavailable
from shared_core.flask import SharedStateExtension, close, get_state, schedule, subscribe
from shared_core.testing import StateServer, private_dir, wait_for

UNAVAILABLE = {"error": "the shared state is unavailable, try again"}

# One extension for every app, as in an app factory.
shared = SharedStateExtension()


def create_app(url: str, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(SHARED_STATE_URL=url, **config)
    shared.init_app(app)
    ran: list[str] = []  # the views that ran
    app.extensions["ran"] = ran

    @app.get("/session")
    def visits() -> Any:
        ran.append("session")
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"]}

    @app.post("/incr")
    def incr() -> Any:
        ran.append("incr")
        return {"n": shared.state.incr("n")}

    return app


def session_cookie(response: TestResponse) -> str:
    header = response.headers["Set-Cookie"]
    assert header.startswith("session=")
    return header.split(";", 1)[0].removeprefix("session=")


def visit(app: Flask, cookie: str | None = None) -> TestResponse:
    client = app.test_client()
    if cookie:
        client.set_cookie("session", cookie)
    return client.get("/session")


def test_sessions_are_signed_with_the_secret_of_the_state(url: str, app: str) -> None:
    first, second = create_app(url), create_app(url)  # two workers of one deployment
    other = create_app(url.replace(app, f"{app}x"))  # another deployment

    response = visit(first)
    assert response.status_code == 200, response.text
    assert response.json == {"visits": 1}
    cookie = session_cookie(response)
    again = visit(second, cookie)
    assert again.json == {"visits": 2}
    assert visit(other, session_cookie(again)).json == {"visits": 1}

    # Signed with nothing else than the state's SECRET_KEY.
    check = Flask("check")
    check.secret_key = SharedState(url).secret("SECRET_KEY")
    serializer = SecureCookieSessionInterface().get_signing_serializer(check)
    assert serializer is not None
    assert serializer.loads(session_cookie(again)) == {"visits": 2}
    assert first.secret_key == check.secret_key


def test_an_unreachable_state_is_a_503_before_any_view_runs(unreachable: str) -> None:
    app = create_app(unreachable)  # starts although the state is away

    response = visit(app)
    assert response.status_code == 503
    assert response.json == UNAVAILABLE
    assert "Set-Cookie" not in response.headers
    assert app.test_client().post("/incr").status_code == 503
    assert app.extensions["ran"] == []
    assert not app.secret_key


def test_a_view_that_cannot_reach_the_state_is_a_503(unreachable: str) -> None:
    app = create_app(unreachable, SECRET_KEY="set-by-the-user")  # no secret to read

    assert visit(app).json == {"visits": 1}
    response = app.test_client().post("/incr")
    assert response.status_code == 503
    assert response.json == UNAVAILABLE
    assert app.extensions["ran"] == ["session", "incr"]


def test_a_worker_started_while_the_state_is_away_serves_when_it_is_back() -> None:
    workdir = private_dir("st-")
    server = StateServer(workdir, connect_timeout=0.5)
    app = create_app(server.url)
    assert visit(app).status_code == 503
    with server:
        response = visit(app)
        assert response.status_code == 200
        assert response.json == {"visits": 1}
        assert app.test_client().post("/incr").json == {"n": 1}


def test_several_apps_in_one_process_each_have_their_state(url: str, app: str) -> None:
    first, second = create_app(url), create_app(url.replace(app, f"{app}x"))
    assert isinstance(first.extensions["shared_core"], SharedState)
    assert get_state(first) is first.extensions["shared_core"]
    assert get_state(first).url == url

    assert first.test_client().post("/incr").json == {"n": 1}
    assert first.test_client().post("/incr").json == {"n": 2}
    assert second.test_client().post("/incr").json == {"n": 1}
    with second.app_context():
        assert shared.state is get_state(second)


def test_options_of_the_extension(url: str, unreachable: str) -> None:
    app = Flask(__name__)
    SharedStateExtension(app, url=url, sessions=False, errors=False)
    assert get_state(app).url == url

    @app.get("/fail")
    def fail() -> Any:
        raise StateUnavailable("down")

    app.config["SECRET_KEY"] = "own"
    with app.test_request_context():
        session["x"] = 1  # Flask's own sessions
    response = app.test_client().get("/fail")
    assert response.status_code == 500

    configured = Flask(__name__)
    configured.config["SHARED_STATE_URL"] = unreachable
    SharedStateExtension(configured, url=url)
    assert get_state(configured).url == unreachable  # the app's config wins


def test_the_extension_asks_for_a_near_cache_where_the_engine_has_one(url: str) -> None:
    app = Flask(__name__)
    SharedStateExtension(app, url=url, near_cache=("count:",))
    state = get_state(app)
    kept = () if url.startswith(("postgresql", "tcp")) else ("count:",)
    assert state._config.near_cache == kept
    state.set("count:a", 1)
    assert [state.get("count:a") for _ in range(3)] == [1, 1, 1]
    state.close()
    with pytest.raises(TypeError, match="not one string"):
        SharedStateExtension(near_cache="count:")


def test_misuse_is_reported_clearly(url: str) -> None:
    app = create_app(url)
    with pytest.raises(RuntimeError, match="already initialised"):
        shared.init_app(app)
    with pytest.raises(RuntimeError, match="not initialised on app"):
        get_state(Flask("bare"))


def test_subscribe_listens_in_each_worker_from_its_first_request(url: str) -> None:
    app = create_app(url)
    got: list[Any] = []
    connected = threading.Event()
    subscribe(
        app,
        "reload",
        callback=lambda channel, message: got.append(message),
        on_connect=connected.set,
    )
    state = get_state(app)
    assert state.publish("reload", "before") == 0  # nobody subscribed yet

    try:
        assert app.test_client().post("/incr").status_code == 200
        assert connected.is_set()
        assert app.test_client().post("/incr").status_code == 200  # subscribes once
        assert state.publish("reload", {"generation": 1}) == 1
        wait_for(lambda: got, 10, "the message")
        assert got == [{"generation": 1}]
    finally:
        close(app)
    # Unsubscribed: the embedded server counts a subscriber out when it sees
    # its connection end, which may be just after close() returns.
    wait_for(lambda: state.publish("reload", "after") == 0, 10, "no subscriber left")
    connected.clear()
    try:
        assert app.test_client().post("/incr").status_code == 200  # subscribes again
        assert connected.is_set()
        assert state.publish("reload", "again") == 1
    finally:
        close(app)


def test_subscribe_while_the_state_is_away_is_a_503_and_retried(unreachable: str) -> None:
    app = create_app(unreachable, SECRET_KEY="own")
    subscribe(app, "reload", callback=lambda channel, message: None)
    response = app.test_client().post("/incr")
    assert response.status_code == 503
    assert response.json == UNAVAILABLE
    assert app.extensions["ran"] == []


def test_schedule_runs_the_scheduler_in_the_worker_until_close(url: str) -> None:
    app = create_app(url)
    state = get_state(app)
    scheduler = Scheduler(state)

    @scheduler.every(0.2, name="tick")
    def tick() -> None:
        state.incr("ticks")

    try:
        assert schedule(app, scheduler) is scheduler
        assert scheduler.running  # from the factory on
        wait_for(lambda: state.get("ticks", 0) >= 2, 10, "two ticks")
        close(app)
        assert not scheduler.running
        # A later request starts it again, as it does in a forked worker.
        assert app.test_client().post("/incr").status_code == 200
        assert scheduler.running
    finally:
        close(app)


def test_a_flask_command_starts_no_scheduler_until_a_request(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``flask shell``, ``flask db upgrade``: the factory runs, no job should.
    monkeypatch.setenv("FLASK_RUN_FROM_CLI", "true")
    app = create_app(url)
    scheduler = Scheduler(get_state(app))
    scheduler.add(lambda: None, 1, name="noop")
    try:
        schedule(app, scheduler)
        assert not scheduler.running
        assert app.test_client().post("/incr").status_code == 200  # ``flask run``
        assert scheduler.running
    finally:
        close(app)
