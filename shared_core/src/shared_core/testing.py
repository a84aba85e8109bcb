"""Test an app that uses shared_core against real servers: a pytest plugin and helpers.

Enable the fixtures in your own tests with ``pytest -p shared_core.testing``
(or ``addopts = ["-p", "shared_core.testing"]`` in your pytest settings); it
needs ``pip install "shared-core[testing]"``:

- ``isolated_state``: a private ``XDG_RUNTIME_DIR`` and ``XDG_STATE_HOME`` and
  a unique app name for one test, so that it starts a state server of its own; every state server
  started under it is stopped at teardown.
- ``state_server``: an explicit ``python -m shared_core serve`` on a Unix socket.
- ``redis_server``: a real ``redis-server`` on a Unix socket, one per session.

Servers started by a test run end with it, however it ends (a CI timeout, a
second Ctrl-C, ``kill -9`` of pytest): see "tying servers to the test run"
below. At the start of a session the plugin also ends, and reports, what an
earlier run of the same checkout left running.

The helpers work without pytest too:

>>> with RedisServer(workdir) as redis:
...     state = SharedState(f"redis+unix://{redis.socket}?app=test")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar
from urllib.parse import urlencode

import psutil
import pytest

T = TypeVar("T")

__all__ = [
    "RUN_VARIABLE",
    "IsolatedState",
    "RedisServer",
    "StateServer",
    "free_port",
    "isolated_state",
    "kill_and_wait",
    "pids_alive",
    "private_dir",
    "redis_server",
    "run_processes",
    "spawn",
    "state_server",
    "state_servers",
    "wait_for",
]

# Variables that would point a test's clients at another state than its own.
_STATE_VARIABLES = ("SHARED_STATE_URL", "SHARED_STATE_AUTHKEY", "SHARED_STATE_AUTHKEY_FILE")


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def private_dir(prefix: str) -> Path:
    """A new 0700 directory with a short path (a Unix socket path has at most 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


# --- finding and ending state servers -----------------------------------------


def state_servers(
    app: str | None = None, *, runtime_dir: Path | None = None
) -> list[psutil.Process]:
    """The live state-server processes (``shared_core serve``), found by their command line.

    Parameters:
        app: only those of this app (``local://APP``, or a socket in a directory ``APP``).
        runtime_dir: only those started with this ``XDG_RUNTIME_DIR``, or
            serving a socket below it.
    """
    return [
        proc
        for proc, cmd in _serve_processes()
        if (app is None or _of_app(cmd, app))
        and (runtime_dir is None or _runs_under(proc, cmd, runtime_dir))
    ]


def _serve_processes() -> Iterator[tuple[psutil.Process, list[str]]]:
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd: list[str] = proc.info["cmdline"] or []
        if "shared_core" in cmd and "serve" in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            yield proc, cmd


def _of_app(cmd: list[str], app: str) -> bool:
    return any(a.startswith(f"local://{app}") or f"/{app}/" in a for a in cmd)


def _runs_under(proc: psutil.Process, cmd: list[str], runtime_dir: Path) -> bool:
    if any(a.startswith(f"unix://{runtime_dir}/") for a in cmd):
        return True
    try:
        return proc.environ().get("XDG_RUNTIME_DIR") == str(runtime_dir)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def kill_and_wait(procs: list[psutil.Process], timeout: float = 5) -> None:
    """SIGKILL ``procs`` and wait until they are gone and have let go of their files."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    # psutil.wait_procs polls non-children slowly; a tight loop is much faster.
    wait_for(lambda: not pids_alive([p.pid for p in procs]), timeout, f"{procs} to die")


def pids_alive(pids: list[int]) -> list[int]:
    """The pids whose process still runs or still holds its files."""
    return [p for p in pids if not _dead(p)]


def _dead(pid: int) -> bool:
    # A killed multi-threaded process shows as a zombie while its other
    # threads, which share its open sockets, are still exiting.
    try:
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        return zombie and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (FileNotFoundError, ProcessLookupError):
        return True


# --- servers -------------------------------------------------------------------


_S = TypeVar("_S", bound="_Server")


class _Server:
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> _Server:
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL it, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        """Stop it cleanly (SIGTERM); SIGKILL if it has not left after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(str(path)) == 0


class StateServer(_Server):
    """An explicit state server, ``python -m shared_core serve --url unix://...``,
    run on its own as a deployment runs it beside its app server.

    Parameters:
        workdir: a private (0700) directory with a short path; the socket is
            ``workdir/state.sock`` and its authkey the file ``workdir/authkey``.
        env: the server's environment (default: this process's).
        query: options of the URL, e.g. ``connect_timeout=0.5`` so that
            clients give up reconnecting sooner.
    """

    def __init__(
        self, workdir: Path, env: Mapping[str, str] | None = None, **query: object
    ) -> None:
        self.workdir = workdir
        self.env = env
        self.socket = workdir / "state.sock"
        self.url = f"unix://{self.socket}" + (f"?{urlencode(query)}" if query else "")

    def start(self, timeout: float = 30) -> StateServer:
        """Start it (again) and wait until it accepts connections."""
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-m", "shared_core", "serve", "--url", self.url],
            env=None if self.env is None else dict(self.env),
        )
        wait_for(lambda: proc.poll() is not None or _accepts(self.socket), timeout, "serve")
        if proc.poll() is not None:
            raise RuntimeError(f"shared_core serve exited with {proc.returncode}; see its output")
        return self


