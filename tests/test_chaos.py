"""Fault injection: kill workers, the state server and lock holders under load.

Run by ``tox -e chaos`` (every pairing; CI a representative subset). Each
scenario adds a row to the table printed at the end: what was injected, how
many requests were sent and acknowledged (HTTP 200), what the state counted,
and how many acknowledged increments were lost (must be 0).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from shared_core.testing import PostgresServer, RedisServer, session_processes, wait_for
from tests.harness import (
    CHAOS_ROWS,
    ENGINES,
    Deployment,
    EngineServer,
    Outcome,
    Pairing,
    final_count,
    get,
    hammer,
    post,
    send,
    state_servers,
)

pytestmark = pytest.mark.chaos

CLIENTS = 100


def record(scenario: str, pairing: Pairing, faults: str, outcome: Outcome, counted: int) -> int:
    """Add a table row; return how many acknowledged increments were lost."""
    acked = [body["count"] for body in outcome.ok if "count" in body]
    sent = len(outcome.replies) + len(outcome.errors)
    # Numbers are handed out once each; an acknowledged one above the final
    # count, or one handed out twice, is an acknowledged increment lost.
    lost = len(acked) - len({n for n in acked if n <= counted})
    CHAOS_ROWS.append(
        {
            "scenario": scenario,
            "pairing": pairing.name,
            "faults": faults,
            "sent": sent,
            "acknowledged": len(acked),
            "counted": counted,
            "lost": lost,
        }
    )
    return lost


def workers(d: Deployment) -> list[psutil.Process]:
    """The app server's live worker processes (not helpers such as a resource tracker)."""
    found = []
    for p in psutil.Process(d.proc.pid).children():
        try:  # a worker may be dying or dead (a zombie) meanwhile
            if p.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(p.cmdline()):
                continue
        except psutil.Error:
            continue
        found.append(p)
    return found


