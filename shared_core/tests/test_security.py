"""Private sockets, keys that never live in code, loopback unless told otherwise."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest

from shared_core import ConfigError, SharedState, StateUnavailable
from shared_core._config import base_dir
from shared_core.testing import free_port, spawn


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_directory_socket_and_key_are_private(app: str, manager_url: str) -> None:
    SharedState(manager_url).incr("n")
    state_dir = base_dir() / app
    assert _mode(base_dir()) == 0o700
    assert _mode(state_dir) == 0o700
    assert stat.S_ISSOCK(os.lstat(state_dir / "state.sock").st_mode)
    assert _mode(state_dir / "state.sock") == 0o600
    assert _mode(state_dir / "authkey") == 0o600
    assert _mode(state_dir / "server.log") == 0o600


def test_wrong_authkey_is_refused(
    app: str, manager_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = manager_url
    state = SharedState(url)
    state.set("k", "v")
    sock = str(base_dir() / app / "state.sock")
    with pytest.raises(AuthenticationError):
        Client(sock, family="AF_UNIX", authkey=b"not-the-key")
    monkeypatch.setenv("SHARED_STATE_AUTHKEY", "not-the-key")
    with pytest.raises(StateUnavailable, match="rejected our authkey"):
        SharedState(url).get("k")
    assert state.get("k") == "v"


def test_a_shared_directory_is_refused(runtime_dir: Path, app: str, manager_url: str) -> None:
    url = manager_url
    os.mkdir(base_dir(), 0o700)
    os.mkdir(base_dir() / app)
    os.chmod(base_dir() / app, 0o755)
    with pytest.raises(ConfigError, match="must be private"):
        SharedState(url).get("k")


def test_a_symlinked_directory_is_refused(runtime_dir: Path, app: str, manager_url: str) -> None:
    url = manager_url
    os.mkdir(base_dir(), 0o700)
    target = runtime_dir / "elsewhere"
    os.mkdir(target, 0o700)
    os.symlink(target, base_dir() / app)
    with pytest.raises(ConfigError, match="symlink"):
        SharedState(url).get("k")


def test_a_readable_key_file_is_refused(
    runtime_dir: Path, manager_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = manager_url
    key = runtime_dir / "key"
    key.write_text("k" * 32)
    os.chmod(key, 0o644)
    monkeypatch.setenv("SHARED_STATE_AUTHKEY_FILE", str(key))
    with pytest.raises(ConfigError, match="0600"):
        SharedState(url).get("k")


def _serve(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``shared_core serve ARGS``, its stderr a pipe (bytes), ended with the test run."""
    return spawn(
        [sys.executable, "-m", "shared_core", "serve", *args], env=env, stderr=subprocess.PIPE
    )


def test_tcp_beyond_loopback_needs_the_opt_in(runtime_dir: Path) -> None:
    env = dict(os.environ, SHARED_STATE_AUTHKEY="x" * 32)
    refused = _serve("--url", f"tcp://0.0.0.0:{free_port()}", env=env)
    err = refused.communicate(timeout=30)[1].decode()
    assert refused.returncode != 0
    assert "allow_remote" in err
    assert "refusing to bind 0.0.0.0" in err

    allowed = _serve("--url", f"tcp://0.0.0.0:{free_port()}", "--allow-remote", env=env)
    try:
        assert allowed.stderr is not None
        line = allowed.stderr.readline().decode()
        assert "beyond loopback" in line
        assert "unpickles" in line
    finally:
        allowed.kill()
        allowed.communicate()


def test_tcp_on_loopback_with_a_key_from_the_environment(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "k" * 32
    monkeypatch.setenv("SHARED_STATE_AUTHKEY", key)
    url = f"tcp://127.0.0.1:{free_port()}?connect_timeout=10"
    server = _serve("--url", url, env=dict(os.environ))
    try:
        state = SharedState(url)
        assert state.incr("n") == 1
        assert key not in repr(state.info())
    finally:
        server.terminate()
        err = server.communicate(timeout=10)[1].decode()
    assert server.returncode == 0
    assert key not in err


def test_tcp_without_a_key_is_a_config_error(runtime_dir: Path) -> None:
    with pytest.raises(ConfigError, match="SHARED_STATE_AUTHKEY"):
        SharedState(f"tcp://127.0.0.1:{free_port()}").get("k")


def test_the_generated_key_never_reaches_the_log(app: str, manager_url: str) -> None:
    SharedState(manager_url).incr("n")
    key = (base_dir() / app / "authkey").read_text()
    assert len(key) == 64
    assert key not in (base_dir() / app / "server.log").read_text()


@pytest.mark.parametrize(
    "bad",
    ["redis2://x", "unix://relative.sock", "tcp://127.0.0.1", "local://bad name",
     "local://x?linger=abc", "local://x?linger=-1"],
)  # fmt: skip
def test_bad_urls_are_config_errors(runtime_dir: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        SharedState(bad)


def test_url_comes_from_the_environment(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARED_STATE_URL", "local://from-env")
    assert SharedState(app="ignored").url == "local://from-env"
    monkeypatch.delenv("SHARED_STATE_URL")
    assert SharedState(app="mine").url == "local://mine"
