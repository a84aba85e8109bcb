"""How values travel and are stored, per engine.

Ints are always stored as themselves (so that ``incr`` can add to them on the
server); everything else is encoded by the client, and no server decodes it.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any, Protocol

from ._errors import StateError

Raw = int | bytes


class Codec(Protocol):
    def encode(self, value: object) -> Raw: ...
    def decode(self, raw: Raw | None, default: Any = None) -> Any: ...


class PickleCodec:
    """The manager engine's: anything picklable, stored as pickled bytes."""

    def encode(self, value: object) -> Raw:
        if type(value) is int:
            return value
        try:
            return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"cannot store a {type(value).__name__}: {exc}") from exc

    def decode(self, raw: Raw | None, default: Any = None) -> Any:
        if raw is None:
            return default
        if isinstance(raw, int):
            return raw
        return pickle.loads(raw)  # noqa: S301 - bytes that a client of ours pickled


_JSON_TAG = b"j"
_PICKLE_TAG = b"p"


def _check_json_like(value: object, path: str = "value") -> None:
    # json.dumps would turn a tuple into a list and a key 1 into "1": refuse
    # what would not come back as it went in.
    if value is None or type(value) in (str, int, float, bool):
        return
    if type(value) is list:
        for i, item in enumerate(value):
            _check_json_like(item, f"{path}[{i}]")
        return
    if type(value) is dict:
        for k, item in value.items():
            if type(k) is not str:
                raise TypeError(f"cannot store {path}: its key {k!r} is not a str (JSON)")
            _check_json_like(item, f"{path}[{k!r}]")
        return
    raise TypeError(
        f"cannot store {path}, a {type(value).__name__}: JSON cannot round-trip it; "
        "store None, bool, int, float, str, list and dict, or opt in to "
        "?serializer=pickle"
    )


# The decoder's scanner (C): typeshed does not list it.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json_decode(text: str) -> Any:
    """json.loads of what encode() wrote (UTF-8, no whitespace) without
    json.loads's detection of the encoding and its whitespace matches: half
    the time of a cached read."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        end = -1
    if end != len(text):
        return json.loads(text)  # not ours: json's own error, or its answer
    return value


class RedisCodec:
    """The Redis engine's: ints as decimal strings (INCRBY works on them),
    JSON-like values as tagged JSON, and pickles only by explicit opt-in,
    because a shared Redis may hold bytes written by anyone."""

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle

    def encode(self, value: object) -> Raw:
        if type(value) is int:
            return value
        if self.allow_pickle:
            try:
                return _PICKLE_TAG + pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise TypeError(f"cannot store a {type(value).__name__}: {exc}") from exc
        _check_json_like(value)
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except ValueError as exc:
            raise TypeError(f"cannot store {value!r}: {exc}") from exc
        return _JSON_TAG + text.encode()

    def decode(self, raw: Raw | None, default: Any = None) -> Any:
        if raw is None:
            return default
        if isinstance(raw, int):
            return raw
        tag = raw[:1]
        if tag == _JSON_TAG:
            return _json_decode(raw[1:].decode())
        if tag == _PICKLE_TAG:
            if not self.allow_pickle:
                raise StateError("this value was pickled; reading it needs ?serializer=pickle")
            return pickle.loads(raw[1:])  # noqa: S301 - opted in, see README
        return int(raw)
