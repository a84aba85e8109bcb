"""Quart integration: the async shared state, signed sessions, 503s, background tasks.

``pip install "shared-core[quart]"``::

    from quart import Quart
    from shared_core.quart import SharedStateExtension, background_task

    shared = SharedStateExtension()


    def create_app():
        app = Quart(__name__)
        shared.init_app(app)  # url: app.config["SHARED_STATE_URL"], else the default
        background_task(app, listen_for_reloads)  # one task per worker

        @app.get("/hit")
        async def hit():
            return {"n": await shared.state.incr("visits")}

        return app

What ``init_app`` does for each app:

- keeps an :class:`~shared_core.AsyncSharedState` in ``app.extensions["shared_core"]``
  (:func:`get_state` returns it); nothing connects until the first call, so it
  also works under a server that runs no ASGI lifespan;
- signs the session cookie with ``await state.secret("SECRET_KEY")``, read on
  the first request (a worker starts, and answers 503, while the state server
  is away) unless ``SECRET_KEY`` is set;
- turns :class:`~shared_core.StateUnavailable` into ``503 {"error": ...}``, also
  when it happens while the session is opened: then no view runs;
- in ``after_serving``: stops the background tasks, then closes the state.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from functools import partial

from quart import Quart, current_app, jsonify, session
from quart.sessions import NullSession, SecureCookieSession, SecureCookieSessionInterface
from quart.typing import ResponseReturnValue
from quart.wrappers import BaseRequestWebsocket

from ._aio import AsyncSharedState
from ._background import Worker
from ._errors import StateUnavailable
from ._extension import EXTENSION_KEY, SIGNING_KEY_NAME, UNAVAILABLE, ExtensionBase

__all__ = [
    "SharedSecretSessionInterface",
    "SharedStateExtension",
    "UnavailableSession",
    "background_task",
    "get_state",
    "unavailable_in_this_request",
]

# The requests (tasks) answered 503: what runs after the handler in them (an
# extension's after_request) can answer at once instead of waiting again.
_answered_unavailable: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()

_WORKER_KEY = "shared_core.worker"

log = logging.getLogger("shared_core.quart")


class SharedStateExtension(ExtensionBase[Quart, AsyncSharedState]):
    __doc__ = ExtensionBase.__doc__

    def init_app(self, app: Quart) -> AsyncSharedState:
        """Give ``app`` its shared state, session signing, 503 handler and
        serving hooks; return the state. Nothing connects here."""
        url, name = self.where(app)
        state = AsyncSharedState(url, app=name, near_cache=self.near_cache)
        worker = Worker(state)
        app.extensions[EXTENSION_KEY] = state
        app.extensions[_WORKER_KEY] = worker
        app.before_serving(partial(_before_serving, worker))
        app.after_serving(worker.stop)
        # First of all hooks, so that no view or hook runs without a session.
        before = partial(_before_request, worker)
        app.before_request_funcs.setdefault(None, []).insert(0, before)
        app.before_websocket_funcs.setdefault(None, []).insert(0, before)
        if self.sessions:
            app.session_interface = SharedSecretSessionInterface(state, self.secret_name)
        if self.errors:
            app.register_error_handler(StateUnavailable, _unavailable)
        return state

    @property
    def state(self) -> AsyncSharedState:
        """The state of the current app (in a request or app context)."""
        return get_state()


def get_state(app: Quart | None = None) -> AsyncSharedState:
    """The :class:`~shared_core.AsyncSharedState` of ``app`` (default: the current app).

    Parameters:
        app: an app passed to :meth:`SharedStateExtension.init_app`.
    """
    app = current_app if app is None else app
    try:
        state: AsyncSharedState = app.extensions[EXTENSION_KEY]
    except KeyError:
        raise _not_initialised(app) from None
    return state


def background_task(
    app: Quart, func: Callable[[], Awaitable[None]], *, retry_delay: float = 1.0
) -> Callable[[], Awaitable[None]]:
    """Run ``await func()`` in every worker of ``app`` while it serves.

    It starts in ``before_serving`` (or on the first request, under a server
    that runs no ASGI lifespan) and is cancelled, and awaited, in
    ``after_serving``, before the state closes. If it raises, it is logged
    and started again after ``retry_delay`` seconds: a listener survives a
    state server that is not there yet. Returns ``func``.

    Parameters:
        app: an app passed to :meth:`SharedStateExtension.init_app`.
        func: e.g. a loop over ``state.subscribe(...)``.
        retry_delay: seconds to wait before starting it again after an error.
    """
    try:
        worker: Worker = app.extensions[_WORKER_KEY]
    except KeyError:
        raise _not_initialised(app) from None
    worker.add(func, retry_delay)
    return func


class SharedSecretSessionInterface(SecureCookieSessionInterface):
    """Quart's cookie sessions, signed with a secret of the shared state.

    Every worker signs with the same key, so a session set by one is valid on
    all. The key is read when the first session is opened and kept as the
    app's ``secret_key``; an app whose ``SECRET_KEY`` is set keeps it. While
    the key cannot be read the session is an :class:`UnavailableSession` and
    nothing is saved.

    Parameters:
        state: where the secret lives.
        secret_name: the secret's name.
    """

    def __init__(self, state: AsyncSharedState, secret_name: str = SIGNING_KEY_NAME) -> None:
        self.state = state
        self.secret_name = secret_name

    async def open_session(
        self, app: Quart, request: BaseRequestWebsocket
    ) -> SecureCookieSession | None:
        if not app.secret_key:
            try:
                app.secret_key = await self.state.secret(self.secret_name)
            except StateUnavailable as exc:
                return UnavailableSession(exc)
        return await super().open_session(app, request)


class UnavailableSession(NullSession):
    """The session while its key cannot be read; ``error`` is why.

    It is never saved; the first ``before_request`` hook raises ``error``.
    """

    def __init__(self, error: StateUnavailable) -> None:
        super().__init__()
        self.error = error


async def _before_request(worker: Worker) -> None:
    # Quart opens the session outside the error handling of the request:
    # raised here, it becomes a 503.
    if isinstance(session, UnavailableSession):
        raise session.error
    worker.start_late("before_serving did not run (the server runs no ASGI lifespan)")


async def _before_serving(worker: Worker) -> None:
    worker.start()


def unavailable_in_this_request() -> bool:
    """Whether the current request was already answered 503 for the state.

    For code that runs after the error handler, as an extension's
    ``after_request`` does: it can skip the state rather than wait out the
    state's timeouts a second time (and turn the 503 into a 500).
    """
    task = asyncio.current_task()
    return task is not None and task in _answered_unavailable


async def _unavailable(exc: StateUnavailable) -> ResponseReturnValue:
    # A coroutine: Quart runs a plain function in a thread, outside the request's task.
    current_app.logger.error("the shared state is unavailable: %s", exc)
    if (task := asyncio.current_task()) is not None:
        _answered_unavailable.add(task)
    return jsonify(error=UNAVAILABLE), 503


def _not_initialised(app: Quart) -> RuntimeError:
    return RuntimeError(
        f"shared_core is not initialised on app {app.name!r}: "
        "call SharedStateExtension(app) or .init_app(app) in its factory"
    )
