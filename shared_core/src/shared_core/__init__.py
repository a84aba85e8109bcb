"""One shared state for every worker process of a Flask, Quart or FastAPI app."""

from importlib.metadata import PackageNotFoundError, version

from ._aio import AsyncSharedState
from ._broadcast import AsyncSubscription, Subscription
from ._errors import (
    CapacityError,
    ConfigError,
    LockTimeout,
    PersistenceError,
    SnapshotError,
    StateError,
    StateUnavailable,
)
from ._state import SharedState

__all__ = [
    "AsyncSharedState",
    "AsyncSubscription",
    "CapacityError",
    "ConfigError",
    "LockTimeout",
    "PersistenceError",
    "SharedState",
    "SnapshotError",
    "StateError",
    "StateUnavailable",
    "Subscription",
]

try:
    __version__ = version("shared-core")
except PackageNotFoundError:  # pragma: no cover - run from a source tree
    __version__ = "0+unknown"
