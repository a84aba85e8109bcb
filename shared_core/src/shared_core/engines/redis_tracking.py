"""The near cache's table on Redis: Redis's own client-side caching.

Each process that caches opens one listener connection (RESP2, so that any
redis-py and any Redis 6+ will do) and, on it, asks Redis to broadcast the
invalidation of every key under the cached prefixes to itself::

    CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX <prefix> ...
    SUBSCRIBE __redis__:invalidate

Redis then sends the name of every key written (set, deleted, expired,
evicted) under those prefixes, by anyone, and None for a flush. The listener
adds one to the key's slot of the table; a flush, a lost connection or a
listener that stops answering its heartbeat moves the epoch. redis-py's
own client-side cache (``cache_config``) is sync only and needs RESP3, and
its async client has none, so both of our clients share this one.

A thread waits for the messages; besides, a cached read takes in what has
arrived itself when it last looked more than half a millisecond ago
(``poll``), so neither the GIL's switch interval (5 ms) nor a reader that
was not scheduled holds an invalidation back.

Bound: Redis queues the invalidation while it runs the write, and sends it
in the same turn of its event loop as the write's acknowledgement; a read
in another process returns the old value only until that message has
arrived and at most ``POLL_EVERY`` (0.5 ms) after. A connection that goes
silent without closing (a partition) is declared lost, and everything kept
dropped, within ``HEARTBEAT + PONG_WAIT`` seconds.
"""

from __future__ import annotations

import array
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import redis

from .._config import Config
from .._near import EPOCH, WORDS, bump, slot

log = logging.getLogger("shared_core.redis")

CHANNEL = b"__redis__:invalidate"
HEARTBEAT = 1.0  # seconds of silence before the listener pings Redis
PONG_WAIT = 1.0  # seconds a ping may take before the connection counts as lost
_RETRY_CAP = 1.0  # seconds between attempts to connect, at most
TRACKERS: weakref.WeakSet[Tracker] = weakref.WeakSet()  # of this process
_POLL_WAIT = 0.005  # seconds a poll waits for the listener to let go of the connection


def wrote(source: tuple[str, str], keys: Iterable[str]) -> None:
    """This process wrote ``keys`` at ``source`` (the Redis address and the
    values' prefix), acknowledged or not: what any of its trackers kept of
    them is stale now, whenever Redis's message arrives (read-your-writes
    across every client of the process)."""
    for tracker in list(TRACKERS):
        if tracker.source == source:
            tracker.wrote(keys)


def wrote_all(source: tuple[str, str]) -> None:
    """This process wrote keys at ``source`` it cannot name (a clear)."""
    for tracker in list(TRACKERS):
        if tracker.source == source:
            bump(tracker.words, EPOCH)


def _after_fork_in_child() -> None:
    for tracker in list(TRACKERS):
        tracker._start()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _tracked(prefixes: Iterable[str]) -> list[str]:
    """The prefixes Redis is given: it refuses one that overlaps another."""
    kept: list[str] = []
    for prefix in sorted(set(prefixes), key=len):
        if not any(prefix.startswith(other) for other in kept):
            kept.append(prefix)
    return kept


