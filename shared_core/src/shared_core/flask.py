"""Flask integration: the shared state, sessions signed with its secret, 503s.

``pip install "shared-core[flask]"``::

    from flask import Flask
    from shared_core.flask import SharedStateExtension

    shared = SharedStateExtension()


    def create_app():
        app = Flask(__name__)
        shared.init_app(app)  # url: app.config["SHARED_STATE_URL"], else the default

        @app.get("/hit")
        def hit():
            return {"n": shared.state.incr("visits")}

        return app

What ``init_app`` does for each app:

- keeps a :class:`~shared_core.SharedState` in ``app.extensions["shared_core"]``
  (:func:`get_state` returns it);
- signs the session cookie with ``state.secret("SECRET_KEY")``, the same in every
  worker, read on the first request (not at start-up, so that a worker starts,
  and answers 503, while the state server is away) unless ``SECRET_KEY`` is set;
- turns :class:`~shared_core.StateUnavailable` into ``503 {"error": ...}``, also
  when it happens while the session is opened (then no view runs) or saved,
  by this extension or another (Flask-Session on the state), unless the app
  has a 500 handler of its own;
- closes the state's connections, and stops the subscriptions made with
  :func:`subscribe`, when the process exits (Flask has no hook for the end of
  a worker; ``atexit`` is the one Python has), or at :func:`close`.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Request, current_app, jsonify, session
from flask.sessions import NullSession, SecureCookieSession, SecureCookieSessionInterface
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import InternalServerError

from ._broadcast import Subscription
from ._errors import StateUnavailable
from ._extension import EXTENSION_KEY, SIGNING_KEY_NAME, UNAVAILABLE, ExtensionBase
from ._jobs import Scheduler
from ._state import SharedState

__all__ = [
    "SharedSecretSessionInterface",
    "SharedStateExtension",
    "UnavailableSession",
    "close",
    "get_state",
    "schedule",
    "subscribe",
]

_WORKER_KEY = "shared_core.worker"


class SharedStateExtension(ExtensionBase[Flask, SharedState]):
    __doc__ = ExtensionBase.__doc__

    def init_app(self, app: Flask) -> SharedState:
        """Give ``app`` its shared state, session signing and 503 handler; return the state.

        Nothing connects here: the first request (or call) does.
        """
        url, name = self.where(app)
        state = SharedState(url, app=name, near_cache=self.near_cache)
        worker = _Worker(state)
        app.extensions[EXTENSION_KEY] = state
        app.extensions[_WORKER_KEY] = worker
        _workers.add(worker)
        if self.sessions:
            app.session_interface = SharedSecretSessionInterface(state, self.secret_name)
            # First of all hooks, so that no view or hook runs without a session.
            app.before_request_funcs.setdefault(None, []).insert(0, _raise_if_unavailable)
        if self.errors:
            app.register_error_handler(StateUnavailable, _unavailable)
            # What fails while Flask opens or saves a session (Flask-Session on
            # the state) reaches only the 500 handler: keep a user's own one.
            if InternalServerError not in app.error_handler_spec[None][500]:
                app.register_error_handler(InternalServerError, _internal_error)
        return state

    @property
    def state(self) -> SharedState:
        """The state of the current app (in a request or app context)."""
        return get_state()


def get_state(app: Flask | None = None) -> SharedState:
    """The :class:`~shared_core.SharedState` of ``app`` (default: the current app).

    Parameters:
        app: an app passed to :meth:`SharedStateExtension.init_app`.
    """
    app = current_app if app is None else app
    try:
        state: SharedState = app.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError(
            f"shared_core is not initialised on app {app.name!r}: "
            "call SharedStateExtension(app) or .init_app(app) in its factory"
        ) from None
    return state


def subscribe(
    app: Flask,
    *channels: str,
    callback: Callable[[str, Any], None],
    on_connect: Callable[[], None] | None = None,
) -> None:
    """Subscribe every worker process of ``app`` to ``channels``, on its first request.

    ``callback(channel, message)`` then runs on a background thread of each
    worker for each message (see :meth:`SharedState.subscribe`). A worker
    forked from a preloading master subscribes anew; while the state is
    unavailable the request gets a 503 and the next one tries again.
    ``on_connect`` is called after every (re)subscribe, and once more in the
    request that subscribes, so that request already sees its effect.

    Parameters:
        app: an app passed to :meth:`SharedStateExtension.init_app`.
        channels: the channels to listen to.
        callback: called with each message.
        on_connect: catch up from the state (messages sent while a worker was
            not subscribed are not delivered to it).
    """
    listener = _Listener(get_state(app), channels, callback, on_connect)
    _worker_of(app).listeners.append(listener)
    app.before_request(listener.subscribe_this_worker)


def schedule(app: Flask, scheduler: Scheduler) -> Scheduler:
    """Run ``scheduler`` in every worker process of ``app``: from now (call it
    in the app factory, which servers run in each worker), and checked on
    each request, so that a worker forked from a process where it ran starts
    its own; stopped in :func:`close`. Returns ``scheduler``.

    Under the ``flask`` command (``flask shell``, ``flask db upgrade``,
    ``flask run``) it starts on the first request only: a command that
    creates the app to do its own work claims no occurrence.

    Each occurrence of its jobs runs once across the deployment (see
    :class:`~shared_core.Scheduler`). With gunicorn's ``--preload`` the
    factory runs in the master, whose scheduler would claim occurrences too,
    and each worker starts its own on its first request: do not preload an
    app that schedules jobs.

    Parameters:
        app: an app passed to :meth:`SharedStateExtension.init_app`.
        scheduler: a scheduler on the app's state, with its jobs added.
    """
    worker = _worker_of(app)
    worker.schedulers.append(scheduler)

    def start_here() -> None:
        if not scheduler.running:
            scheduler.start()

    app.before_request(start_here)
    # Flask's command line sets this for every command it runs.
    if os.environ.get("FLASK_RUN_FROM_CLI") != "true":
        start_here()
    return scheduler


def close(app: Flask | None = None) -> None:
    """Stop the subscriptions and the schedulers of ``app`` and close its
    state's connections.

    Runs by itself when the process exits; call it where an app's life ends
    earlier (in tests). A later request subscribes, starts the schedulers and
    connects again.

    Parameters:
        app: an app passed to :meth:`SharedStateExtension.init_app` (default:
            the current app).
    """
    _worker_of(current_app if app is None else app).close()


class SharedSecretSessionInterface(SecureCookieSessionInterface):
    """Flask's cookie sessions, signed with a secret of the shared state.

    Every worker signs with the same key, so a session set by one is valid on
    all. The key is read when the first session is opened and kept as the
    app's ``secret_key`` (so ``flash`` and other users of it work too); an
    app whose ``SECRET_KEY`` is set keeps it. While the key cannot be read the
    session is an :class:`UnavailableSession` and nothing is saved.

    Parameters:
        state: where the secret lives.
        secret_name: the secret's name.
    """

    def __init__(self, state: SharedState, secret_name: str = SIGNING_KEY_NAME) -> None:
        self.state = state
        self.secret_name = secret_name

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not app.secret_key:
            try:
                app.secret_key = self.state.secret(self.secret_name)
            except StateUnavailable as exc:
                return UnavailableSession(exc)
        return super().open_session(app, request)


class UnavailableSession(NullSession):
    """The session while its key cannot be read; ``error`` is why.

    It is never saved; the first ``before_request`` hook raises ``error``.
    """

    def __init__(self, error: StateUnavailable) -> None:
        super().__init__()
        self.error = error


def _raise_if_unavailable() -> None:
    # Raised here rather than from open_session, which Flask calls outside
    # the error handling of the request: this way it becomes a 503.
    if isinstance(session, UnavailableSession):
        raise session.error


def _unavailable(exc: StateUnavailable) -> ResponseReturnValue:
    current_app.logger.error("the shared state is unavailable: %s", exc)
    return jsonify(error=UNAVAILABLE), 503


def _internal_error(exc: InternalServerError) -> ResponseReturnValue:
    if isinstance(exc.original_exception, StateUnavailable):
        return _unavailable(exc.original_exception)
    return exc  # Flask's own 500


# --- per process ------------------------------------------------------------------


@dataclass(eq=False)
class _Listener:
    """One ``subscribe`` call: the subscription of this process, made on its first request."""

    state: SharedState
    channels: tuple[str, ...]
    callback: Callable[[str, Any], None]
    on_connect: Callable[[], None] | None
    pid: int = 0  # of the process that holds ``subscription``: a forked child has none
    subscription: Subscription | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def subscribe_this_worker(self) -> None:
        if self.pid == os.getpid():
            return
        with self.lock:
            if self.pid == os.getpid():
                return
            self.subscription = self.state.subscribe(
                *self.channels, callback=self.callback, on_connect=self.on_connect
            )
            self.pid = os.getpid()
        if self.on_connect is not None:
            self.on_connect()

    def close(self) -> None:
        with self.lock:
            subscription, self.subscription, self.pid = self.subscription, None, 0
        if subscription is not None:
            subscription.close()  # waits for its thread: the state closes next


@dataclass(eq=False)
class _Worker:
    """What an app holds in each process: its state and its subscriptions."""

    state: SharedState
    listeners: list[_Listener] = field(default_factory=list)
    schedulers: list[Scheduler] = field(default_factory=list)

    def close(self) -> None:
        # Threads first: they would log a broken connection.
        for scheduler in self.schedulers:
            scheduler.stop()
        for listener in self.listeners:
            listener.close()
        self.state.close()


def _worker_of(app: Flask) -> _Worker:
    get_state(app)  # the error if init_app did not run
    worker: _Worker = app.extensions[_WORKER_KEY]
    return worker


# Those of every app of this process, to close at exit.
_workers: weakref.WeakSet[_Worker] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for worker in list(_workers):
        worker.close()
