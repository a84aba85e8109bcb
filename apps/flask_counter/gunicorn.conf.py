"""gunicorn settings for flask_counter: ``gunicorn -c gunicorn.conf.py flask_counter.wsgi:app``.

Every setting can be overridden on the command line (``-w 8``, ``-k gthread``).
"""

import os

# Loopback unless told otherwise; put nginx (or another proxy) in front.
bind = os.environ.get("BIND", "127.0.0.1:8000")

# Several worker processes: the state is shared, so any number works.
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))

# "sync" (one request at a time per worker) or "gthread" with threads > 1.
worker_class = os.environ.get("WORKER_CLASS", "sync")
threads = int(os.environ.get("THREADS", "1"))

# Recycle workers now and then; the state lives outside them, so nothing is lost.
max_requests = int(os.environ.get("MAX_REQUESTS", "0"))
max_requests_jitter = int(os.environ.get("MAX_REQUESTS_JITTER", "0"))

# A silent worker is killed after this many seconds (SIGABRT, then SIGKILL);
# locks it held in the shared state are released with its connection.
timeout = 30
graceful_timeout = 10

accesslog = os.environ.get("ACCESS_LOG")  # "-" for stdout
