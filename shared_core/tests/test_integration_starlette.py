"""shared_core.starlette against real FastAPI and Starlette apps and a real state.

The apps are driven as an ASGI server drives them, lifespan included, with
httpx's ASGI transport (starlette's TestClient wants httpx2 from starlette 1.x).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, WebSocket
from itsdangerous import TimestampSigner
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from shared_core import AsyncSharedState, StateUnavailable
from shared_core.starlette import (
    SharedSecretSessionMiddleware,
    SharedStateDep,
    background_task,
    get_state,
    init_app,
    lifespan,
)

pytestmark = pytest.mark.anyio

UNAVAILABLE = {"error": "the shared state is unavailable, try again"}


@asynccontextmanager
async def serving(
    app: ASGIApp, base_url: str = "http://testserver"
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` between its ASGI lifespan's startup and shutdown."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    running: asyncio.Future[None] = asyncio.ensure_future(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
        await running


async def websocket(app: ASGIApp, path: str) -> list[Message]:
    """What ``app`` sends to a websocket client that connects to ``path`` and waits."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "scheme": "ws",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "subprotocols": [],
        "state": {},
    }
    sent: list[Message] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        if incoming:
            return incoming.pop()
        await asyncio.sleep(3600)  # the client says nothing more
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def create_app(url: str, *, sessions: bool = True) -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    init_app(app, url, sessions=sessions)
    ran: list[str] = []  # the endpoints that ran
    app.state.ran = ran

    @app.get("/session")
    async def visits(request: Request) -> dict[str, Any]:
        ran.append("session")
        request.session["visits"] = request.session.get("visits", 0) + 1
        return {"visits": request.session["visits"]}

    @app.post("/incr")
    async def incr(state: SharedStateDep) -> dict[str, Any]:
        ran.append("incr")
        return {"n": await state.incr("n")}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, state: SharedStateDep) -> None:
        await websocket.accept()
        await websocket.send_json({"n": await state.incr("n")})
        await websocket.close()

    return app


def session_cookie(response: httpx.Response, name: str = "session") -> str:
    cookie = response.cookies.get(name)
    assert cookie, response.headers
    return cookie


async def visit(app: FastAPI, cookie: str | None = None) -> httpx.Response:
    async with serving(app) as client:
        if cookie:
            client.cookies.set("session", cookie)
        return await client.get("/session")


async def test_sessions_are_signed_with_the_secret_of_the_state(url: str, app: str) -> None:
    first, second = create_app(url), create_app(url)  # two workers of one deployment
    other = create_app(url.replace(app, f"{app}x"))  # another deployment

    response = await visit(first)
    assert response.status_code == 200, response.text
    assert response.json() == {"visits": 1}
    again = await visit(second, session_cookie(response))
    assert again.json() == {"visits": 2}
    assert (await visit(other, session_cookie(again))).json() == {"visits": 1}

    # Signed with nothing else than the state's SECRET_KEY.
    async with AsyncSharedState(url) as state:
        signer = TimestampSigner(await state.secret("SECRET_KEY"))
    signed = signer.unsign(session_cookie(again))
    assert json.loads(base64.b64decode(signed)) == {"visits": 2}


async def test_an_unreachable_state_is_a_503_before_anything_runs(unreachable: str) -> None:
    app = create_app(unreachable)
    async with serving(app) as client:  # starts although the state is away
        response = await client.get("/session")
        assert response.status_code == 503
        assert response.json() == UNAVAILABLE
        assert "set-cookie" not in response.headers
        assert (await client.post("/incr")).status_code == 503
        sent = await websocket(app, "/ws")
        assert [(m["type"], m.get("code")) for m in sent] == [("websocket.close", 1013)]
    assert app.state.ran == []


async def test_an_endpoint_that_cannot_reach_the_state_is_a_503(unreachable: str) -> None:
    app = create_app(unreachable, sessions=False)
    async with serving(app) as client:
        response = await client.post("/incr")
        assert response.status_code == 503
        assert response.json() == UNAVAILABLE
    assert app.state.ran == ["incr"]


