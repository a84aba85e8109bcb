"""Fixtures: a private runtime directory, a unique app, and the state under test.

Every test gets its own ``XDG_RUNTIME_DIR`` and app name, so each starts its
own state server.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import pytest

from shared_core import AsyncSharedState, SharedState
from shared_core.testing import redis_server, wait_for


def server_processes(app: str) -> list[psutil.Process]:
    """The live state-server processes of ``app``, found by their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if (
            "shared_core" in cmd
            and "serve" in cmd
            and any(a.startswith(f"local://{app}") or f"/{app}/" in a for a in cmd)
        ):
            found.append(proc)
    return found


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Short, so that socket paths stay under the 107-byte limit.
    path = Path(tempfile.mkdtemp(prefix="sc-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    monkeypatch.delenv("SHARED_STATE_URL", raising=False)
    monkeypatch.delenv("SHARED_STATE_AUTHKEY", raising=False)
    monkeypatch.delenv("SHARED_STATE_AUTHKEY_FILE", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def app(runtime_dir: Path) -> Iterator[str]:
    """A fresh app name; its servers are killed at teardown (the exit rule
    itself is checked by its own tests)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    kill_and_wait(server_processes(name))


@pytest.fixture(scope="session")
def redis_socket() -> Iterator[str]:
    """A redis-server on a private Unix socket, for the whole session."""
    # Short, so that the socket path stays under the 107-byte limit.
    workdir = Path(tempfile.mkdtemp(prefix="redis-"))
    try:
        with redis_server(workdir) as sock:
            yield str(sock)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def redis_url(sock: str, app: str, **query: object) -> str:
    params = "".join(f"&{k}={v}" for k, v in query.items())
    return f"redis+unix://{sock}?app={app}{params}"


LOCK_LEASE = 2  # seconds, for the Redis engine in these tests


@pytest.fixture
def manager_url(app: str) -> str:
    """A URL of the embedded manager engine, for tests of its own lifecycle."""
    return f"local://{app}?linger=1"


@pytest.fixture(params=["manager", "redis"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(engine: str, app: str, request: pytest.FixtureRequest) -> str:
    """A URL of each engine in turn: the contract is the same on both."""
    if engine == "manager":
        return f"local://{app}?linger=1"
    return redis_url(request.getfixturevalue("redis_socket"), app, lock_lease=LOCK_LEASE)


class AsyncAdapter:
    """Runs an AsyncSharedState on a private loop behind the sync API's shape,
    so that one test body checks both APIs."""

    def __init__(self, state: AsyncSharedState) -> None:
        self.state = state
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.state, name)
        if name in ("lock", "mutate"):
            return self._wrap_cm(attr)
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **k: self.loop.run_until_complete(attr(*a, **k))
        return attr

    def _wrap_cm(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        @contextmanager
        def cm(*args: Any, **kwargs: Any) -> Iterator[Any]:
            acm = factory(*args, **kwargs)
            value = self.loop.run_until_complete(acm.__aenter__())
            try:
                yield value
            except BaseException as exc:
                exit_ = acm.__aexit__(type(exc), exc, exc.__traceback__)
                if not self.loop.run_until_complete(exit_):
                    raise
            else:
                self.loop.run_until_complete(acm.__aexit__(None, None, None))

        return cm

    def close(self) -> None:
        self.loop.run_until_complete(self.state.aclose())
        self.loop.close()


@pytest.fixture(params=["sync", "async"])
def state(request: pytest.FixtureRequest, url: str) -> Iterator[Any]:
    """The state under test, through the sync API or the async one."""
    if request.param == "sync":
        sync = SharedState(url)
        yield sync
        sync.close()
    else:
        adapter = AsyncAdapter(AsyncSharedState(url))
        yield adapter
        adapter.close()


def kill_and_wait(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    # psutil.wait_procs polls non-children slowly; a tight loop is much faster.
    wait_for(lambda: not pids_alive([p.pid for p in procs]), 5, f"{procs} to die")


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
