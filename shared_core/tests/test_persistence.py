"""Snapshots of the manager engine: off by default, atomic, refused when foreign."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from conftest import server_processes
from shared_core import SharedState, StateUnavailable
from shared_core._config import base_dir, data_home
from shared_core.testing import StateServer, kill_and_wait, wait_for


def _snapshot(app: str) -> Path:
    """Where ``persist=1`` keeps a local:// app's snapshot: on disk, not in
    the runtime directory (often a tmpfs)."""
    return data_home() / app / "snapshot.json"


def test_off_by_default(app: str, manager_url: str) -> None:
    state = SharedState(manager_url)
    state.incr("n")
    state.close()
    wait_for(lambda: not server_processes(app), 10, "the idle server to exit")
    assert not _snapshot(app).exists()
    assert SharedState(manager_url).get("n") is None


def test_state_survives_a_restart_of_the_whole_deployment(app: str) -> None:
    url = f"local://{app}?linger=0.5&persist=1"
    state = SharedState(url)
    state.incr("n", 41)
    state.set("cfg", {"a": [1, 2]})
    secret = state.secret("SECRET_KEY")
    state.close()
    # The server leaves with its last client and writes a final snapshot.
    wait_for(lambda: not server_processes(app), 10, "the idle server to exit")
    assert stat.S_IMODE(os.stat(_snapshot(app)).st_mode) == 0o600
    again = SharedState(url)
    assert again.incr("n") == 42
    assert again.get("cfg") == {"a": [1, 2]}
    assert again.secret("SECRET_KEY") == secret


def test_sigkill_loses_at_most_the_writes_since_the_last_snapshot(app: str) -> None:
    url = f"local://{app}?linger=1&persist=1&snapshot_interval=0.2"
    state = SharedState(url)
    for _ in range(100):
        state.incr("n")
    time.sleep(0.6)  # at least one snapshot of all 100
    for _ in range(50):
        state.incr("n")
    kill_and_wait(server_processes(app))
    count = SharedState(url).get("n")
    lost = 150 - count
    print(f"SIGKILL after 150 increments: {count} kept, {lost} lost")
    assert 100 <= count <= 150


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"hello": "world"}', "not a shared_core-snapshot"),
        ('{"format": "shared_core-snapshot", "version": 99}', "version 99"),
        ('{"format": "shared_core-snapshot", "version": 1, "values": {"k": {}}}', "damaged"),
    ],
)
def test_a_corrupt_or_foreign_snapshot_is_refused_and_kept(
    app: str, content: str, message: str
) -> None:
    _snapshot(app).parent.mkdir(mode=0o700, parents=True)
    _snapshot(app).write_text(content)
    with pytest.raises(StateUnavailable, match=message):
        SharedState(f"local://{app}?persist=1").get("n")
    assert _snapshot(app).read_text() == content, "the file must be left as it was"
    assert not server_processes(app)


def test_explicit_server_saves_on_sigterm(runtime_dir: Path) -> None:
    snapshot = runtime_dir / "state.json"
    server = StateServer(runtime_dir / "explicit", persist=snapshot, snapshot_interval=3600)
    try:
        SharedState(server.start().url).set("k", "kept")
        server.stop()  # SIGTERM; SIGKILL (a non-zero exit) after 10 s
        assert server.proc is not None
        assert server.proc.returncode == 0
        document = json.loads(snapshot.read_text())
        assert document["format"] == "shared_core-snapshot"
        assert SharedState(server.start().url).get("k") == "kept"
    finally:
        server.kill()


def test_a_snapshot_left_in_the_runtime_directory_is_moved_to_disk(app: str) -> None:
    """Earlier releases kept local:// snapshots in the runtime directory."""
    old = base_dir() / app / "snapshot.json"
    os.mkdir(base_dir(), 0o700)
    os.mkdir(base_dir() / app, 0o700)
    old.write_text(
        '{"format": "shared_core-snapshot", "version": 2, "values": {"n": {"i": 7}}, "secrets": {}}'
    )
    with SharedState(f"local://{app}?persist=1") as state:
        assert state.get("n") == 7
    assert not old.exists()
    assert _snapshot(app).exists()
