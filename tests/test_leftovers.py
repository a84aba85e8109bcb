"""A test run that is killed leaves nothing running.

An inner pytest run starts what the suite starts (a deployment: gunicorn with
4 workers and the embedded state server they start; an explicit state server;
a redis-server; a PostgreSQL server and its processes, each in a session of
its own; a state server the test process starts itself; a test's own
``Popen``), says so, and hangs; it is then SIGKILLed, as a CI timeout or
``kill -9`` would, with no teardown at all. Everything it started must be gone
soon after (shared_core.testing's watchdog). Run for one pairing: it checks
the harness, not the pairing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from shared_core.testing import (
    kill_and_wait,
    pids_alive,
    private_dir,
    run_processes,
    spawn,
    wait_for,
)
from tests.harness import ROOT, START_TIMEOUT, Pairing

INNER = textwrap.dedent(
    """
    import json, os, subprocess, sys, time, uuid
    from pathlib import Path

    import httpx
    import psutil

    from shared_core import SharedState
    from shared_core.testing import (
        PostgresServer, RedisServer, StateServer, private_dir, wait_for)
    from tests.harness import Pairing, start

    def test_start_everything_then_hang(tmp_path):
        d = start(Pairing.parse(os.environ["PAIRING"]), tmp_path)
        assert httpx.post(f"{d.url}/increment").status_code == 200
        embedded = wait_for(d.state_servers, 15, "the deployment's state server")
        own = SharedState(f"local://own{uuid.uuid4().hex[:8]}?linger=3600")
        own.incr("n")
        raw = subprocess.Popen(
            [sys.executable, "-m", "shared_core", "serve", "--url",
             f"unix://{private_dir('raw-')}/state.sock"])
        pids = {
            "app server": [d.proc.pid],
            "workers": [p.pid for p in psutil.Process(d.proc.pid).children()],
            "embedded state server": [p.pid for p in embedded],
            "explicit state server": [StateServer(private_dir("st-")).start().proc.pid],
            "redis-server": [RedisServer(private_dir("redis-")).start().proc.pid],
            "postgres": [
                p.pid for p in PostgresServer(Path(os.environ["POSTGRES_DIR"])).start().processes()
            ],
            "the test's own state server": [own.info()["pid"]],
            "the test's own Popen": [raw.pid],
        }
        ready = Path(os.environ["READY_FILE"])
        ready.with_suffix(".tmp").write_text(
            json.dumps({"marker": os.environ["SHARED_CORE_TEST_RUN"], "pids": pids}))
        ready.with_suffix(".tmp").rename(ready)
        time.sleep(600)
    """
)


@pytest.mark.only(framework="flask", server="gunicorn", worker="", engine="embedded")
def test_a_killed_run_leaves_nothing_running(pairing: Pairing, tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the inner run's rootdir, no settings
    ready = tmp_path / "ready.json"
    runtime = private_dir("kr-")
    # Not below ``runtime``: as root, PostgreSQL runs as another user, who
    # must get through the directories above its own.
    postgres_dir = private_dir("kp-")
    env = dict(
        os.environ,
        PAIRING=pairing.name,
        READY_FILE=str(ready),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        XDG_RUNTIME_DIR=str(runtime),
        XDG_STATE_HOME=str(runtime / "state"),
        POSTGRES_DIR=str(postgres_dir),
    )
    log = tmp_path / "inner.log"
    with open(log, "wb") as out:
        inner = spawn(
            [sys.executable, "-m", "pytest", "-p", "shared_core.testing",
             "-p", "no:cacheprovider", "-q", "test_inner.py"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    started: dict[str, list[int]] = {}
    marker = ""
    try:

        def is_ready() -> bool:
            assert inner.poll() is None, f"the inner run ended:\n{log.read_text()[-5000:]}"
            return ready.exists()

        wait_for(is_ready, START_TIMEOUT + 30, "the inner run to start everything")
        report = json.loads(ready.read_text())
        started, marker = report["pids"], report["marker"]
        everything = [pid for pids in started.values() for pid in pids]
        assert len(started["workers"]) == 4, started
        # PostgreSQL's postmaster forks short-lived children too (an autovacuum
        # worker, the backend of a readiness check) that may end by now.
        lasting = [
            p for what, pids in started.items() for p in (pids[:1] if what == "postgres" else pids)
        ]
        assert set(lasting) <= set(pids_alive(everything)), started

        os.kill(inner.pid, signal.SIGKILL)
        killed = time.monotonic()
        inner.wait()

        def left() -> dict[str, list[int]]:
            return {what: alive for what, pids in started.items() if (alive := pids_alive(pids))}

        try:
            wait_for(lambda: not left(), 15, "what the killed run started to end")
        except AssertionError:
            raise AssertionError(f"still running 15 s after the SIGKILL: {left()}") from None
        gone = time.monotonic() - killed
        assert run_processes(marker) == [], "processes of the killed run are left"
        print(f"everything the killed run started was gone {gone:.2f}s after its SIGKILL")
    finally:
        # Whatever happened above, leave nothing running.
        if inner.poll() is None:
            inner.kill()
            inner.wait()
        leftovers = run_processes(marker) if marker else []
        for pid in {pid for pids in started.values() for pid in pids_alive(pids)}:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftovers.append(psutil.Process(pid))
        kill_and_wait(leftovers)
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(postgres_dir, ignore_errors=True)
