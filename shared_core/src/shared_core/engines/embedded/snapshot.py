"""Files the embedded engine keeps: snapshots of the state, and the secrets.

Each is a JSON file (mode 0600) written to a temporary name, flushed to disk
and renamed over the old one, so that a crash leaves either the old or the
new file, never half of one. They are read back with ``json`` only: loading
never runs code. A file that is not of this format and version is refused
with :class:`SnapshotError` and left as it is.

Snapshot format 2 keeps each key's deadline as Unix time, so that a key whose
ttl ran out while the server was down does not come back; format 3 adds the
number of the first log segment written after it (``log``), so that recovery
replays exactly the segments the snapshot does not hold. Formats 1 (no ttls)
and 2 are still read.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from ..._errors import SnapshotError

FORMAT = "shared_core-snapshot"
VERSION = 3
SECRETS_FORMAT = "shared_core-secrets"

Value = int | bytes


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically and durably (mode 0600)."""
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


def _read_json(path: Path, fmt: str, versions: tuple[int, ...]) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        document: Any = json.loads(text)
    except ValueError as exc:
        raise SnapshotError(f"{path} is not a {fmt} file (not JSON: {exc}); left as is") from None
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise SnapshotError(f"{path} is not a {fmt} file; left as is")
    if document.get("version") not in versions:
        raise SnapshotError(
            f"{path} is a version {document.get('version')!r} {fmt} file; this "
            f"shared_core reads versions {', '.join(map(str, versions))}; left as is"
        )
    return document


class Loaded(NamedTuple):
    """What a snapshot held."""

    data: dict[str, Value]
    deadlines: dict[str, float]
    secrets: dict[str, str]
    log: int | None  # the first log segment written after it (None: no log then)


def write(
    path: Path,
    data: dict[str, Value],
    deadlines: dict[str, float],
    secrets: dict[str, str],
    log: int | None = None,
) -> None:
    """Write a snapshot atomically."""
    values: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        entry: dict[str, Any] = (
            {"i": value} if isinstance(value, int) else {"b": base64.b64encode(value).decode()}
        )
        if key in deadlines:
            entry["x"] = deadlines[key]
        values[key] = entry
    document = {
        "format": FORMAT,
        "version": VERSION,
        "values": values,
        "secrets": secrets,
        "log": log,
    }
    write_json(path, document)


def read(path: Path) -> Loaded | None:
    """Return what a snapshot holds, None if there is none."""
    document = _read_json(path, FORMAT, (1, 2, VERSION))
    if document is None:
        return None
    try:
        data: dict[str, Value] = {}
        deadlines: dict[str, float] = {}
        for key, value in document["values"].items():
            data[str(key)] = int(value["i"]) if "i" in value else base64.b64decode(value["b"])
            if "x" in value:
                deadlines[str(key)] = float(value["x"])
        secrets = {str(k): str(v) for k, v in document["secrets"].items()}
        log = document.get("log")
        if log is not None and (type(log) is not int or log < 1):
            raise ValueError(f"log={log!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"{path} is a damaged snapshot ({exc!r}); left as is") from None
    return Loaded(data, deadlines, secrets, log)


def write_secrets(path: Path, secrets: dict[str, str]) -> None:
    """Keep the deployment's secrets in their own file, atomically."""
    write_json(path, {"format": SECRETS_FORMAT, "version": 1, "secrets": secrets})


def read_secrets(path: Path) -> dict[str, str]:
    """The secrets kept at ``path`` (none if there is no file yet)."""
    document = _read_json(path, SECRETS_FORMAT, (1,))
    if document is None:
        return {}
    found = document.get("secrets")
    if not isinstance(found, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in found.items()
    ):
        raise SnapshotError(f"{path} is a damaged secrets file; left as is")
    return dict(found)
