"""Only to show the bug that shared_core fixes (``COUNTER_MODE=naive``): do not copy it.

The usual first try, globals of the module: each worker has its own count and
``SECRET_KEY``, so numbers repeat across pids and ``/session`` starts over.
"""

import os
import secrets
from typing import Any

from flask import Flask, session

app = Flask(__name__)
app.secret_key = secrets.token_hex(32)  # a different one in every worker
count = 0


@app.route("/increment", methods=["GET", "POST"])
def increment() -> Any:
    global count
    count += 1
    return {"count": count, "key": "counter", "pid": os.getpid()}


@app.get("/report")
@app.get("/healthz")
def report() -> Any:
    return {"count": count, "key": "counter", "pid": os.getpid()}


@app.get("/session")
def visits() -> Any:
    session["visits"] = session.get("visits", 0) + 1
    return {"visits": session["visits"], "pid": os.getpid()}
