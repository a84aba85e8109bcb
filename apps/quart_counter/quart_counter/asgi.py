"""What ASGI servers load: ``quart_counter.asgi:app``."""

import os
from typing import Any

from . import create_app

app: Any = create_app()

# Behind nginx (or another proxy) under hypercorn, trust that many hops of
# X-Forwarded-* headers. uvicorn (and gunicorn's uvicorn worker) do this
# themselves for --forwarded-allow-ips (127.0.0.1 by default): leave it unset.
if hops := int(os.environ.get("TRUSTED_PROXY_HOPS", "0")):
    from hypercorn.middleware import ProxyFixMiddleware

    app = ProxyFixMiddleware(app, mode="legacy", trusted_hops=hops)
