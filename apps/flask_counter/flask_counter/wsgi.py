"""What WSGI servers load: ``flask_counter.wsgi:app``."""

import os

from werkzeug.middleware.proxy_fix import ProxyFix

from . import create_app

app = create_app()

# Behind nginx (or another proxy), trust that many hops of X-Forwarded-*
# headers; never set it when clients reach the server directly.
if hops := int(os.environ.get("TRUSTED_PROXY_HOPS", "0")):
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
