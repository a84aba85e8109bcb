"""One shared state for every worker process of a Flask, Quart or FastAPI app."""

from importlib.metadata import PackageNotFoundError, version

from ._aio import AsyncSharedState
from ._broadcast import AsyncSubscription, Subscription
from ._errors import (
    CapacityError,
    ConfigError,
    FencedError,
    LockTimeout,
    PersistenceError,
    RunOnceFailed,
    SnapshotError,
    StateError,
    StateUnavailable,
)
from ._jobs import AsyncScheduler, Occurrence, Scheduler
from ._lease import AsyncLease, Lease
from ._once import arun_once, deployment_start, run_once
from ._state import SharedState

__all__ = [
    "AsyncLease",
    "AsyncScheduler",
    "AsyncSharedState",
    "AsyncSubscription",
    "CapacityError",
    "ConfigError",
    "FencedError",
    "Lease",
    "LockTimeout",
    "Occurrence",
    "PersistenceError",
    "RunOnceFailed",
    "Scheduler",
    "SharedState",
    "SnapshotError",
    "StateError",
    "StateUnavailable",
    "Subscription",
    "arun_once",
    "deployment_start",
    "run_once",
]

try:
    __version__ = version("shared-core")
except PackageNotFoundError:  # pragma: no cover - run from a source tree
    __version__ = "0+unknown"
