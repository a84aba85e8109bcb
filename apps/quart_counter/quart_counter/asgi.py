"""What ASGI servers load: ``quart_counter.asgi:app``."""

import os

from . import create_app

# Only one of the two: create_app() starts the shared scheduler and the start-up task.
if os.environ.get("COUNTER_MODE") == "naive":  # only to show the bug: see naive.py
    from .naive import app
else:
    app = create_app()

# Behind nginx under hypercorn or granian, trust that many proxies' X-Forwarded-*; uvicorn (and
# gunicorn's uvicorn worker) trust 127.0.0.1 by themselves (--forwarded-allow-ips).
if hops := int(os.environ.get("TRUSTED_PROXY_HOPS", "0")):
    from hypercorn.middleware import ProxyFixMiddleware

    app = ProxyFixMiddleware(app, mode="legacy", trusted_hops=hops)  # type: ignore[assignment]
