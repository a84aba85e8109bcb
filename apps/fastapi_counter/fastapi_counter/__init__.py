"""A FastAPI counter whose state is the same in every worker process.

``create_app()`` builds the app; ``fastapi_counter.main:app`` is what servers load.
``lifespan`` attaches to the shared state (async API) and endpoints get it
through the ``CountersDep`` dependency.
Set ``COUNTER_MODE=naive`` to see the bug this fixes: a per-worker global.
"""

from .app import create_app

__all__ = ["create_app"]
