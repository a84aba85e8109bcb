"""gunicorn settings for fastapi_counter: ``gunicorn -c gunicorn.conf.py fastapi_counter.main:app``.

gunicorn manages the processes; uvicorn-worker runs the ASGI app in each.
Every setting can be overridden on the command line (``-w 8``).
"""

import os

# Loopback unless told otherwise; put nginx (or another proxy) in front.
bind = os.environ.get("BIND", "127.0.0.1:8000")

# Several worker processes: the state is shared, so any number works.
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "uvicorn_worker.UvicornWorker"

# Recycle workers now and then; the state lives outside them, so nothing is lost.
max_requests = int(os.environ.get("MAX_REQUESTS", "0"))
max_requests_jitter = int(os.environ.get("MAX_REQUESTS_JITTER", "0"))

# A silent worker is killed after this many seconds; locks it held in the
# shared state are released with its connection.
timeout = 30
graceful_timeout = 10

accesslog = os.environ.get("ACCESS_LOG")  # "-" for stdout
