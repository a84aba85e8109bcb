"""Starlette and FastAPI integration: the async shared state, signed sessions,
503s, background tasks.

``pip install "shared-core[fastapi]"`` (or ``[starlette]``)::

    from fastapi import FastAPI
    from shared_core.starlette import SharedStateDep, background_task, init_app, lifespan


    def create_app():
        app = FastAPI(lifespan=lifespan)  # or `async with lifespan(app):` in yours
        init_app(app, app_name="my_app")  # the state, sessions, the 503 handler
        background_task(app, listen_for_reloads)  # one task per worker

        @app.get("/hit")
        async def hit(state: SharedStateDep):
            return {"n": await state.incr("visits")}

        return app

:func:`init_app` attaches an :class:`~shared_core.AsyncSharedState` to the app
when it is built (nothing connects until the first call), so requests work
even under a server that runs no ASGI lifespan (granian ``--interface
asginl``): background tasks then start on the first request. The
:func:`lifespan` stops them and closes the state when the worker stops.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Literal

from starlette.applications import Starlette
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._aio import AsyncSharedState
from ._background import Worker
from ._errors import StateUnavailable
from ._extension import SIGNING_KEY_NAME, UNAVAILABLE

if TYPE_CHECKING:
    from fastapi import Depends

__all__ = [
    "SharedSecretSessionMiddleware",
    "SharedStateDep",
    "add_exception_handlers",
    "background_task",
    "get_state",
    "init_app",
    "lifespan",
    "unavailable_handler",
]

# How long the lifespan waits for a cancelled background task to finish.
_STOP_TIMEOUT = 5.0
# WebSocket close code 1013: "try again later".
_TRY_AGAIN_LATER = 1013

log = logging.getLogger("shared_core.starlette")


def init_app(
    app: Starlette,
    url: str | None = None,
    *,
    app_name: str | None = None,
    secret_name: str = SIGNING_KEY_NAME,
    sessions: bool = True,
    errors: bool = True,
    near_cache: Iterable[str] = (),
) -> AsyncSharedState:
    """Attach a shared state to ``app`` (``app.state.shared_state``) and return it.

    Call it where the app is built. Nothing connects here: the first call does.

    Parameters:
        app: a Starlette or FastAPI app.
        url: where the state lives; default ``$SHARED_STATE_URL``, else ``local://APP``.
        app_name: the app name that picks the ``local://`` address.
        secret_name: the deployment-wide secret that signs sessions.
        sessions: add :class:`SharedSecretSessionMiddleware` with its defaults
            (for other cookie options, pass False and add it yourself).
        errors: answer ``StateUnavailable`` with ``503 {"error": ...}``
            (:func:`add_exception_handlers`).
        near_cache: prefixes of keys the app reads often and writes rarely,
            kept in each worker where the engine can (see
            :class:`~shared_core.SharedState`).
    """
    if isinstance(getattr(app.state, "shared_core_worker", None), Worker):
        raise RuntimeError("shared_core is already initialised on this app")
    state = AsyncSharedState(url, app=app_name, near_cache=near_cache)
    worker = Worker(state)
    app.state.shared_state = state
    app.state.shared_core_worker = worker
    if sessions:
        app.add_middleware(SharedSecretSessionMiddleware, state=state, secret_name=secret_name)
    app.add_middleware(_StartWithoutLifespan, worker=worker)
    if errors:
        add_exception_handlers(app)
    return state


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The worker's lifespan: starts the background tasks, and at the end
    stops them and closes the state.

    Use it as the app's lifespan (``FastAPI(lifespan=lifespan)``) or inside
    yours (``async with lifespan(app): yield``).

    Parameters:
        app: an app passed to :func:`init_app`.
    """
    worker = _worker_of(app)
    worker.start()
    try:
        yield
    finally:
        await worker.stop()


def get_state(connection: HTTPConnection) -> AsyncSharedState:
    """The app's shared state: a dependency (``Depends(get_state)``) or a helper.

    Parameters:
        connection: the request or websocket.
    """
    return _worker_of(connection.app).state


def background_task(
    app: Starlette, func: Callable[[], Awaitable[None]], *, retry_delay: float = 1.0
) -> Callable[[], Awaitable[None]]:
    """Run ``await func()`` in every worker of ``app`` for the length of its lifespan.

    It starts in :func:`lifespan` (or on the first request, under a server
    that runs no lifespan) and is cancelled, and awaited, when the lifespan
    ends, before the state closes. If it raises, it is logged and started
    again after ``retry_delay`` seconds: a listener survives a state server
    that is not there yet. Returns ``func``.

    Parameters:
        app: an app passed to :func:`init_app`.
        func: e.g. a loop over ``state.subscribe(...)``.
        retry_delay: seconds to wait before starting it again after an error.
    """
    _worker_of(app).add(func, retry_delay)
    return func


