"""gunicorn settings for quart_counter: ``gunicorn -c gunicorn.conf.py quart_counter.asgi:app``.

Flags override them: ``-w 8``; ``-k asgi`` for gunicorn's own ASGI worker.
"""

import os

# Loopback unless told otherwise; put nginx (or another proxy) in front.
bind = os.environ.get("BIND", "127.0.0.1:8000")
# Several worker processes: the state is shared, so any number works.
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "uvicorn_worker.UvicornWorker"
# Recycle workers now and then; the state lives outside them, so nothing is lost.
max_requests = int(os.environ.get("MAX_REQUESTS", "0"))
max_requests_jitter = max_requests // 10
# A silent worker is killed after this many seconds; the locks it held are freed.
timeout = 30
graceful_timeout = 10
accesslog = os.environ.get("ACCESS_LOG")  # "-" for stdout
