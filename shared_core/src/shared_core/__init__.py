"""One shared state for every worker process of a Flask, Quart or FastAPI app."""

from ._aio import AsyncSharedState
from ._broadcast import AsyncSubscription, Subscription
from ._errors import ConfigError, LockTimeout, StateError, StateUnavailable
from ._persist import SnapshotError
from ._state import SharedState

__all__ = [
    "AsyncSharedState",
    "AsyncSubscription",
    "ConfigError",
    "LockTimeout",
    "SharedState",
    "SnapshotError",
    "StateError",
    "StateUnavailable",
    "Subscription",
]
__version__ = "0.1.0"
