"""flask-caching on the shared state: ``CACHE_TYPE`` names this module's cache.

``pip install "shared-core[flask-caching]"``::

    app.config["CACHE_TYPE"] = "shared_core.contrib.flask_caching.SharedStateCache"
    cache = Cache(app)  # or cache.init_app(app) in the factory

The cache is :class:`shared_core.contrib.cachelib.SharedStateCache` (see there
for timeouts, values and atomicity) with flask-caching's ``factory``, which
takes, for each app:

- the state: the app's own when :class:`shared_core.flask.SharedStateExtension`
  was initialised on it first (one state, one set of connections per worker),
  else one made from ``SHARED_STATE_URL`` and ``SHARED_STATE_APP`` (default
  ``app.name``), the settings that extension reads; ``CACHE_OPTIONS`` may give
  ``url``/``app`` instead;
- ``CACHE_KEY_PREFIX`` as the key prefix (flask-caching's default
  ``"flask_cache_"``), ``CACHE_DEFAULT_TIMEOUT`` and ``CACHE_IGNORE_ERRORS``;
  anything in ``CACHE_OPTIONS`` wins.

Why a module of its own: flask-caching calls a ``CACHE_TYPE`` whose dotted
path contains ``"cachelib"`` without the app and its config (that is how it
takes cachelib's own classes), so ``shared_core.contrib.cachelib.SharedStateCache``
also works as a ``CACHE_TYPE``, but only with ``CACHE_OPTIONS`` and without
``CACHE_KEY_PREFIX`` or the app's state.

While the state is unavailable, ``@cache.cached`` and ``@cache.memoize`` log the
:class:`~shared_core.StateUnavailable` and call the view or function (each call
first waits out the state's bounded timeouts); direct ``cache.get`` and
``cache.set`` raise it (a 503 with ``SharedStateExtension``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from flask import Flask
from flask_caching.backends.base import BaseCache as FlaskCachingBaseCache

from .._extension import EXTENSION_KEY
from .._state import SharedState
from . import cachelib as _cachelib

__all__ = ["SharedStateCache"]


class SharedStateCache(FlaskCachingBaseCache, _cachelib.SharedStateCache):
    """:class:`shared_core.contrib.cachelib.SharedStateCache`, made by flask-caching.

    Parameters are those of the cachelib cache; flask-caching passes them from
    the app's config through :meth:`factory`.
    """

    def __init__(
        self,
        state: SharedState | None = None,
        *,
        url: str | None = None,
        app: str | None = None,
        default_timeout: int | dt.timedelta = 300,
        key_prefix: str | Callable[[], str] | None = None,
        ignore_delete_many_errors: bool = False,
    ) -> None:
        _cachelib.SharedStateCache.__init__(
            self,
            state,
            url=url,
            app=app,
            default_timeout=default_timeout,
            key_prefix=key_prefix,
            ignore_delete_many_errors=ignore_delete_many_errors,
        )

    @classmethod
    def factory(
        cls, app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]
    ) -> SharedStateCache:
        """Make the cache of ``app`` (flask-caching calls this from ``init_app``).

        ``kwargs`` holds ``default_timeout`` and ``ignore_delete_many_errors``
        from the config, updated with ``CACHE_OPTIONS``; ``args`` is ``CACHE_ARGS``.
        """
        options = dict(kwargs)
        options.setdefault("key_prefix", config.get("CACHE_KEY_PREFIX"))
        if not args and not {"state", "url", "app"} & options.keys():
            state = app.extensions.get(EXTENSION_KEY)
            if isinstance(state, SharedState):
                options["state"] = state
            else:
                options["url"] = config.get("SHARED_STATE_URL")
                options["app"] = config.get("SHARED_STATE_APP") or app.name
        return cls(*args, **options)