class Tracker:
    """The table a process's near cache reads, kept current by a listener.

    ``values`` is the prefix of every value's Redis key (``shared_core:APP:v:``);
    ``prefixes`` are the cached keys' prefixes, without it.
    """

    def __init__(self, config: Config, values: str, prefixes: tuple[str, ...]) -> None:
        self._address = str(config.address)
        self._values = values
        self._cut = len(values)
        self._prefixes = prefixes
        self._tracked = [values + p for p in _tracked(prefixes)]
        self._timeout = max(0.1, min(config.connect_timeout, 5.0))
        self.source = (self._address, values)
        self.words = array.array("Q", bytes(8 * WORDS))
        self._start()
        TRACKERS.add(self)

    def _start(self) -> None:
        # Also in a forked child: the parent's thread, lock and connection
        # are not its own, and what it kept was kept under the parent's
        # listener, so the epoch moves on (never back to a count it had).
        self._pid = os.getpid()
        bump(self.words, EPOCH)
        self._lock = threading.Lock()  # one reader of the connection at a time
        self._opening = threading.Lock()  # one listener thread, however many first reads
        self._heard = 0.0  # when the connection last said anything (under _lock)
        self._conn: Any = None
        self._live = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = 0  # connections lost (tests, info)
        self.client_id = 0  # the listener's, in CLIENT LIST

    # the Table protocol ---------------------------------------------------------

    def current(self) -> bool:
        """Whether the listener hears every invalidation now."""
        return self._live and self._pid == os.getpid()

    def open(self) -> Tracker | None:
        """The table, once the listener is subscribed (it starts on first use)."""
        if self._pid != os.getpid():
            self._start()
        if self._thread is None and not self._stop.is_set():
            with self._opening:
                if self._thread is None:
                    thread = threading.Thread(
                        target=self._listen, name="shared_core near cache", daemon=True
                    )
                    thread.start()
                    self._thread = thread
        return self if self._live else None

    # what the engine reports ----------------------------------------------------

    def wrote(self, keys: Iterable[str]) -> None:
        """See :func:`wrote`. Two threads may add at once and one count be
        lost; either way the count has moved since every read that started
        before these writes."""
        words = self.words
        for key in keys:
            if key.startswith(self._prefixes):
                bump(words, slot(key))

    def poll(self) -> bool:
        """Take in the messages already here; then whether the table is current."""
        conn = self._conn
        # Waiting frees the GIL for a listener that holds the lock meanwhile.
        if conn is None or self._pid != os.getpid() or not self._lock.acquire(timeout=_POLL_WAIT):
            return self.current()
        try:
            if conn is self._conn:
                self._drain(conn)
        except Exception as exc:  # any failure means lost
            self._drop(conn, exc)
        finally:
            self._lock.release()
        return self.current()

    def close(self, wait: bool = True) -> None:
        """Stop listening (waiting at most a second for the thread, if ``wait``)."""
        if self._pid != os.getpid():
            self._start()  # the parent's lock may be held for ever here
        self._stop.set()
        TRACKERS.discard(self)
        with self._lock:
            conn, self._conn = self._conn, None
            self._live = False
            bump(self.words, EPOCH)
        if conn is not None:
            conn.disconnect()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(1.0)

    # the listener ---------------------------------------------------------------

    def _connect(self) -> Any:
        pool = redis.ConnectionPool.from_url(
            self._address,
            protocol=2,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
        )
        conn: Any = pool.make_connection()
        try:
            conn.connect()
            conn.send_command("CLIENT", "SETNAME", f"shared_core:near:{os.getpid()}")
            conn.read_response()
            conn.send_command("CLIENT", "ID")
            me = self.client_id = int(conn.read_response())
            prefixes = [word for p in self._tracked for word in ("PREFIX", p)]
            conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", me, "BCAST", *prefixes)
            conn.read_response()
            conn.send_command("SUBSCRIBE", CHANNEL)
            conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        return conn

    def _listen(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning("near cache: cannot listen to Redis (%s); reading through", exc)
                self._stop.wait(min(_RETRY_CAP, 0.05 * 2**failures))
                continue
            with self._lock:
                if self._stop.is_set():
                    conn.disconnect()
                    return
                self._conn = conn
                bump(self.words, EPOCH)  # whatever was kept before is from before we listened
                self._live = True
            started = time.monotonic()
            try:
                self._serve(conn)
            except Exception as exc:
                with self._lock:
                    self._drop(conn, exc)
            # A connection that fails as soon as it is made does not make the
            # next attempt come sooner.
            failures = failures + 1 if time.monotonic() - started < HEARTBEAT else 0
            if failures:
                self._stop.wait(min(_RETRY_CAP, 0.05 * 2**failures))

    def _serve(self, conn: Any) -> None:
        # poll(), not select(): a worker may hold more than 1,024 descriptors.
        poller = select.poll()
        poller.register(conn._sock, select.POLLIN)  # redis-py's socket, waited on unlocked
        self._heard = time.monotonic()
        pinged = 0.0  # when the unanswered ping was sent; 0: none
        while not self._stop.is_set() and conn is self._conn:
            ready = poller.poll(1000 * (PONG_WAIT if pinged else HEARTBEAT))
            with self._lock:
                if conn is not self._conn:
                    return  # dropped by a poll that failed
                if ready or conn.can_read(0):
                    self._drain(conn)
                now = time.monotonic()
                if pinged and self._heard >= pinged:
                    pinged = 0.0  # answered (a reader's poll may have read the pong)
                if not pinged and now - self._heard >= HEARTBEAT:
                    conn.send_command("PING")
                    pinged = now
                elif pinged and now - pinged >= PONG_WAIT:
                    raise TimeoutError(f"no answer to a ping in {PONG_WAIT:g}s")

    def _drain(self, conn: Any) -> None:
        """Count every message already received (the lock is held)."""
        words = self.words
        cut = self._cut
        values = self._values
        while conn.can_read(0):
            message = conn.read_response()
            self._heard = time.monotonic()
            if not isinstance(message, list) or len(message) < 3 or message[0] != b"message":
                continue  # a pong, a subscription's confirmation
            names = message[2]
            if names is None:  # a flush: every key
                bump(words, EPOCH)
                continue
            for name in names:
                text = name.decode("utf-8", "surrogateescape")
                if text.startswith(values):
                    bump(words, slot(text[cut:]))

    def _drop(self, conn: Any, exc: BaseException) -> None:
        """Count the connection lost (the lock is held): nothing kept is current."""
        if conn is not self._conn:
            return
        self._conn = None
        self._live = False
        bump(self.words, EPOCH)
        self.lost += 1
        log.warning("near cache: lost the Redis listener (%s); reconnecting", exc)
        conn.disconnect()
