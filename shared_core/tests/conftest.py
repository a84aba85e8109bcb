"""Fixtures: a private runtime directory, a unique app, and the state under test.

Every test gets its own ``XDG_RUNTIME_DIR`` and app name, so each starts its
own state server; they come from the plugin ``shared_core.testing`` (enabled in
``pyproject.toml``), which users enable in their own tests the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from shared_core import AsyncSharedState, SharedState
from shared_core.testing import (
    IsolatedState,
    PostgresServer,
    RedisServer,
    private_dir,
    state_servers,
)


def join_or_kill(procs: list[Any], timeout: float) -> None:
    """Join each of ``procs`` (``multiprocessing`` processes), waiting at most
    ``timeout`` seconds for each; kill those still running, so that a stuck
    child fails its test (exit code not 0) instead of outliving it."""
    for proc in procs:
        proc.join(timeout)
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)


def server_processes(app: str) -> list[psutil.Process]:
    """The live state-server processes of ``app``."""
    return state_servers(app)


@pytest.fixture
def runtime_dir(isolated_state: IsolatedState) -> Path:
    return isolated_state.runtime_dir


@pytest.fixture
def app(isolated_state: IsolatedState) -> str:
    """A fresh app name; its servers are killed at teardown (the exit rule
    itself is checked by its own tests)."""
    return isolated_state.app


@pytest.fixture(scope="session")
def redis_socket(redis_server: RedisServer) -> str:
    """A redis-server on a private Unix socket, for the whole session."""
    return str(redis_server.socket)


def redis_url(sock: str, app: str, **query: object) -> str:
    params = "".join(f"&{k}={v}" for k, v in query.items())
    return f"redis+unix://{sock}?app={app}{params}"


LOCK_LEASE = 2  # seconds, for the Redis engine in these tests


@pytest.fixture
def postgres_own() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, to kill, freeze or restart
    without stalling the others."""
    workdir = private_dir("po-")
    server = PostgresServer(workdir).start()
    try:
        yield server
    finally:
        for proc in server.processes():  # a test that froze it may have failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def unreachable(runtime_dir: Path) -> str:
    """A state URL with nobody listening, given up on quickly."""
    return f"unix://{runtime_dir}/nobody/state.sock?connect_timeout=0.5"


@pytest.fixture
def anyio_backend() -> str:
    """The async tests of the integrations run on asyncio."""
    return "asyncio"


@pytest.fixture
def manager_url(app: str) -> str:
    """A URL of the embedded manager engine, for tests of its own lifecycle."""
    return f"local://{app}?linger=1"


ENGINES = ["manager", "redis", "postgres"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def engine_url(engine: str, app: str, request: pytest.FixtureRequest, **query: object) -> str:
    """A URL of ``engine`` for ``app``: the embedded server, the session's
    redis-server or the session's PostgreSQL."""
    if engine == "manager":
        # The server outlives short idle gaps on a loaded machine; it is killed
        # at teardown (the exit rule has tests of its own, with manager_url).
        return f"local://{app}?" + "&".join(f"{k}={v}" for k, v in {"linger": 10, **query}.items())
    if engine == "redis":
        sock = request.getfixturevalue("redis_socket")
        return redis_url(sock, app, **{"lock_lease": LOCK_LEASE, **query})
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.url(app, **query)


@pytest.fixture
def url(engine: str, app: str, request: pytest.FixtureRequest) -> str:
    """A URL of each engine in turn: the contract is the same on all three."""
    return engine_url(engine, app, request)


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
