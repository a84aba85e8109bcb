"""The exceptions of the public API."""

from __future__ import annotations


class StateError(Exception):
    """Base class of every error this package raises on purpose."""


class StateUnavailable(StateError):
    """The state server could not be reached, or the connection broke mid-call.

    Raised after a bounded reconnect (``connect_timeout``) or when a call
    outlives ``op_timeout``. A call that raised this may or may not have been
    applied: the request may have reached the server before the connection broke.
    """


class LockTimeout(StateError, TimeoutError):
    """A lock (or a ``mutate`` of a key) could not be taken within its timeout."""


class ConfigError(StateError, ValueError):
    """The URL, address, authkey or directory settings are invalid or unsafe."""


class CapacityError(StateError):
    """A write of new keys would go past ``max_keys`` and the eviction policy
    allows nothing to be evicted; nothing was written."""


class SnapshotError(StateError):
    """A file the embedded server keeps (a snapshot, the secrets) exists but
    cannot be used (corrupt, foreign, newer); it is left as it is."""


class PersistenceError(StateError):
    """The embedded server could not write its append-only log (disk full,
    file too large, I/O error).

    A write refused before it ran changed nothing. A write whose entry could
    not be written in time is not acknowledged: the server keeps it and writes
    it when the disk allows, but loses it if it dies first. Reads go on.
    """


class FencedError(StateError):
    """A write with a lease's fencing token was refused: the lease has a newer
    holder, or the key was written by one. Nothing was written."""


class RunOnceFailed(StateError):
    """The function of ``run_once`` raised in the worker that ran it; every
    worker of that start of the deployment gets this error with its message
    (the one that ran it, with the original exception as ``__cause__``)."""