class RedisServer(_Server):
    """A real ``redis-server`` on ``workdir/redis.sock``, without persistence.

    Parameters:
        workdir: a private directory for the socket; keep its path short
            (a Unix socket path has at most 107 bytes).
        port: also listen on this TCP port of 127.0.0.1 (0: no TCP).
        durable: keep an append-only file, fsynced on every write, so that
            a SIGKILL loses nothing acknowledged (and a restart keeps it).
    """

    def __init__(self, workdir: Path, port: int = 0, durable: bool = False) -> None:
        self.workdir = workdir
        self.port = port
        self.durable = durable
        self.socket = workdir / "redis.sock"

    def start(self) -> RedisServer:
        """Start it (again) and wait until it listens; RuntimeError if no binary."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install redis-server; "
                "macOS: brew install redis; or run bash ci/test, which installs it)"
            )
        self.socket.unlink(missing_ok=True)
        self.proc = proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "",
             "--appendonly", "yes" if self.durable else "no", "--appendfsync", "always",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: self.socket.exists() or proc.poll() is not None, 20, "redis-server")
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        return self

    def url(self, app: str, **query: object) -> str:
        """A ``redis+unix://`` state URL of this server for ``app``."""
        return f"redis+unix://{self.socket}?" + urlencode({"app": app, **query})


# --- the pytest plugin -----------------------------------------------------------


@dataclass(frozen=True)
class IsolatedState:
    """What ``isolated_state`` set up: the test's runtime directory and app name."""

    runtime_dir: Path
    app: str

    @property
    def state_home(self) -> Path:
        """The test's ``XDG_STATE_HOME``, where the app's secrets are kept."""
        return self.runtime_dir / "state"

    @property
    def url(self) -> str:
        """The embedded default of this app: ``local://APP``."""
        return f"local://{self.app}"

    def servers(self) -> list[psutil.Process]:
        """The state servers started under this runtime directory, still alive."""
        return state_servers(runtime_dir=self.runtime_dir)


@pytest.fixture
def isolated_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[IsolatedState]:
    """A private ``XDG_RUNTIME_DIR`` and ``XDG_STATE_HOME`` and a unique app
    name; state servers started under them (by this process or its children)
    are killed at teardown."""
    isolated = IsolatedState(private_dir("sc-"), f"t{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(isolated.runtime_dir))
    monkeypatch.setenv("XDG_STATE_HOME", str(isolated.state_home))
    for name in _STATE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield isolated
    kill_and_wait(
        [
            proc
            for proc, cmd in _serve_processes()
            if _of_app(cmd, isolated.app) or _runs_under(proc, cmd, isolated.runtime_dir)
        ]
    )
    shutil.rmtree(isolated.runtime_dir, ignore_errors=True)


@pytest.fixture
def state_server() -> Iterator[StateServer]:
    """An explicit state server for one test (``.url``; ``.kill()`` and ``.start()`` at will)."""
    workdir = private_dir("st-")
    env = {k: v for k, v in os.environ.items() if k not in _STATE_VARIABLES}
    try:
        with StateServer(workdir, env) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the whole session (``.socket``, ``.url(app)``); fails
    the tests that use it when ``redis-server`` is not installed."""
    workdir = private_dir("redis-")
    try:
        with RedisServer(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