def stop_and_check_clean(d: Deployment) -> None:
    """Scenario 8: after the app server stops, neither it nor a state server remains."""
    d.stop()
    d.wait_for_state_servers_to_leave()
    # spawn() put the app server in a session of its own, its workers with it;
    # a zombie has let go of everything (init reaps it in a moment).
    wait_for(
        lambda: not session_processes(d.proc.pid),
        10,
        f"the app server's processes to end: {session_processes(d.proc.pid)}",
    )


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    """Send ``sig`` to each of ``procs`` that is still there."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


@pytest.fixture
def engine_for_chaos(pairing: Pairing) -> Iterator[EngineServer]:
    """The pairing's external engine, a server of its own to kill at will:
    a durable redis-server (appendfsync always), or PostgreSQL (which keeps
    what it committed through a crash of the server)."""
    workdir = Path(tempfile.mkdtemp(prefix="ce-"))
    server: EngineServer
    if pairing.engine == "redis":
        server = RedisServer(workdir, durable=True)
    else:
        server = PostgresServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def chaos_url(pairing: Pairing, request: pytest.FixtureRequest, **query: Any) -> str | None:
    """The state URL of a chaos deployment: the embedded default (with the
    options ``query``), or the external engine's server of the test
    (``engine_for_chaos``), where ``query`` means nothing."""
    if not pairing.external:
        if not query:
            return None
        return "local://chaos?" + "&".join(f"{k}={v}" for k, v in query.items())
    server: EngineServer = request.getfixturevalue("engine_for_chaos")
    if isinstance(server, RedisServer):
        return server.url("chaos", lock_lease=2)
    return server.url("chaos")


# 1 -------------------------------------------------------------------------


def test_worker_sigkill_under_load(
    launch: Any, pairing: Pairing, request: pytest.FixtureRequest
) -> None:
    total = 2500
    if pairing.server == "hypercorn":
        # hypercorn stops the whole server when a worker exits non-zero (by
        # design), so a SIGKILL cannot be survived there: recycle instead.
        d = launch(state_url=chaos_url(pairing, request), max_requests=30)
        outcome = hammer(d.url, "/increment", total, CLIENTS)
        faults = f"recycling, {len(outcome.pids) - 4}+ new workers"
    else:
        d = launch(state_url=chaos_url(pairing, request))
        kills: list[int] = []
        stop = threading.Event()
        # granian takes a worker that dies within 5.5 s of being respawned for
        # a crash loop, and exits: there, only the first workers are killed.
        first = {p.pid for p in workers(d)}

        def killer() -> None:
            while len(kills) < 4 and not stop.wait(0.4):
                alive = workers(d)
                if pairing.server == "granian":
                    alive = [p for p in alive if p.pid in first and p.pid not in kills]
                if alive:
                    victim = random.choice(alive)
                    with contextlib.suppress(psutil.NoSuchProcess):
                        victim.send_signal(signal.SIGKILL)
                        kills.append(victim.pid)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            outcome = hammer(d.url, "/increment", total, CLIENTS)
        finally:
            stop.set()
            thread.join()
        assert len(kills) >= 3, f"only {len(kills)} workers were killed during the load"
        faults = f"{len(kills)} workers SIGKILLed"
    statuses = Counter(s for s, _ in outcome.replies)
    assert set(statuses) <= {200}, d.explain(outcome.beyond({200}))
    counted = final_count(d)
    acked = [b["count"] for b in outcome.ok]
    assert len(acked) == len(set(acked)), "a number was handed out twice"
    assert len(acked) <= counted <= total, (len(acked), counted)
    assert record("worker SIGKILL under load", pairing, faults, outcome, counted) == 0
    stop_and_check_clean(d)


# 2 -------------------------------------------------------------------------


# At 40 requests per worker life, about 60 workers start and stop.
STORM = 2500
LIFE = 40


def test_recycling_storm(launch: Any, pairing: Pairing, request: pytest.FixtureRequest) -> None:
    d = launch(state_url=chaos_url(pairing, request), max_requests=LIFE)
    # On a SIGHUP granian replaces its workers one by one, 1 s apart
    # (Deployment.recycling): over 10 s, about 10 of them.
    spread = 10.0 if pairing.server == "granian" else 0.0
    with d.recycling():
        outcome = hammer(d.url, "/increment", STORM, CLIENTS, resend_dropped=True, spread=spread)
    counted = final_count(d)
    acked = sorted(b["count"] for b in outcome.ok)
    assert len(acked) == STORM, d.explain(f"errors: {outcome.errors[:3]}")
    assert len(set(acked)) == STORM
    if pairing.server == "hypercorn":
        # See test_worker_recycling_keeps_the_count_exact: hypercorn may drop
        # the response of a request it ran; each extra count is such a one.
        assert STORM <= counted <= STORM + len(outcome.errors)
    else:
        assert acked == list(range(1, STORM + 1))
        assert counted == STORM
    recycled_by = "SIGHUP" if pairing.server == "granian" else f"max-requests {LIFE}"
    faults = f"{recycled_by}: {len(outcome.pids)} workers in all"
    assert record("recycling storm", pairing, faults, outcome, counted) == 0
    stop_and_check_clean(d)


# 3 -------------------------------------------------------------------------


def test_state_server_sigkill(
    launch: Any, pairing: Pairing, request: pytest.FixtureRequest
) -> None:
    # Every write in the log before its reply: the embedded engine with
    # fsync=always, Redis with appendonly and appendfsync always, PostgreSQL
    # with its WAL written at each commit.
    url = chaos_url(pairing, request, persist=1, fsync="always")
    d = launch(state_url=url)
    before = hammer(d.url, "/increment", 500, 50)
    assert len(before.ok) == 500, d.explain(str(before.errors[:3]))
    # The kill lands while 100 clients are sending increments.
    loads: list[Outcome] = []
    load = threading.Thread(
        target=lambda: loads.append(hammer(d.url, "/increment", 1500, CLIENTS)), daemon=True
    )
    started = time.monotonic()
    load.start()
    time.sleep(0.5)
    if pairing.external:
        # Killed with all its processes, and restarted 1 s later (PostgreSQL
        # recovers from its WAL), on the same socket.
        engine: EngineServer = request.getfixturevalue("engine_for_chaos")
        engine.kill()
        restart = threading.Timer(1.0, engine.start)
        restart.start()
    else:
        (server,) = state_servers(d.runtime_dir)
        server.kill()
    killed_at = time.monotonic() - started
    load.join(60)
    took = time.monotonic() - started
    assert loads, "1500 requests did not finish within 60 s: something hung"
    (during,) = loads
    if pairing.external:
        restart.join()
    statuses = Counter(s for s, _ in during.replies)
    # Only answers that say what happened: 200, or 503 while it is away.
    assert set(statuses) <= {200, 503}, d.explain(during.beyond({200, 503}))
    assert not during.errors, during.errors[:3]
    assert statuses[200] + statuses[503] == 1500, statuses
    after = hammer(d.url, "/increment", 50, 10)
    assert {s for s, _ in after.replies} == {200}, d.explain(str(after.replies[:3]))
    counted = final_count(d)
    outcome = Outcome(before.replies + during.replies + after.replies, [])
    acked = len(outcome.ok)
    attempted = 500 + 1500 + 50
    # Jepsen's counter rule: acknowledged <= final <= attempted.
    assert acked <= counted <= attempted, f"{acked} acknowledged, {counted} counted"
    victim = ENGINES.get(pairing.engine, "state server")
    faults = f"{victim} SIGKILLed at {killed_at:.1f}s of {took:.1f}s under {CLIENTS} clients"
    faults += ", restarted" if pairing.external else ", replaced"
    assert record("state server SIGKILL", pairing, faults, outcome, counted) == 0
    print(f"{pairing.name}: {statuses[503]} of 1500 requests got 503 while it was away")
    stop_and_check_clean(d)


# 4 -------------------------------------------------------------------------


def test_startup_race_of_16_workers(
    launch: Any, pairing: Pairing, request: pytest.FixtureRequest
) -> None:
    d = launch(state_url=chaos_url(pairing, request), workers=16)
    outcome = hammer(d.url, "/increment", 400, 50)
    servers = state_servers(d.runtime_dir)
    assert len(servers) == (0 if pairing.external else 1), f"state servers: {servers}"
    counted = final_count(d)
    assert sorted(b["count"] for b in outcome.ok) == list(range(1, 401))
    faults = f"16 workers at once, {len(servers)} state server"
    assert record("startup race", pairing, faults, outcome, counted) == 0
    stop_and_check_clean(d)


# 5 -------------------------------------------------------------------------


def test_lock_holder_death(launch: Any, pairing: Pairing, explicit_state: Any) -> None:
    # The state lives outside the app server, so that it outlives hypercorn,
    # which stops altogether when one of its workers dies.
    url = explicit_state.url
    if pairing.engine == "redis":
        url += "&lock_lease=2"
    d = launch(state_url=url)
    holder_request = threading.Thread(
        target=lambda: _quietly(lambda: post(f"{d.url}/jobs/report?seconds=30", timeout=60))
    )
    previous = get(f"{d.url}/jobs/report").json()["holder"]
    holder_request.start()
    holder = wait_for(
        lambda: (h := get(f"{d.url}/jobs/report").json()["holder"]) != previous and h,
        10,
        "the job to start",
    )
    busy = post(f"{d.url}/jobs/report?seconds=0")
    assert busy.status_code == 409, busy.text
    os.kill(holder, signal.SIGKILL)
    killed = time.monotonic()
    if pairing.server == "hypercorn":
        d.proc.wait(30)  # it shuts down; a new deployment takes over the state
        d = launch(state_url=url)

    def job_ran() -> bool:
        try:
            return post(f"{d.url}/jobs/report?seconds=0", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(job_ran, 15, "the lock of the killed holder to be freed")
    waited = time.monotonic() - killed
    holder_request.join(60)
    if pairing.engine == "redis":
        assert waited < 2 + 1.5, f"freed {waited:.2f}s after the holder died (lease 2 s)"
    elif pairing.server != "hypercorn":
        # The embedded engine frees it when the holder's connection drops; so
        # does PostgreSQL (a session advisory lock): no lease to wait for.
        assert waited < 1.0, f"freed {waited:.2f}s after the holder died"
    CHAOS_ROWS.append(
        {
            "scenario": "lock holder SIGKILL",
            "pairing": pairing.name,
            "faults": f"holder killed, lock free after {waited:.2f}s",
            "sent": "-",
            "acknowledged": "-",
            "counted": "-",
            "lost": 0,
        }
    )


def _quietly(fn: Any) -> None:
    with contextlib.suppress(httpx.TransportError):
        fn()


# 6 -------------------------------------------------------------------------

MALFORMED = [
    ("GET", "/increment?key=%ZZ"),
    ("GET", "/increment?by=%00"),
    ("GET", "/increment?by="),
    ("GET", "/increment?by=1e3"),
    ("GET", "/increment?by=0x10"),
    ("GET", "/increment?by=99999999999999999999999"),
    ("GET", "/increment?by=-0"),
    ("GET", "/increment?key=a/b"),
    ("GET", "/increment?key=%E2%98%83"),
    ("POST", "/jobs/report?seconds=31"),
    ("POST", "/jobs/report?seconds=-1"),
    ("DELETE", "/reset"),
    ("PUT", "/increment"),
    ("PATCH", "/broadcast/reload"),
]


def test_bad_input_is_refused_and_changes_nothing(launch: Any, pairing: Pairing) -> None:
    d = launch()
    before = get(f"{d.url}/report").json()["count"]
    refused = 0
    for method, path in MALFORMED:
        r = send(method, d.url + path, timeout=30)
        assert 400 <= r.status_code < 500, f"{method} {path}: {r.status_code} {r.text[:200]}"
        assert r.json()["error"], f"{method} {path}: no error message"
        refused += 1
    # A 10 kB request line: gunicorn refuses it itself (414, its own page);
    # uvicorn, hypercorn and granian hand it to the app, which refuses it (4xx, JSON).
    long_line = get(f"{d.url}/increment?key={'k' * 10_000}", timeout=30)
    assert 400 <= long_line.status_code < 500, long_line.text[:200]
    huge = post(f"{d.url}/increment", content=b"x" * 5_000_000, timeout=30)
    assert huge.status_code == 413
    assert get(f"{d.url}/report").json()["count"] == before
    CHAOS_ROWS.append(
        {
            "scenario": "bad input",
            "pairing": pairing.name,
            "faults": f"{refused + 2} malformed requests, all 4xx",
            "sent": refused + 2,
            "acknowledged": 0,
            "counted": before,
            "lost": 0,
        }
    )
    stop_and_check_clean(d)


@pytest.mark.only(framework="fastapi")  # the one that serves an OpenAPI schema
def test_fastapi_schema_fuzzing(launch: Any, pairing: Pairing, tmp_path: Path) -> None:
    d = launch()
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{d.url}/openapi.json",
        "--checks", "all", "--max-examples", "25",
        # The job sleeps for up to 30 s by design: its bounds are checked above.
        "--exclude-path", "/jobs/report",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    # In tmp_path, so that schemathesis's cache (.schemathesis/) stays out of the tree.
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, f"schemathesis found problems:\n{run.stdout[-8000:]}"
    CHAOS_ROWS.append(
        {
            "scenario": "schema fuzzing (schemathesis)",
            "pairing": pairing.name,
            "faults": "generated requests, all checks",
            "sent": "-",
            "acknowledged": "-",
            "counted": "-",
            "lost": 0,
        }
    )
    stop_and_check_clean(d)


# 7 -------------------------------------------------------------------------


@pytest.mark.only(engine="embedded")  # Redis and PostgreSQL have their own access control
def test_security_of_the_embedded_state(launch: Any, pairing: Pairing) -> None:
    d = launch()
    assert post(f"{d.url}/increment").status_code == 200
    state_dir = d.runtime_dir / "shared_core" / pairing.app_name
    sock = state_dir / "state.sock"
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with pytest.raises(AuthenticationError):
        Client(str(sock), family="AF_UNIX", authkey=b"guessed")
    # Another user cannot even reach the socket.
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        f"try: s.connect({str(sock)!r})\n"
        "except PermissionError: sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    as_nobody = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         "/usr/bin/python3", "-c", probe],
        capture_output=True, text=True,
    )  # fmt: skip
    assert as_nobody.returncode == 0, f"nobody reached the socket: {as_nobody.stderr}"
    authkey = (state_dir / "authkey").read_text()
    secret = _secret_key(d)
    report = get(f"{d.url}/report").text
    logs = d.output() + (state_dir / "server.log").read_text()
    for name, value in (("authkey", authkey), ("SECRET_KEY", secret)):
        assert value not in report, f"the {name} is in /report"
        assert value not in logs, f"the {name} is in the logs"
    CHAOS_ROWS.append(
        {
            "scenario": "security",
            "pairing": pairing.name,
            "faults": "wrong key, user nobody: refused",
            "sent": 1,
            "acknowledged": 1,
            "counted": 1,
            "lost": 0,
        }
    )
    stop_and_check_clean(d)


def _secret_key(d: Deployment) -> str:
    from shared_core import SharedState

    # The deployment's own server, by its socket; its key file lies beside it.
    state_dir = d.runtime_dir / "shared_core" / d.pairing.app_name
    return SharedState(f"unix://{state_dir}/state.sock").secret("SECRET_KEY")


# 9 -------------------------------------------------------------------------

FREEZE = 7.0  # seconds: longer than a call's default bound (op_timeout, 5 s)
# connect_timeout + op_timeout (5 + 5 s by default), plus scheduling slack.
CALL_BOUND = 12.0


def test_state_server_frozen_under_load(
    launch: Any, pairing: Pairing, request: pytest.FixtureRequest
) -> None:
    """SIGSTOP the state server (as a stall, a swapped-out machine or a
    debugger would) for longer than a call may wait, under 100 clients."""
    d = launch(state_url=chaos_url(pairing, request))
    before = hammer(d.url, "/increment", 300, 50)
    assert len(before.ok) == 300, d.explain(str(before.errors[:3]))
    frozen: list[psutil.Process]
    if pairing.external:
        engine: EngineServer = request.getfixturevalue("engine_for_chaos")
        assert engine.proc is not None
        # PostgreSQL's backends serve their connections by themselves: all of them.
        if isinstance(engine, PostgresServer):
            os.kill(engine.proc.pid, signal.SIGSTOP)  # so that it forks none meanwhile
            frozen = engine.processes()
        else:
            frozen = [psutil.Process(engine.proc.pid)]
    else:
        frozen = state_servers(d.runtime_dir)
        assert len(frozen) == 1, f"state servers: {frozen}"
    signal_all(frozen, signal.SIGSTOP)
    thaw = threading.Timer(FREEZE, signal_all, (frozen, signal.SIGCONT))
    thaw.start()
    try:
        during = hammer(d.url, "/increment", 200, CLIENTS)
    finally:
        thaw.cancel()
        signal_all(frozen, signal.SIGCONT)
    statuses = Counter(s for s, _ in during.replies)
    # Only answers that say what happened: 200, or 503 while it is frozen.
    assert set(statuses) <= {200, 503}, d.explain(during.beyond({200, 503}))
    assert statuses[503], f"nothing noticed a {FREEZE:g}s freeze: {statuses}"
    assert not during.errors, during.errors[:3]
    # A sync worker serves one request at a time, so there a request may also
    # wait in the queue behind others for as long as the freeze lasts
    # (granian runs a WSGI app on a pool of threads).
    one_at_a_time = pairing.framework == "flask" and not pairing.worker
    one_at_a_time &= pairing.server != "granian"
    bound = CALL_BOUND + (FREEZE if one_at_a_time else 0)
    assert during.slowest < bound, d.explain(
        f"a request took {during.slowest:.1f}s; the bound is {bound:g}s"
    )
    after = hammer(d.url, "/increment", 100, 20)
    assert {s for s, _ in after.replies} == {200}, d.explain(str(after.replies[:3]))
    counted = final_count(d)
    outcome = Outcome(before.replies + during.replies + after.replies, [])
    victim = ENGINES.get(pairing.engine, "state server")
    faults = f"{victim} SIGSTOPped {FREEZE:g}s; slowest request {during.slowest:.1f}s"
    assert record("state server frozen", pairing, faults, outcome, counted) == 0
    print(
        f"{pairing.name}: {statuses[503]} of 200 requests got 503 while frozen, "
        f"slowest {during.slowest:.1f}s"
    )
    stop_and_check_clean(d)