async def unavailable_handler(request: Request, exc: Exception) -> Response:
    """The exception handler of ``StateUnavailable``: ``503 {"error": ...}``.

    Parameters:
        request: the request that failed.
        exc: the ``StateUnavailable`` raised.
    """
    log.error("the shared state is unavailable: %s", exc)
    return JSONResponse({"error": UNAVAILABLE}, status_code=503)


def add_exception_handlers(app: Starlette) -> None:
    """Answer ``StateUnavailable`` raised by an endpoint or dependency with a 503.

    Parameters:
        app: a Starlette or FastAPI app.
    """
    app.add_exception_handler(StateUnavailable, unavailable_handler)


class SharedSecretSessionMiddleware:
    """Starlette's ``SessionMiddleware``, keyed with a secret of the shared state.

    Every worker signs with the same key, so a session set by one is valid on
    all. The key is read on the first request, not at start-up, so that a
    worker starts while the state server is away; until it can be read,
    requests get ``503 {"error": ...}`` (a websocket is closed with 1013) and
    nothing below this middleware runs.

    Parameters:
        app: the ASGI app to wrap.
        state: where the secret lives; default the app's (:func:`init_app`).
        secret_name: the secret's name.
        session_cookie: as for ``SessionMiddleware``.
        max_age: as for ``SessionMiddleware`` (seconds; None: a browser session).
        path: as for ``SessionMiddleware``.
        same_site: as for ``SessionMiddleware``.
        https_only: as for ``SessionMiddleware``.
        domain: as for ``SessionMiddleware``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: AsyncSharedState | None = None,
        secret_name: str = SIGNING_KEY_NAME,
        session_cookie: str = "session",
        max_age: int | None = 14 * 24 * 60 * 60,
        path: str = "/",
        same_site: Literal["lax", "strict", "none"] = "lax",
        https_only: bool = False,
        domain: str | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.secret_name = secret_name

        def make(key: str) -> SessionMiddleware:
            return SessionMiddleware(
                app,
                secret_key=key,
                session_cookie=session_cookie,
                max_age=max_age,
                path=path,
                same_site=same_site,
                https_only=https_only,
                domain=domain,
            )

        self._make = make
        self._sessions: SessionMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._sessions is None:
            state = self.state or _worker_of(scope["app"]).state
            try:
                key = await state.secret(self.secret_name)
            except StateUnavailable as exc:
                log.error("the shared state is unavailable: %s", exc)
                await _refuse(scope, receive, send)
                return
            self._sessions = self._make(key)
        await self._sessions(scope, receive, send)


async def _dependency(connection: HTTPConnection) -> AsyncSharedState:
    # async: FastAPI runs a plain function's dependency in its thread pool,
    # a hop to another thread and back on every request.
    return get_state(connection)


if TYPE_CHECKING:
    SharedStateDep = Annotated[AsyncSharedState, Depends(_dependency)]
    """A FastAPI parameter annotation: ``state: SharedStateDep``."""


def __getattr__(name: str) -> object:
    # FastAPI is imported only by those who use its dependency.
    if name == "SharedStateDep":
        from fastapi import Depends

        return Annotated[AsyncSharedState, Depends(_dependency)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": _TRY_AGAIN_LATER, "reason": UNAVAILABLE})
        return
    await JSONResponse({"error": UNAVAILABLE}, status_code=503)(scope, receive, send)


class _StartWithoutLifespan:
    """Starts the background tasks on the first request if no lifespan did."""

    def __init__(self, app: ASGIApp, *, worker: Worker) -> None:
        self.app = app
        self.worker = worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            self.worker.start_late(
                "the lifespan did not run (the server runs none, or the app's lifespan "
                "does not use shared_core.starlette.lifespan)"
            )
        await self.app(scope, receive, send)


def _worker_of(app: Starlette) -> Worker:
    worker = getattr(app.state, "shared_core_worker", None)
    if not isinstance(worker, Worker):
        raise RuntimeError(
            "shared_core is not initialised on this app: call "
            "shared_core.starlette.init_app(app, ...) where the app is built"
        )
    return worker
