"""What WSGI servers load: ``flask_counter.wsgi:app``."""

import os

from werkzeug.middleware.proxy_fix import ProxyFix

from . import create_app

# Only one of the two: create_app() starts the shared scheduler and the start-up task.
if os.environ.get("COUNTER_MODE") == "naive":  # only to show the bug: see naive.py
    from .naive import app
else:
    app = create_app()

# Behind nginx, trust that many proxies' X-Forwarded-* (never when clients reach us directly).
if hops := int(os.environ.get("TRUSTED_PROXY_HOPS", "0")):
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
