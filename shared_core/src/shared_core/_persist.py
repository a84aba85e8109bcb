"""Snapshots of the manager engine's state, so that it survives restarts.

A snapshot is a JSON file (mode 0600) written to a temporary name, flushed to
disk and renamed over the old one, so that a crash leaves either the old or
the new snapshot, never half of one. It is read back with ``json`` only:
loading a snapshot never runs code. A file that is not a snapshot of this
format and version is refused and left as it is.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from ._errors import StateError

FORMAT = "shared_core-snapshot"
VERSION = 1

Value = int | bytes


class SnapshotError(StateError):
    """A snapshot file exists but cannot be used (corrupt, foreign, newer)."""


def write(path: Path, data: dict[str, Value], secrets: dict[str, str]) -> None:
    """Write a snapshot atomically."""
    values = {
        key: {"i": value} if isinstance(value, int) else {"b": base64.b64encode(value).decode()}
        for key, value in data.items()
    }
    document = {"format": FORMAT, "version": VERSION, "values": values, "secrets": secrets}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def read(path: Path) -> tuple[dict[str, Value], dict[str, str]] | None:
    """Return the values and secrets of a snapshot, None if there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        document: Any = json.loads(text)
    except ValueError as exc:
        raise SnapshotError(f"{path} is not a snapshot (not JSON: {exc}); left as is") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a {FORMAT} file; left as is")
    if document.get("version") != VERSION:
        raise SnapshotError(
            f"{path} is a version {document.get('version')!r} snapshot; this "
            f"shared_core reads version {VERSION}; left as is"
        )
    try:
        data: dict[str, Value] = {}
        for key, value in document["values"].items():
            data[str(key)] = int(value["i"]) if "i" in value else base64.b64decode(value["b"])
        secrets = {str(k): str(v) for k, v in document["secrets"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"{path} is a damaged snapshot ({exc!r}); left as is") from None
    return data, secrets