async def test_the_dependency_gives_the_apps_state(url: str) -> None:
    app = create_app(url)
    async with serving(app) as client:
        assert (await client.post("/incr")).json() == {"n": 1}
        assert (await client.post("/incr")).json() == {"n": 2}
        sent = await websocket(app, "/ws")
        assert [m["type"] for m in sent] == [
            "websocket.accept",
            "websocket.send",
            "websocket.close",
        ]
        assert json.loads(sent[1]["text"]) == {"n": 3}
    assert app.state.shared_state.url == url


async def test_a_starlette_app(url: str) -> None:
    async def incr(request: Request) -> JSONResponse:
        request.session["seen"] = True
        return JSONResponse({"n": await get_state(request).incr("n")})

    app = Starlette(routes=[Route("/incr", incr, methods=["POST"])], lifespan=lifespan)
    state = init_app(app, url)
    assert state is app.state.shared_state
    async with serving(app) as client:
        response = await client.post("/incr")
        assert response.json() == {"n": 1}
        assert session_cookie(response)


async def test_init_app_asks_for_a_near_cache_where_the_engine_has_one(url: str) -> None:
    app = Starlette(lifespan=lifespan)
    state = init_app(app, url, near_cache=("count:",))
    kept = () if url.startswith(("postgresql", "tcp")) else ("count:",)
    assert state._config.near_cache == kept
    async with serving(app):
        await state.set("count:a", 1)
        assert [await state.get("count:a") for _ in range(3)] == [1, 1, 1]


async def test_the_lifespan_runs_a_background_listener_and_stops_it(url: str) -> None:
    app = create_app(url)
    state: AsyncSharedState = app.state.shared_state
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
    async with serving(app):
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
    assert stopped.is_set()  # cancelled and awaited when the lifespan ended


async def test_the_lifespan_inside_the_apps_own(url: str) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def own_lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app):
            events.append(f"started {await app.state.shared_state.incr('n')}")
            yield
        events.append("stopped")

    app = FastAPI(lifespan=own_lifespan)
    init_app(app, url)
    async with serving(app):
        assert events == ["started 1"]
    assert events == ["started 1", "stopped"]


async def test_without_a_lifespan_the_state_attaches_on_first_use(url: str) -> None:
    app = create_app(url)
    started = asyncio.Event()

    async def task() -> None:
        started.set()

    background_task(app, task)
    transport = httpx.ASGITransport(app=app)  # runs no lifespan, as granian --interface asginl
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/session")
        assert response.json() == {"visits": 1}
        client.cookies.set("session", session_cookie(response))
        assert (await client.get("/session")).json() == {"visits": 2}
        assert (await client.post("/incr")).json() == {"n": 1}
    await asyncio.wait_for(started.wait(), 5)
    await app.state.shared_state.aclose()


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
    async with lifespan(app):
        await asyncio.wait_for(done.wait(), 5)
    assert runs == [0, 1, 2]


async def test_several_apps_in_one_process_each_have_their_state(url: str, app: str) -> None:
    first, second = create_app(url), create_app(url.replace(app, f"{app}x"))
    async with serving(first) as one, serving(second) as two:
        assert (await one.post("/incr")).json() == {"n": 1}
        assert (await one.post("/incr")).json() == {"n": 2}
        assert (await two.post("/incr")).json() == {"n": 1}


async def test_session_middleware_options(url: str) -> None:
    app = create_app(url, sessions=False)
    app.add_middleware(SharedSecretSessionMiddleware, session_cookie="sid", https_only=True)
    async with serving(app, "https://testserver") as client:
        response = await client.get("/session")
        assert response.json() == {"visits": 1}
        assert "secure" in response.headers["set-cookie"].lower()
        assert session_cookie(response, "sid")


async def test_misuse_is_reported_clearly(url: str) -> None:
    app = create_app(url)
    with pytest.raises(RuntimeError, match="already initialised"):
        init_app(app, url)
    bare = FastAPI()

    @bare.post("/incr")
    async def incr(state: SharedStateDep) -> dict[str, Any]:
        return {"n": await state.incr("n")}

    with pytest.raises(RuntimeError, match="not initialised on this app"):
        async with lifespan(bare):
            pass
    transport = httpx.ASGITransport(app=bare)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with pytest.raises(RuntimeError, match=r"init_app\(app"):
            await client.post("/incr")
    with pytest.raises(RuntimeError, match="not initialised"):
        background_task(bare, asyncio.sleep)  # type: ignore[arg-type]
