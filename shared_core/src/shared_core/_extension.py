"""What the Flask and Quart extensions share; no framework is imported here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

EXTENSION_KEY = "shared_core"
UNAVAILABLE = "the shared state is unavailable, try again"
# The deployment-wide secret that signs sessions, unless told otherwise.
SIGNING_KEY_NAME = "SECRET_KEY"


AppT = TypeVar("AppT")  # a Flask or Quart app: .name, .config, .extensions
StateT = TypeVar("StateT")


class ExtensionBase(Generic[AppT, StateT]):
    """Attach apps to the shared state (``init_app``, or pass ``app``).

    Parameters:
        app: initialise this app now (else call :meth:`init_app` later,
            once per app: the app-factory pattern).
        url: where the state lives, for apps whose config has no
            ``SHARED_STATE_URL``; default ``$SHARED_STATE_URL``, else ``local://APP``.
        app_name: the app name that picks the ``local://`` address, for apps
            whose config has no ``SHARED_STATE_APP``; default ``app.name``.
        secret_name: the name of the deployment-wide secret that signs sessions.
        sessions: sign sessions with that secret (a ``SECRET_KEY`` set in the
            config is used instead).
        errors: answer ``StateUnavailable`` with ``503 {"error": ...}``.
        near_cache: prefixes of keys the app reads often and writes rarely,
            kept in each worker where the engine can (see the state's
            ``near_cache``).
    """

    def __init__(
        self,
        app: AppT | None = None,
        *,
        url: str | None = None,
        app_name: str | None = None,
        secret_name: str = SIGNING_KEY_NAME,
        sessions: bool = True,
        errors: bool = True,
        near_cache: Iterable[str] = (),
    ) -> None:
        if isinstance(near_cache, str):
            raise TypeError("near_cache takes prefixes (a tuple or list), not one string")
        self.near_cache = tuple(near_cache)
        self.url = url
        self.app_name = app_name
        self.secret_name = secret_name
        self.sessions = sessions
        self.errors = errors
        if app is not None:
            self.init_app(app)

    def init_app(self, app: AppT) -> StateT:
        """Give ``app`` its shared state; return the state."""
        raise NotImplementedError

    def where(self, app: Any) -> tuple[str | None, str]:
        """The URL and app name of ``app``'s state; RuntimeError if it has one."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(f"shared_core is already initialised on app {app.name!r}")
        url: str | None = app.config.get("SHARED_STATE_URL") or self.url
        name: str = app.config.get("SHARED_STATE_APP") or self.app_name or app.name
        return url, name
