"""shared_core.quart against real Quart apps (its test client) and a real state."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from quart import Quart, session
from quart import typing as quart_typing
from quart.sessions import SecureCookieSessionInterface
from quart.wrappers import Response

from shared_core import AsyncSharedState, StateUnavailable
from shared_core.quart import SharedStateExtension, background_task, get_state

pytestmark = pytest.mark.anyio

UNAVAILABLE = {"error": "the shared state is unavailable, try again"}

# One extension for every app, as in an app factory.
shared = SharedStateExtension()


def create_app(url: str, **config: Any) -> Quart:
    app = Quart(__name__)
    app.config.update(SHARED_STATE_URL=url, **config)
    shared.init_app(app)
    ran: list[str] = []  # the views that ran
    app.extensions["ran"] = ran

    @app.get("/session")
    async def visits() -> Any:
        ran.append("session")
        session["visits"] = session.get("visits", 0) + 1
        return {"visits": session["visits"]}

    @app.post("/incr")
    async def incr() -> Any:
        ran.append("incr")
        return {"n": await shared.state.incr("n")}

    return app


def session_cookie(response: Response) -> str:
    header = response.headers["Set-Cookie"]
    assert header.startswith("session=")
    return header.split(";", 1)[0].removeprefix("session=")


async def visit(client: quart_typing.TestClientProtocol, cookie: str | None = None) -> Response:
    if cookie:
        client.set_cookie("localhost", "session", cookie)
    response = await client.get("/session")
    assert isinstance(response, Response)
    return response


async def post(client: quart_typing.TestClientProtocol, path: str) -> tuple[int, Any]:
    response = await client.post(path)
    return response.status_code, await response.get_json()


async def test_sessions_are_signed_with_the_secret_of_the_state(url: str, app: str) -> None:
    first, second = create_app(url), create_app(url)  # two workers of one deployment
    other = create_app(url.replace(app, f"{app}x"))  # another deployment
    async with first.test_app() as one, second.test_app() as two, other.test_app() as three:
        response = await visit(one.test_client())
        assert response.status_code == 200, await response.get_data()
        assert await response.get_json() == {"visits": 1}
        again = await visit(two.test_client(), session_cookie(response))
        assert await again.get_json() == {"visits": 2}
        elsewhere = await visit(three.test_client(), session_cookie(again))
        assert await elsewhere.get_json() == {"visits": 1}

        # Signed with nothing else than the state's SECRET_KEY.
        check = Quart("check")
        async with AsyncSharedState(url) as state:
            check.secret_key = await state.secret("SECRET_KEY")
        serializer = SecureCookieSessionInterface().get_signing_serializer(check)
        assert serializer is not None
        assert serializer.loads(session_cookie(again)) == {"visits": 2}


async def test_an_unreachable_state_is_a_503_before_any_view_runs(unreachable: str) -> None:
    app = create_app(unreachable)
    async with app.test_app() as test_app:  # starts although the state is away
        client = test_app.test_client()
        response = await visit(client)
        assert response.status_code == 503
        assert await response.get_json() == UNAVAILABLE
        assert "Set-Cookie" not in response.headers
        assert await post(client, "/incr") == (503, UNAVAILABLE)
    assert app.extensions["ran"] == []
    assert not app.secret_key


async def test_a_view_that_cannot_reach_the_state_is_a_503(unreachable: str) -> None:
    app = create_app(unreachable, SECRET_KEY="set-by-the-user")  # no secret to read
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert await (await visit(client)).get_json() == {"visits": 1}
        assert await post(client, "/incr") == (503, UNAVAILABLE)
    assert app.extensions["ran"] == ["session", "incr"]


async def test_without_before_serving_the_state_attaches_on_first_use(url: str) -> None:
    app = create_app(url)  # test_client() alone runs no lifespan, as some servers
    started = asyncio.Event()

    async def task() -> None:
        started.set()
        await asyncio.Event().wait()

    background_task(app, task)
    client = app.test_client()
    assert await (await visit(client)).get_json() == {"visits": 1}
    assert await post(client, "/incr") == (200, {"n": 1})
    await asyncio.wait_for(started.wait(), 5)
    await get_state(app).aclose()


async def test_a_background_listener_runs_while_the_app_serves(url: str) -> None:
    app = create_app(url)
    state = get_state(app)
    got: list[Any] = []
    stopped = asyncio.Event()

    async def listen() -> None:
        try:
            async with state.subscribe("reload") as messages:
                async for _, message in messages:
                    got.append(message)
        finally:
            stopped.set()

    assert background_task(app, listen) is listen
    async with app.test_app():
        for _ in range(500):  # until the listener has subscribed
            if await state.publish("reload", "hello"):
                break
            await asyncio.sleep(0.01)
        await state.publish("reload", {"generation": 1})
        for _ in range(500):
            if {"generation": 1} in got:
                break
            await asyncio.sleep(0.01)
        assert got == ["hello", {"generation": 1}]
        assert not stopped.is_set()
    assert stopped.is_set()  # cancelled and awaited by after_serving


async def test_a_background_task_that_fails_is_started_again(url: str) -> None:
    app = create_app(url)
    runs: list[int] = []
    done = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise StateUnavailable("not yet")
        if len(runs) == 2:
            raise ValueError("a bug")
        done.set()

    background_task(app, flaky, retry_delay=0.01)
    async with app.test_app():
        await asyncio.wait_for(done.wait(), 5)
    assert runs == [0, 1, 2]


async def test_several_apps_in_one_process_each_have_their_state(url: str, app: str) -> None:
    first, second = create_app(url), create_app(url.replace(app, f"{app}x"))
    assert isinstance(first.extensions["shared_core"], AsyncSharedState)
    assert get_state(first) is not get_state(second)
    async with first.test_app() as one, second.test_app() as two:
        assert await post(one.test_client(), "/incr") == (200, {"n": 1})
        assert await post(one.test_client(), "/incr") == (200, {"n": 2})
        assert await post(two.test_client(), "/incr") == (200, {"n": 1})
        async with second.app_context():
            assert shared.state is get_state(second)


async def test_the_extension_asks_for_a_near_cache_where_the_engine_has_one(url: str) -> None:
    app = Quart(__name__)
    SharedStateExtension(app, url=url, near_cache=("count:",))
    state = get_state(app)
    kept = () if url.startswith(("postgresql", "tcp")) else ("count:",)
    assert state._config.near_cache == kept
    await state.set("count:a", 1)
    assert [await state.get("count:a") for _ in range(3)] == [1, 1, 1]
    await state.aclose()


async def test_misuse_is_reported_clearly(unreachable: str) -> None:
    app = create_app(unreachable)
    with pytest.raises(RuntimeError, match="already initialised"):
        shared.init_app(app)
    bare = Quart("bare")
    with pytest.raises(RuntimeError, match="not initialised on app"):
        get_state(bare)
    with pytest.raises(RuntimeError, match="not initialised on app"):
        background_task(bare, asyncio.sleep)  # type: ignore[arg-type]
