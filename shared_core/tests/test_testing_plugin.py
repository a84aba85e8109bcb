"""The plugin's own safety net: what a dead test run left running is ended, and
nothing else. (That a killed run takes its servers along is tests/test_leftovers.py.)"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from shared_core import testing
from shared_core.testing import RUN_VARIABLE, kill_and_wait, pids_alive, spawn, wait_for

# What the runs below "started": sleepers, each with an environment of its own.
Sleeper = subprocess.Popen[bytes]


@pytest.fixture
def sleepers() -> Iterator[list[Sleeper]]:
    started: list[Sleeper] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def sleeper(started: list[Sleeper], env: dict[str, str], new_session: bool = False) -> Sleeper:
    proc = subprocess.Popen(["sleep", "120"], env=env, start_new_session=new_session)
    started.append(proc)
    return proc


def a_gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_sweep_ends_what_dead_runs_of_the_checkout_left_and_nothing_else(
    tmp_path: Path, sleepers: list[Sleeper]
) -> None:
    checkout, elsewhere = str(tmp_path / "checkout"), str(tmp_path / "other")
    started = testing._start_time(os.getpid())
    assert started is not None
    dead = testing._Run(a_gone_pid(), started, checkout)
    alive = testing._Run(os.getpid(), started, checkout)
    dead_elsewhere = testing._Run(dead.pid, dead.started, elsewhere)

    marked = sleeper(sleepers, {RUN_VARIABLE: dead.marker})
    # A server that wrote its process title over its environment (redis-server
    # does): found only through the session spawn() registered.
    blanked = sleeper(sleepers, {}, new_session=True)
    dead.register(blanked.pid)
    in_its_session = sleeper(sleepers, {RUN_VARIABLE: "a marker of its own"}, new_session=True)
    dead.register(in_its_session.pid)
    spared = [
        sleeper(sleepers, {RUN_VARIABLE: alive.marker}),  # a run still going
        sleeper(sleepers, {RUN_VARIABLE: dead_elsewhere.marker}),  # another checkout
        sleeper(sleepers, {}),  # nobody's
    ]

    ended = testing._sweep(checkout)

    gone = [marked.pid, blanked.pid, in_its_session.pid]
    assert sorted(int(line.split()[0]) for line in ended) == sorted(gone), ended
    assert not pids_alive(gone)
    assert pids_alive([p.pid for p in spared]) == [p.pid for p in spared]
    assert dead.registry is not None
    assert not dead.registry.exists(), "the registry of a swept run is removed"


def test_a_session_whose_pid_was_reused_is_not_ours(
    tmp_path: Path, sleepers: list[Sleeper]
) -> None:
    run = testing._Run(a_gone_pid(), 0.0, str(tmp_path))
    other = sleeper(sleepers, {}, new_session=True)
    assert testing._registry_dir(run.checkout, create=True) is not None
    assert run.registry is not None
    # Registered with another start time: the pid is now someone else's session.
    run.registry.write_text(f"{other.pid} 1.00\n")
    assert testing.run_processes(run.marker) == []
    assert testing._reap(run) == []  # which removes its registry
    assert other.poll() is None


def test_spawn_starts_a_marked_registered_session(sleepers: list[Sleeper]) -> None:
    proc = spawn(["sleep", "120"])
    sleepers.append(proc)
    run = testing._current_run()
    assert run is not None
    assert os.getsid(proc.pid) == proc.pid
    # Popen returns once exec is under way: until the new program's memory is
    # set up, /proc/PID/environ reads empty (seen under load).
    env = wait_for(lambda: psutil.Process(proc.pid).environ(), 5, "sleep's environment")
    assert env[RUN_VARIABLE] == run.marker
    assert os.environ[RUN_VARIABLE] == run.marker, "pytest's own children get it too"
    assert run.sessions().get(proc.pid) is True
    assert proc.pid in [p.pid for p in testing.run_processes(run.marker)]


OWNER = """
import subprocess, sys, time
from shared_core.testing import spawn
servers = [spawn(["sleep", "120"]), spawn(["sh", "-c", "sleep 120 & sleep 120 & wait"])]
print(*(s.pid for s in servers), flush=True)
time.sleep(120)
"""


def test_what_spawn_started_ends_with_its_killed_owner(
    sleepers: list[Sleeper], tmp_path: Path
) -> None:
    """spawn() without pytest: its own watchdog ends the servers, and what they forked."""
    # The owner's watchdog reports there what it killed. In a checkout of its
    # own (its cwd): no sweep of another session ends what it leaves.
    with open(tmp_path / "stderr", "wb") as stderr:
        owner = subprocess.Popen(
            [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, stderr=stderr, cwd=tmp_path
        )
    sleepers.append(owner)
    assert owner.stdout is not None
    leaders = [int(pid) for pid in owner.stdout.readline().split()]
    owner.stdout.close()
    wait_for(lambda: len(psutil.Process(leaders[1]).children()) == 2, 10, "sh to fork")
    started = [*leaders, *(p.pid for p in psutil.Process(leaders[1]).children())]
    owner.kill()
    owner.wait()
    try:
        wait_for(lambda: not pids_alive(started), 10, "the killed owner's servers to end")
    finally:
        left = []
        for pid in pids_alive(started):
            with contextlib.suppress(psutil.NoSuchProcess):
                left.append(psutil.Process(pid))
        kill_and_wait(left)


STUCK = """
import threading, time

def test_leaves_a_thread_that_never_ends():
    threading.Thread(target=time.sleep, args=(3600,), name="never-ends").start()
"""


@pytest.mark.parametrize("limit", ["2", "0"])
def test_a_run_that_cannot_exit_is_ended_with_its_stacks(tmp_path: Path, limit: str) -> None:
    """Tests over, a non-daemon thread left: the process exits 1 with every stack, unless 0."""
    (tmp_path / "test_stuck.py").write_text(STUCK)
    env = {k: v for k, v in os.environ.items() if k != RUN_VARIABLE}
    env[testing.EXIT_LIMIT_VARIABLE] = limit
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "shared_core.testing", "-p", "no:cacheprovider",
         "-q", "test_stuck.py"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = run.communicate(timeout=60 if limit != "0" else 8)
    except subprocess.TimeoutExpired:
        assert limit == "0", "the run must end within its exit limit"
        run.kill()
        run.communicate()
        return
    assert limit != "0", "with no limit the stuck run must go on"
    text = out.decode()
    assert run.returncode == 1, text
    assert "1 passed" in text
    assert "Timeout (0:00:02)!" in text
    # Both stacks: the main thread waiting for the other at interpreter exit.
    assert text.count("Thread 0x") == 2, text
    assert "in _shutdown" in text, text


def test_a_bad_exit_limit_stops_the_run_before_its_tests(tmp_path: Path) -> None:
    (tmp_path / "test_stuck.py").write_text(STUCK)
    env = {k: v for k, v in os.environ.items() if k != RUN_VARIABLE}
    env[testing.EXIT_LIMIT_VARIABLE] = "two"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "shared_core.testing", "-p", "no:cacheprovider",
         "-q", "test_stuck.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "SHARED_CORE_TEST_EXIT_LIMIT='two': not a number" in done.stderr
    assert "passed" not in done.stdout
