"""The append-only log's record format: bytes in, operations out; no files.

A log file is a sequence of entries. An entry is what one store call wrote,
so a batch (``set_many``) is one entry and is replayed whole or not at all::

    entry  = length:u32 crc32(body):u32 body
    body   = op op ...
    op     = b"P" key deadline:f64 value     a value written (its post-image:
                                              an ``incr`` logs the sum, so
                                              replay needs no arithmetic)
           | b"D" key                         a key removed (delete, eviction)
           | b"E" key deadline:f64            a key's deadline set or dropped
           | b"C" key                         every key under a prefix removed
    key    = length:u32 utf-8
    value  = b"i" length:u32 decimal-ascii    an int, any size
           | b"b" length:u32 bytes            anything else, as the client encoded it
    deadline: Unix time; NaN for "no deadline"

Integers are little-endian. Deadlines are absolute, so a key whose ttl ran
out while the server was down is not brought back. Decoding never runs code.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator
from typing import Final

Value = int | bytes
# (kind, key, value, deadline): value only for PUT, deadline for PUT and EXPIRE.
Op = tuple[bytes, str, Value | None, float | None]

PUT: Final = b"P"
DELETE: Final = b"D"
EXPIRE: Final = b"E"
CLEAR: Final = b"C"

HEADER: Final = struct.Struct("<II")
_LEN = struct.Struct("<I")
_F64 = struct.Struct("<d")
_NAN_BYTES = _F64.pack(math.nan)
_KIND_KEY = struct.Struct("<cI")
_DEADLINE_VALUE = struct.Struct("<dcI")
MAX_ENTRY: Final = 1 << 31  # a longer length field is damage, not data


class Damaged(ValueError):
    """An entry's body does not decode (the checksum matched: a bug, not a tear)."""


def _key(key: str) -> bytes:
    raw = key.encode("utf-8", "surrogatepass")
    return _LEN.pack(len(raw)) + raw


def _deadline(deadline: float | None) -> bytes:
    return _NAN_BYTES if deadline is None else _F64.pack(deadline)


def put(key: str, value: Value, deadline: float | None) -> bytes:
    """The op that writes ``value`` at ``key`` with ``deadline``."""
    # On every logged write: two packs and one join.
    raw_key = key.encode("utf-8", "surrogatepass")
    if type(value) is int:
        raw, tag = b"%d" % value, b"i"
    else:
        raw, tag = bytes(value), b"b"
    return b"".join(
        (
            _KIND_KEY.pack(PUT, len(raw_key)),
            raw_key,
            _DEADLINE_VALUE.pack(math.nan if deadline is None else deadline, tag, len(raw)),
            raw,
        )
    )


def delete(key: str) -> bytes:
    return DELETE + _key(key)


def expire(key: str, deadline: float | None) -> bytes:
    return EXPIRE + _key(key) + _deadline(deadline)


def clear(prefix: str) -> bytes:
    return CLEAR + _key(prefix)


def frame(body: bytes) -> bytes:
    """One entry: its length and checksum, then ``body``."""
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def decode(body: bytes) -> Iterator[Op]:
    """The ops of one entry's body (whose checksum was checked)."""
    view, at, end = memoryview(body), 0, len(body)
    try:
        while at < end:
            kind = bytes(view[at : at + 1])
            (size,) = _LEN.unpack_from(view, at + 1)
            at += 5
            key = bytes(view[at : at + size]).decode("utf-8", "surrogatepass")
            at += size
            if kind in (DELETE, CLEAR):
                yield kind, key, None, None
                continue
            (raw_deadline,) = _F64.unpack_from(view, at)
            at += 8
            deadline = None if math.isnan(raw_deadline) else raw_deadline
            if kind == EXPIRE:
                yield kind, key, None, deadline
                continue
            if kind != PUT:
                raise Damaged(f"unknown op {kind!r}")
            tag = bytes(view[at : at + 1])
            (size,) = _LEN.unpack_from(view, at + 1)
            at += 5
            raw = bytes(view[at : at + size])
            if len(raw) != size:
                raise Damaged("a value runs past the end of its entry")
            at += size
            if tag == b"i":
                yield kind, key, int(raw), deadline
            elif tag == b"b":
                yield kind, key, raw, deadline
            else:
                raise Damaged(f"unknown value tag {tag!r}")
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, Damaged):
            raise
        raise Damaged(str(exc)) from None
