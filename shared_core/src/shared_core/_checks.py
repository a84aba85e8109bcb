"""Argument checks shared by both APIs: bad input raises before anything is sent."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 1024


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"keys are str, not {type(key).__name__}")
    return key


def check_keys(keys: object) -> list[str]:
    """A batch of keys: any iterable of str but a str itself."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
        raise TypeError(f"keys must be an iterable of str, not {type(keys).__name__}")
    return [check_key(k) for k in keys]


def check_mapping(mapping: object) -> Mapping[str, Any]:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"set_many takes a mapping of str to values, not {type(mapping).__name__}")
    for key in mapping:
        check_key(key)
    return mapping


def check_amount(amount: object) -> int:
    if type(amount) is not int:
        raise TypeError(f"incr amounts are int, not {type(amount).__name__}")
    return amount


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} is a number of seconds or None, not {value!r}")
    return float(value)


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    seconds = _seconds(timeout, "timeout")
    if not seconds >= 0:
        raise ValueError(f"timeout must be >= 0, not {timeout!r}")
    return seconds


def check_ttl(ttl: object) -> float | None:
    """None (no expiry) or a finite number of seconds > 0."""
    if ttl is None:
        return None
    seconds = _seconds(ttl, "ttl")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"ttl must be a finite number of seconds > 0, or None; not {ttl!r}")
    return seconds


def check_version(version: object) -> int | None:
    if version is not None and type(version) is not int:
        raise TypeError(f"a version is an int from get_versioned(), or None; not {version!r}")
    return version


def check_nbytes(nbytes: object) -> int:
    if type(nbytes) is not int or not MIN_SECRET_BYTES <= nbytes <= MAX_SECRET_BYTES:
        raise ValueError(f"nbytes must be an int from {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}")
    return nbytes
