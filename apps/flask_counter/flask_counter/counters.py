"""Where the counts live: one shared state, or (naive mode) each worker's own.

Besides the counts, each worker keeps something of its own, as real apps do
(a loaded config, a cache, a model): here, the config ``generation`` it has
acted on. ``reload()`` tells every worker to act, through a broadcast.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Protocol

from shared_core import LockTimeout, SharedState, Subscription


class Counters(Protocol):
    generation: int

    def incr(self, key: str, by: int) -> int: ...
    def get(self, key: str) -> int: ...
    def reset(self, key: str) -> None: ...
    def ping(self) -> None: ...
    def listen(self) -> None: ...
    def reload(self) -> int: ...
    def run_job(self, seconds: int) -> bool: ...
    def job_holder(self) -> int | None: ...


class SharedCounters:
    """Counts in the shared state: one atomic ``incr`` on the state server."""

    def __init__(self, state: SharedState) -> None:
        self.state = state
        self.generation = 0  # of the config this worker has loaded
        self._subscription: Subscription | None = None
        self._pid = 0

    def listen(self) -> None:
        """Subscribe this worker to reload broadcasts, once per process."""
        if self._pid != os.getpid():  # a worker forked from a preloading master subscribes anew
            self._subscription = self.state.subscribe(
                "reload", callback=self._on_reload, on_connect=self._catch_up
            )
            self._pid = os.getpid()
            self._catch_up()  # before this first request is answered

    def reload(self) -> int:
        """Make every worker load the next config generation."""
        generation = self.state.incr("config:generation")
        self.state.publish("reload", {"generation": generation})
        return generation

    def run_job(self, seconds: int) -> bool:
        """Run the report job here unless a worker is already running it."""
        try:
            with self.state.lock("job:report", timeout=0):
                self.state.set("job:report:holder", os.getpid())
                time.sleep(seconds)  # the work; a worker killed here frees the lock
                return True
        except LockTimeout:
            return False

    def job_holder(self) -> int | None:
        """The pid of the worker that last started the job."""
        holder = self.state.get("job:report:holder")
        return None if holder is None else int(holder)

    def _on_reload(self, channel: str, message: Any) -> None:
        self.generation = max(self.generation, int(message["generation"]))

    def _catch_up(self) -> None:
        # Broadcasts sent while this worker was not subscribed are missed:
        # the generation in the state is the truth.
        self.generation = max(self.generation, int(self.state.get("config:generation", 0)))

    def incr(self, key: str, by: int) -> int:
        return self.state.incr(f"count:{key}", by)

    def get(self, key: str) -> int:
        return int(self.state.get(f"count:{key}", 0))

    def reset(self, key: str) -> None:
        self.state.set(f"count:{key}", 0)

    def ping(self) -> None:
        self.state.get("count:counter")


class NaiveCounters:
    """The bug, kept on purpose: a global per worker, read and written apart."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.generation = 0
        self.holder: int | None = None
        self._job = threading.Lock()

    def incr(self, key: str, by: int) -> int:
        value = self.counts.get(key, 0) + by
        time.sleep(0)  # let another thread in between the read and the write
        self.counts[key] = value
        return value

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)

    def reset(self, key: str) -> None:
        self.counts[key] = 0

    def ping(self) -> None:
        pass

    def listen(self) -> None:
        pass

    def reload(self) -> int:
        # Reaches only the worker that got the request: the other workers never hear of it.
        self.generation += 1
        return self.generation

    def run_job(self, seconds: int) -> bool:
        # A lock per worker: other workers run the "only once" job too.
        if not self._job.acquire(blocking=False):
            return False
        try:
            self.holder = os.getpid()
            time.sleep(seconds)
            return True
        finally:
            self._job.release()

    def job_holder(self) -> int | None:
        return self.holder
