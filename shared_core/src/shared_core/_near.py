"""The near cache: values of chosen keys kept in each process, read with no
round trip while a table of write counters says they are current.

Every engine that offers it keeps a table of counters, one per slot of keys
(a CRC-32 of the key's name picks its slot), plus an epoch:

- the embedded engine's server adds one to a key's slot before it
  acknowledges any write of the key, in a file every client on the machine
  maps (so no read that starts after the acknowledgement sees the old value);
- on Redis, a listener connection of each process hears Redis's own
  invalidation messages (client-side caching, ``CLIENT TRACKING``) and adds
  one to the slot when it does; the writing process adds one itself once its
  write is acknowledged.

A client reads the slot's count before it asks for a value and keeps the
value with that count; a later read uses the kept value while the slot still
holds that count, the epoch is unchanged and the key's deadline has not
passed. Any doubt (a lost connection, a new server, a flush) moves the epoch,
which makes every kept value stale at once.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

SLOTS = 1 << 16  # two hot keys share a counter one time in 65,536
HEADER = 2  # words before the slots: a format mark, the epoch
EPOCH = 1  # the epoch's word
WORDS = HEADER + SLOTS
_MASK = 0xFFFFFFFFFFFFFFFF
POLL_EVERY = 0.0005  # seconds between a hit's checks for invalidations (see poll)

MISS: Any = object()  # what read() returns when the value must be fetched
_monotonic = time.monotonic
_time = time.time


def slot(key: str) -> int:
    """The word of a table that counts the writes of ``key``."""
    return HEADER + (zlib.crc32(key.encode("utf-8", "surrogatepass")) & (SLOTS - 1))


def bump(words: Any, i: int) -> None:
    """Add one to word ``i`` (wrapping at 64 bits)."""
    words[i] = (words[i] + 1) & _MASK


class Table(Protocol):
    """Counters an engine keeps current: ``words[EPOCH]`` and one per slot."""

    @property
    def words(self) -> Sequence[int]: ...

    def current(self) -> bool:
        """Whether the counters still follow the writes (else find a new table)."""
        ...

    def poll(self) -> bool:
        """Take in what has arrived; then whether the table is current."""
        ...


_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})


def _copier(value: Any, decode: Callable[[Any], Any], raw: Any) -> Callable[[Any], Any] | None:
    """How a read gets its own copy of a decoded value: None for an immutable
    one (itself), a shallow copy for a flat list or dict of immutables, else
    a new decoding of ``raw``."""
    kind = type(value)
    if kind in _SCALARS:
        return None
    if kind is tuple and all(type(v) in _SCALARS for v in value):
        return None
    if kind is dict and all(type(k) in _SCALARS and type(v) in _SCALARS for k, v in value.items()):
        return dict.copy
    if kind is list and all(type(v) in _SCALARS for v in value):
        return list.copy
    return lambda _: decode(raw)


class NearCache:
    """Values of the keys under ``prefixes``, kept in this process and shared
    by its threads (and event loops). The state's ``get`` asks :meth:`read`
    first; on a miss the engine's ``get`` fetches the value and keeps it::

        mark = near.mark(key)  # before the value is read
        raw, deadline = <the value and its deadline, from the engine>
        near.keep(key, mark, raw, deadline)

    A hit decodes the value once, then hands out copies (an immutable value
    itself, a flat list or dict by a shallow copy, anything else decoded again).

    ``open_table`` gives the engine's table, or None while there is none (no
    server yet, a listener not connected): nothing is kept meanwhile. At most
    ``size`` values are kept; past that, the least recently read go first
    (the CLOCK approximation of LRU: a hit only sets a flag, so that it costs
    no reordering). A hit polls the table when its last poll is more than
    ``POLL_EVERY`` seconds old, so that a thread that only reads cached values
    (and holds the GIL) still takes in what a listener has received, and
    finds out that the table is no longer current.
    """

    def __init__(
        self,
        open_table: Callable[[], Table | None],
        prefixes: tuple[str, ...],
        size: int,
        decode: Callable[[Any], Any],
    ) -> None:
        self._open_table = open_table
        self.prefixes = prefixes
        self._size = size
        self._decode = decode
        self._next_poll = 0.0
        self._table: Table | None = None
        # key -> [raw, slot, count, epoch, deadline, (value, copier) or None, read since kept]
        self._entries: dict[str, list[Any]] = {}
        self.hits = 0

    def read(self, key: str, default: Any) -> Any:
        """The decoded value of ``key`` (``default``: missing), a copy the
        caller may change, if it is kept and current; else MISS (the engine's
        ``get`` then fetches it)."""
        try:
            entry = self._entries.get(key)
        except TypeError:  # not a str: the engine's path says so
            return MISS
        table = self._table
        if entry is None or table is None:
            return MISS
        now = _monotonic()
        if now >= self._next_poll:
            self._next_poll = now + POLL_EVERY
            if not table.poll():
                self._table = None
                self._entries.clear()
                return MISS
        words = table.words
        if words[entry[1]] != entry[2] or words[EPOCH] != entry[3]:
            return MISS
        deadline = entry[4]
        if deadline is not None and deadline <= _time():
            return MISS
        entry[6] = True
        self.hits += 1
        raw = entry[0]
        if raw is None:
            return default
        decoded = entry[5]
        if decoded is None:
            value = self._decode(raw)
            # one slot, so that a thread never sees a value without its copier
            decoded = entry[5] = (value, _copier(value, self._decode, raw))
        value, copy = decoded
        return value if copy is None else copy(value)

    def mark(self, key: str) -> tuple[int, int, int] | None:
        """What the table says of ``key`` now: read before its value is."""
        table = self._table
        if table is None or not table.current():
            self._entries.clear()
            table = self._table = self._open_table()
            if table is None:
                return None
        i = slot(key)
        words = table.words
        return i, words[i], words[EPOCH]

    def keep(
        self, key: str, mark: tuple[int, int, int] | None, raw: Any, deadline: float | None
    ) -> None:
        """Keep ``raw``, read after ``mark``, as the value of ``key``."""
        if mark is None:
            return
        entries = self._entries
        entries.pop(key, None)
        entries[key] = [raw, *mark, deadline, None, False]
        try:
            while len(entries) > self._size:
                oldest = next(iter(entries))
                entry = entries.pop(oldest)
                if entry[6]:  # read since kept or since its last pass: a second chance
                    entry[6] = False
                    entries[oldest] = entry
        except (KeyError, RuntimeError):  # another thread's change meanwhile: a value kept
            pass

    def covers(self, key: str) -> bool:
        """Whether ``key`` is read through this cache."""
        return key.startswith(self.prefixes)

    def clear(self) -> None:
        """Drop every kept value."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
