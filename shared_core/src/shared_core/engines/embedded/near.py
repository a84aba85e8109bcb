"""The near cache of the embedded engine: reads of cached keys without a
round trip, never stale once a write has been acknowledged.

The server keeps a table of write counters in a file beside its socket,
mapped into memory by the server (read and write) and by every client on
the machine (read only). A key falls in one slot of the table (a CRC-32 of
its name); every write of a key (set, delete, expiry, a new deadline) adds
one to its slot before the write is acknowledged, under the store's mutex.

A client reads the slot of a key before it asks for the key's value, and
keeps the value with that count. A later read of the key uses the value kept
while the slot still holds that count: then no write of a key of that slot
has happened since the value was read, so the value is the current one. A
write acknowledged to any process has already moved the count, so no read
that starts after the acknowledgement returns the old value.

A new server (after a crash, a restart, a replay of the log) adds one to the
table's epoch (its second word) before it serves anyone, and every kept
value also carries the epoch it was read in. The file is kept when a server
exits, so that the next server of the state finds the same table and the
clients that still map it see the new epoch.

The server holds an exclusive ``flock`` on the file while it runs; the
kernel drops it the moment the server exits, however it exits. A client
whose check finds the file unlocked keeps nothing, so that while no server
runs its reads fail (``StateUnavailable``) as every other call does, instead
of answering from what it kept.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import mmap
import os
import secrets
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._config import Config
from ..._near import EPOCH, WORDS, NearCache, bump, slot

_MARK = int.from_bytes(b"scnear01", "little")
_SIZE = 8 * WORDS  # 512 KiB
# How long a new server waits for an old one, still exiting, to let go of
# the file's lock; past that it serves without it and clients keep nothing.
_LOCK_WAIT = 5.0

log = logging.getLogger("shared_core.server")


def table_path(config: Config) -> Path | None:
    """Where the server of ``config`` keeps its table: beside its Unix socket
    (none for a TCP server, whose clients may be on other machines)."""
    if config.state_dir is None or not isinstance(config.address, str):
        return None
    return Path(config.address + ".near")


def near_cache(config: Config, decode: Callable[[Any], Any]) -> NearCache | None:
    """A client's near cache, if ``config`` asks for one and has a table."""
    path = table_path(config)
    if not config.near_cache or path is None:
        return None
    return NearCache(
        functools.partial(ClientTable.open, path), config.near_cache, config.near_cache_size, decode
    )


class ServerTable:
    """The table as the server writes it (created 0600, kept across restarts)."""

    def __init__(self, path: Path) -> None:
        fd = self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        if not _lock(fd):
            log.warning("near cache: %s stays locked; clients will read through", path)
        self.path = path
        self.words = memoryview(self._map).cast("Q")
        if self.words[0] != _MARK:
            # A new file: its epoch starts anywhere, so that a client still
            # mapping a deleted table never finds its counts here by chance.
            self.words[EPOCH] = secrets.randbits(63)
            self.words[0] = _MARK
        # Whatever the clients kept was read from another server.
        bump(self.words, EPOCH)

    def touch(self, key: str) -> None:
        """Count a write of ``key`` (the store's mutex is held)."""
        bump(self.words, slot(key))

    def touch_all(self) -> None:
        """Make every kept value stale (a replay, a bulk change)."""
        bump(self.words, EPOCH)

    def close(self) -> None:
        self.words.release()
        self._map.close()
        os.close(self._fd)  # and with it the lock


def _lock(fd: int) -> bool:
    """Take the table's lock for this server, waiting at most ``_LOCK_WAIT``
    for a server still exiting (or a client checking at that moment)."""
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)


def _served(fd: int) -> bool:
    """Whether a server holds the lock of the file open at ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class ClientTable:
    """The table as a client reads it; None from :meth:`open` when there is none."""

    def __init__(self, path: Path, fd: int) -> None:
        self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        self.words = memoryview(self._map).cast("Q")
        self.path = path
        self.inode = os.fstat(fd).st_ino
        self._fd = fd  # kept open: the server's lock is checked on it
        # A cache drops a table without closing it (another thread may read it).
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, path: Path) -> ClientTable | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size != _SIZE or not _served(fd):
                os.close(fd)
                return None
            table = cls(path, fd)
        except BaseException:
            os.close(fd)
            raise
        if table.words[0] != _MARK:
            table.close()
            return None
        return table

    def current(self) -> bool:
        """Whether the file at ``path`` is still the one mapped (a server that
        found none made a new one) and a server still runs on it."""
        try:
            if os.stat(self.path).st_ino != self.inode:
                return False
        except FileNotFoundError:
            return False
        return _served(self._fd)

    poll = current  # nothing arrives: the server writes the counters themselves

    def close(self) -> None:
        self.words.release()
        self._map.close()
        self._closer()
