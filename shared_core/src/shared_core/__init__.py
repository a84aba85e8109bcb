"""One shared state for every worker process of a Flask, Quart or FastAPI app."""

from ._aio import AsyncSharedState
from ._errors import ConfigError, LockTimeout, StateError, StateUnavailable
from ._state import SharedState

__all__ = [
    "AsyncSharedState",
    "ConfigError",
    "LockTimeout",
    "SharedState",
    "StateError",
    "StateUnavailable",
]
__version__ = "0.1.0"
