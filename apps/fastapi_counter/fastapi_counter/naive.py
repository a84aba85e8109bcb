"""Only to show the bug that shared_core fixes (``COUNTER_MODE=naive``): do not copy it.

The usual first try, globals of the module: each worker has its own count and
session key, so numbers repeat across pids and ``/session`` starts over.
"""

import os
import secrets

from fastapi import FastAPI
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request

app = FastAPI()
app.add_middleware(SessionMiddleware, secret_key=secrets.token_hex(32))  # one per worker
count = 0


@app.get("/increment", operation_id="increment_get")
@app.post("/increment", operation_id="increment")
async def increment() -> dict[str, int]:
    global count
    count += 1
    return {"count": count, "pid": os.getpid()}


@app.get("/report")
@app.get("/healthz")
async def report() -> dict[str, int]:
    return {"count": count, "pid": os.getpid()}


@app.get("/session")
async def visits(request: Request) -> dict[str, int]:
    request.session["visits"] = request.session.get("visits", 0) + 1
    return {"visits": request.session["visits"], "pid": os.getpid()}
