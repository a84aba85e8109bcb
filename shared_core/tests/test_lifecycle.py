"""When the server starts, how it leaves, and what clients see meanwhile."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import redis_url, server_processes
from shared_core import SharedState, StateUnavailable
from shared_core.testing import RedisServer, StateServer, kill_and_wait, pids_alive, wait_for


@pytest.fixture
def serve(runtime_dir: Path) -> Iterator[StateServer]:
    """An explicit ``shared-core serve`` on a Unix socket, not started yet
    (``.start()`` at will); killed at teardown."""
    server = StateServer(runtime_dir / "explicit", connect_timeout=1)
    yield server
    server.kill()


def _fails_in_bounded_time(state: SharedState) -> None:
    """With its server gone, a write and a read raise StateUnavailable, in bounded time."""
    started = time.monotonic()
    with pytest.raises(StateUnavailable):
        state.incr("n")
    with pytest.raises(StateUnavailable):
        state.get("n")
    assert time.monotonic() - started < 4, "connect_timeout is 1 s: fail in bounded time"


def test_server_exits_after_the_last_client_leaves(app: str) -> None:
    state = SharedState(f"local://{app}?linger=1")
    state.incr("n")
    (server,) = server_processes(app)
    time.sleep(1.5)
    assert server.is_running(), "it must stay while a client is connected"
    state.close()
    left = time.monotonic()
    wait_for(lambda: not pids_alive([server.pid]), 5, "the idle server to exit")
    assert time.monotonic() - left < 3


MASTER = textwrap.dedent(
    """
    import subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
    worker.wait()
    sys.stdin.read()  # the "master" lives on until the test closes stdin
    """
)
WORKER = textwrap.dedent(
    """
    import sys, time
    from shared_core import SharedState
    state = SharedState(sys.argv[1])
    state.incr("n")
    print(state.info()["pid"], flush=True)
    time.sleep(3600)
    """
)


def test_server_outlives_workers_and_leaves_with_their_master(app: str) -> None:
    url = f"local://{app}?linger=60"
    # A plain Popen, not spawn(): the test drives this stand-in master through
    # its stdin, which spawn() does not pipe; it is no server, and a killed run
    # still ends it and its worker (they inherit the run's marker).
    master = subprocess.Popen(
        [sys.executable, "-c", MASTER, WORKER, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert master.stdout is not None
    assert master.stdin is not None
    server_pid = int(master.stdout.readline())
    (worker,) = psutil.Process(master.pid).children()
    worker.kill()  # the only client dies; the master lives
    time.sleep(1.0)
    assert pids_alive([server_pid]), "the server must outlive a killed worker"
    assert SharedState(url).get("n") == 1
    master.stdin.close()
    master.wait(10)
    master.stdout.close()
    gone = time.monotonic()
    wait_for(lambda: not pids_alive([server_pid]), 5, "the server to leave with the master")
    assert time.monotonic() - gone < 2, "linger is 60 s: the master's exit must end it"


def test_a_sigkilled_local_server_is_replaced_on_the_next_call(app: str) -> None:
    state = SharedState(f"local://{app}?linger=1")
    assert state.incr("n") == 1
    (old,) = server_processes(app)
    kill_and_wait([old])
    # The request fails to send on the dead socket, so it is safe to resend:
    # a new server starts. The state died with the old one.
    assert state.incr("n") == 1
    (new,) = server_processes(app)
    assert new.pid != old.pid


def test_explicit_server_gone_raises_then_recovers(serve: StateServer) -> None:
    state = SharedState(serve.start().url)
    assert state.incr("n") == 1
    serve.kill()
    _fails_in_bounded_time(state)
    serve.start()
    assert state.incr("n") == 1


def test_explicit_server_does_not_exit_when_idle(serve: StateServer) -> None:
    server = serve.start().proc
    assert server is not None
    with SharedState(serve.url) as state:
        state.set("k", "v")
    time.sleep(1.5)
    assert server.poll() is None
    assert SharedState(serve.url).get("k") == "v"
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert not serve.socket.exists(), "socket removed on exit"


def test_run_launcher_serves_the_command_and_stops_with_it(app: str, runtime_dir: Path) -> None:
    code = "from shared_core import SharedState; print(SharedState().incr('n'))"
    out = subprocess.run(
        [sys.executable, "-m", "shared_core", "run", "--app", app, "--",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert server_processes(app) == []


def test_info_command_prints_the_server_report(serve: StateServer) -> None:
    server = serve.start().proc
    assert server is not None
    out = subprocess.run(
        [sys.executable, "-m", "shared_core", "info", "--url", serve.url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f'"pid": {server.pid}' in out.stdout


def test_redis_gone_raises_then_recovers(runtime_dir: Path, app: str) -> None:
    redis = RedisServer(runtime_dir).start()
    state = SharedState(redis_url(str(redis.socket), app, connect_timeout=1))
    try:
        assert state.incr("n") == 1
        redis.kill()
        _fails_in_bounded_time(state)
        redis.start()
        assert state.incr("n") == 1  # a Redis without persistence starts empty
    finally:
        redis.stop()
