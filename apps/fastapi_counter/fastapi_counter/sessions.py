"""Starlette's SessionMiddleware, keyed with the deployment-wide secret."""

from __future__ import annotations

from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from shared_core import StateUnavailable


class SharedSecretSessions:
    """Builds the SessionMiddleware on the first request, with the key from
    ``app.state.session_key()`` (set up in ``lifespan``). Fetching it then,
    not at start-up, lets a worker start, and answer 503, while the state
    server is away."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sessions: SessionMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.sessions is None:
            try:
                key = await scope["app"].state.session_key()
            except StateUnavailable:
                body = {"error": "the shared state is unavailable, try again"}
                await JSONResponse(body, status_code=503)(scope, receive, send)
                return
            self.sessions = SessionMiddleware(self.app, secret_key=key, same_site="lax")
        await self.sessions(scope, receive, send)
