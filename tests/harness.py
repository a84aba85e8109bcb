"""The integration suite's harness: pairings, deployments, load, process discovery.

A pairing is ``FRAMEWORK-SERVER[-WORKER][-ENGINE]``: a reference app served
by one server with 4 workers, on the embedded state or on a real external
engine the tests start, ``-redis`` (a redis-server) or ``-postgres`` (a
PostgreSQL server). ``PAIRINGS`` is the one list of them: tox.ini's env_list,
the CI workflow, the benchmarks and the table in docs/testing.md are checked
against it (tests/test_matrix.py). ``python -m tests.harness`` prints that table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from shared_core import testing
from shared_core.testing import (
    PostgresServer,
    RedisServer,
    StateServer,
    free_port,
    spawn,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
APPS = {
    "flask": ("flask_counter", "flask_counter.wsgi:app"),
    "quart": ("quart_counter", "quart_counter.asgi:app"),
    "fastapi": ("fastapi_counter", "fastapi_counter.main:app"),
}
FRAMEWORKS = {"flask": "Flask", "quart": "Quart", "fastapi": "FastAPI"}
SERVERS = ("gunicorn", "hypercorn", "uvicorn", "granian")
# gunicorn's worker class per factor; without one, what the app's gunicorn.conf.py says.
GUNICORN_WORKERS = {"gthread": ["-k", "gthread", "--threads", "4"], "asgi": ["-k", "asgi"]}
# The state's engine per factor: the embedded default has none.
ENGINES = {"redis": "Redis", "postgres": "PostgreSQL"}
WORKERS = 4
START_TIMEOUT = 60.0

PAIRINGS = [
    "flask-gunicorn", "flask-gunicorn-gthread", "flask-hypercorn", "flask-granian",
    "quart-hypercorn", "quart-uvicorn", "quart-gunicorn", "quart-gunicorn-asgi",
    "quart-granian",
    "fastapi-uvicorn", "fastapi-hypercorn", "fastapi-gunicorn", "fastapi-gunicorn-asgi",
    "fastapi-granian",
    "flask-gunicorn-redis", "quart-hypercorn-redis", "fastapi-uvicorn-redis",
    "fastapi-granian-redis",
    "flask-gunicorn-postgres", "quart-hypercorn-postgres", "fastapi-uvicorn-postgres",
]  # fmt: skip


class PairingError(ValueError):
    """A pairing name that does not say FRAMEWORK-SERVER[-WORKER][-ENGINE]."""


@dataclass(frozen=True)
class Pairing:
    framework: str
    server: str
    worker: str = ""  # a gunicorn worker class of GUNICORN_WORKERS, or the default
    engine: str = "embedded"  # or one of ENGINES, a server the tests start

    @classmethod
    def parse(cls, name: str) -> Pairing:
        factors = name.split("-")
        framework = factors[0]
        server = factors[1] if len(factors) > 1 else ""
        if framework not in APPS or server not in SERVERS:
            raise PairingError(
                f"pairing {name!r}: expected FRAMEWORK-SERVER with FRAMEWORK in "
                f"{sorted(APPS)} and SERVER in {SERVERS}"
            )
        extra = factors[2:]
        engine = extra[-1] if extra and extra[-1] in ENGINES else "embedded"
        worker = extra[0] if extra and extra[0] not in ENGINES else ""
        if len(extra) != bool(worker) + (engine in ENGINES) or (worker and server != "gunicorn"):
            raise PairingError(f"pairing {name!r}: unknown factors {extra}")
        if worker not in ("", *GUNICORN_WORKERS):
            raise PairingError(f"pairing {name!r}: gunicorn worker {worker!r} is not one of ours")
        return cls(framework, server, worker, engine)

    @property
    def name(self) -> str:
        extra = f"-{self.worker}" if self.worker else ""
        if self.engine in ENGINES:
            extra += f"-{self.engine}"
        return f"{self.framework}-{self.server}{extra}"

    @property
    def external(self) -> bool:
        """Whether the state is in an engine of its own (Redis, PostgreSQL),
        which no app server starts nor stops."""
        return self.engine != "embedded"

    def __str__(self) -> str:
        return self.name

    @property
    def app_name(self) -> str:
        """The app's package, which is also its APP_NAME (its state's name)."""
        return APPS[self.framework][0]

    @property
    def app_dir(self) -> Path:
        return ROOT / "apps" / self.app_name

    @property
    def server_label(self) -> str:
        """How docs/testing.md names the server and its workers."""
        if self.server == "gunicorn":
            if self.worker == "gthread":
                return "gunicorn, gthread (4 threads)"
            if self.worker == "asgi":
                return "gunicorn, its own ASGI worker (`-k asgi`)"
            if self.framework == "flask":
                return "gunicorn, sync worker"
            return "gunicorn + `uvicorn_worker.UvicornWorker`"
        if self.server == "uvicorn":
            return "uvicorn `--workers`"
        if self.server == "granian":
            return f"granian `--interface {self.interface}`"
        return "hypercorn" + (" (WSGI)" if self.framework == "flask" else "")

    @property
    def interface(self) -> str:
        """granian's ``--interface``: the ASGI apps with their lifespan."""
        return "wsgi" if self.framework == "flask" else "asgi"

    def command(
        self,
        port: int,
        workers: int,
        max_requests: int,
        interface: str = "",
        extra: Sequence[str] = (),
    ) -> list[str]:
        """The server's command line; ``interface`` overrides granian's, ``extra``
        comes after the pairing's own options (for gunicorn, the last one wins)."""
        target = APPS[self.framework][1]
        bind = f"127.0.0.1:{port}"
        recycle = []
        if max_requests:
            recycle = ["--max-requests", str(max_requests),
                       "--max-requests-jitter", str(max_requests // 5)]  # fmt: skip
        if self.server == "gunicorn":
            cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                   "-w", str(workers), "-b", bind,
                   *GUNICORN_WORKERS.get(self.worker, []), *recycle]  # fmt: skip
        elif self.server == "hypercorn":
            cmd = [sys.executable, "-m", "hypercorn", "-c", "hypercorn.toml",
                   "-w", str(workers), "-b", bind, *recycle]  # fmt: skip
        elif self.server == "granian":
            # Without --respawn-failed-workers, granian shuts down altogether
            # when one worker dies. It has no max-requests: Deployment.recycling
            # makes it replace its workers (SIGHUP), each new one given 1 s
            # before the old one stops, not the 3.5 s default (14 s for 4
            # workers). Each worker listens on a socket of its own
            # (SO_REUSEPORT): at 0.5 s, all old ones had stopped before a
            # new one listened, and connections were refused. As in the
            # guides, --workers-kill-timeout: an old worker that ignored its
            # SIGTERM on a loaded machine held the replacement for good.
            cmd = [sys.executable, "-m", "granian", "--interface", interface or self.interface,
                   "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port),
                   "--respawn-failed-workers", "--workers-kill-timeout", "10"]  # fmt: skip
            if max_requests:
                cmd += ["--respawn-interval", "1"]
        else:
            cmd = [sys.executable, "-m", "uvicorn", "--workers", str(workers),
                   "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
            if max_requests:
                cmd += ["--limit-max-requests", str(max_requests)]
        return [*cmd, *extra, target]


def pairing_table() -> str:
    """The Markdown table of the pairings, as docs/testing.md shows it."""
    rows = ["| env | framework | server | workers |", "|---|---|---|---|"]
    for p in map(Pairing.parse, PAIRINGS):
        framework = FRAMEWORKS[p.framework]
        if p.external:
            framework += f", state in {ENGINES[p.engine]}"
        rows.append(f"| `{p.name}` | {framework} | {p.server_label} | {WORKERS} |")
    return "\n".join(rows) + "\n"


# --- deployments -----------------------------------------------------------------


@dataclass
class Deployment:
    """One app server with its workers, and what it printed."""

    pairing: Pairing
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    runtime_dir: Path
    pids_seen: set[int] = field(default_factory=set)
    workers: int = WORKERS
    max_requests: int = 0

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def explain(self, message: str) -> str:
        """``message`` followed by what the server printed: the first
        traceback of each kind of exception (the cause, often scrolled far up
        by the lines that follow) and its last 80 lines."""
        lines = self.output().splitlines()
        parts = [message]
        for block in _tracebacks(lines[:-80], 3):
            parts.append(f"--- {self.pairing} output, a traceback ---\n{block}")
        parts.append(f"--- {self.pairing} output, its last 80 lines ---")
        parts.extend(lines[-80:])
        return "\n".join(parts)

    def state_servers(self) -> list[psutil.Process]:
        """Live state-server processes started for this deployment."""
        return state_servers(self.runtime_dir)

    def wait_for_state_servers_to_leave(self, timeout: float = 15) -> None:
        """Wait until no state server of this deployment runs; fail with their logs."""
        try:
            wait_for(lambda: not self.state_servers(), timeout, "the state server to leave")
        except AssertionError:
            logs = [
                f"--- {log} ---\n{log.read_text(errors='replace')[-3000:]}"
                for log in self.runtime_dir.glob("shared_core/*/server.log")
            ]
            left = f"{self.state_servers()} still running {timeout:g} s after the app server"
            raise AssertionError(self.explain("\n".join([left, *logs]))) from None

    @contextlib.contextmanager
    def recycling(self) -> Iterator[None]:
        """Workers are replaced while the block runs (start with ``max_requests``).

        The other servers do it by themselves, after ``max_requests``.
        granian has no such limit (``--workers-lifetime`` is 60 s at least):
        its master gets a SIGHUP, on which it replaces its workers one by
        one, and another once that is done, until the block ends; then the
        block waits for the last replacement to end.
        """
        if self.pairing.server != "granian" or not self.max_requests:
            yield
            return
        stop = threading.Event()

        def hang_up() -> None:
            while not stop.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGHUP)
                while not stop.wait(0.05) and not self._granian_reloaded():
                    pass

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            # Stopped while it starts a worker, granian would hang (all_serving).
            try:
                wait_for(self._granian_reloaded, 60, "granian to replace its workers")
            except AssertionError as exc:
                raise AssertionError(self.explain(str(exc))) from None

    def _granian_reloaded(self) -> bool:
        """Whether granian has replaced every worker since the last SIGHUP."""
        out = self.output()
        _, hup, since = out.rpartition("HUP signal received")
        return bool(hup) and f"Stopped old worker-{self.workers}" in since and self.all_serving()

    def all_serving(self) -> bool:
        """Whether every worker granian started serves (other servers: True).

        A forked granian worker keeps the master's SIGTERM handler until it
        sets its own: one told to stop before then serves on, and the master
        waits for it forever. So the harness waits for this before it stops
        granian or has it replace its workers.
        """
        if self.pairing.server != "granian":
            return True
        out = self.output()
        return out.count("Spawning worker-") == out.count("Started worker-")

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError):  # then it hangs, and is killed below
                wait_for(lambda: self.proc.poll() is not None or self.all_serving(), 20, "")
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # Workers left behind by a master that died: end them too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def start(
    pairing: Pairing,
    workdir: Path,
    *,
    state_url: str | None = None,
    mode: str = "shared",
    workers: int = WORKERS,
    max_requests: int = 0,
    runtime_dir: Path | None = None,
    state_home: Path | None = None,
    env: dict[str, str] | None = None,
    interface: str = "",
    extra: Sequence[str] = (),
) -> Deployment:
    """Start the app server and wait until it answers /healthz (granian: and
    every worker serves, see ``Deployment.all_serving``).

    ``workdir`` holds its output and (unless ``runtime_dir`` is given) its own
    ``XDG_RUNTIME_DIR``, so that every deployment has its own embedded state
    server unless ``state_url`` names another; likewise its ``XDG_STATE_HOME``
    (where the deployment's secrets outlive it) unless ``state_home`` is given.
    ``interface`` is granian's ``--interface`` instead of the pairing's;
    ``extra``, options for the server (say ``--threads 100``).
    """
    port = free_port()
    if runtime_dir is None:
        runtime_dir = workdir / "run"
        runtime_dir.mkdir(mode=0o700)
    if state_home is None:
        state_home = workdir / "state"
        state_home.mkdir(mode=0o700, exist_ok=True)
    log = workdir / "server.log"
    extra_env = env
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARED_STATE_")}
    env.update(
        XDG_RUNTIME_DIR=str(runtime_dir),
        XDG_STATE_HOME=str(state_home),
        COUNTER_MODE=mode,
        PYTHONUNBUFFERED="1",
    )
    if state_url:
        env["SHARED_STATE_URL"] = state_url
    env.update(extra_env or {})
    with open(log, "wb") as out:
        # In a session of its own, and ended with the test run however it ends.
        proc = spawn(
            pairing.command(port, workers, max_requests, interface, extra),
            cwd=pairing.app_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deployment = Deployment(
        pairing,
        proc,
        f"http://127.0.0.1:{port}",
        log,
        runtime_dir,
        workers=workers,
        max_requests=max_requests,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(deployment.explain(f"{pairing} exited with {proc.returncode}"))
        try:
            r = get(f"{deployment.url}/healthz", timeout=2)
            if r.status_code == 200 and deployment.all_serving():
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            deployment.stop()
            raise AssertionError(deployment.explain(f"{pairing} did not answer in time"))
        time.sleep(0.1)
    return deployment


def state_servers(runtime_dir: Path) -> list[psutil.Process]:
    """Live state-server processes started with this runtime directory."""
    return testing.state_servers(runtime_dir=runtime_dir)


# The server of an external engine, which gives state URLs: ``.url(app, **query)``.
EngineServer = RedisServer | PostgresServer


def engine_server(pairing: Pairing, workdir: Path) -> EngineServer:
    """A new server of the pairing's external engine in ``workdir``, not started."""
    if pairing.engine == "redis":
        return RedisServer(workdir)
    if pairing.engine == "postgres":
        return PostgresServer(workdir)
    raise ValueError(f"{pairing}: the embedded engine has no server of its own")


def default_state_url(engine: EngineServer | None) -> str | None:
    """A fresh app (namespace) in the pairing's external engine, or None for
    the embedded default."""
    if engine is None:
        return None
    return engine.url(f"it{uuid.uuid4().hex[:8]}")


class ExplicitState:
    """A state server run on its own: ``shared_core serve``, or the external
    engine's server (a redis-server, a PostgreSQL server). Its URL gives up
    reconnecting after 0.5 s. Only PostgreSQL keeps the state through a
    ``kill()`` (``durable``): the others here keep it in memory alone."""

    def __init__(self, pairing: Pairing, workdir: Path) -> None:
        self.durable = pairing.engine == "postgres"
        self.server: StateServer | EngineServer
        if pairing.external:
            self.server = server = engine_server(pairing, workdir)
            self.url = server.url("explicit", connect_timeout=0.5)
        else:
            self.server = served = StateServer(workdir, connect_timeout=0.5)
            self.url = served.url

    def start(self) -> None:
        self.server.start()

    def kill(self) -> None:
        self.server.kill()

    def stop(self) -> None:
        """Stop it cleanly: a killed PostgreSQL that is not started again
        leaves its shared memory behind."""
        self.server.stop()


# --- requests --------------------------------------------------------------------

_client: httpx.Client | None = None


def send(
    method: str, url: str, *, cookies: dict[str, str] | None = None, **options: Any
) -> httpx.Response:
    """``httpx.request``, on one client for the whole run.

    ``httpx.get()`` builds a client, and loads the CA bundle, for every call:
    about 40 ms of CPU, which the health polls and samples paid thousands of
    times a run. This client keeps no connection alive, so each request still
    opens its own, as ``httpx.get()`` does, and the workers share them out.
    """
    global _client
    if _client is None:
        _client = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
    if cookies:
        # Per-request cookies are deprecated in httpx; a header says the same.
        headers = dict(options.pop("headers", None) or {})
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        options["headers"] = headers
    return _client.request(method, url, **options)


def get(url: str, **options: Any) -> httpx.Response:
    """``httpx.get`` without its cost: see ``send``."""
    return send("GET", url, **options)


def post(url: str, **options: Any) -> httpx.Response:
    """``httpx.post`` without its cost: see ``send``."""
    return send("POST", url, **options)


# --- load ------------------------------------------------------------------------


def read(d: Deployment, path: str) -> dict[str, Any]:
    """The JSON body of ``GET path``, asked again while workers restart (a
    recycling worker drops connections); it must be a read."""
    bodies: list[dict[str, Any]] = []

    def ask() -> bool:
        try:
            r = get(f"{d.url}{path}", timeout=30)
        except httpx.TransportError:
            return False
        if r.status_code == 200:
            bodies.append(r.json())
        return bool(bodies)

    try:
        wait_for(ask, 30, f"a {path} answer")
    except AssertionError as exc:
        raise AssertionError(d.explain(str(exc))) from None
    return bodies[-1]


def final_count(d: Deployment) -> int:
    """The count /report gives, asked again while workers restart."""
    return int(read(d, "/report")["count"])


def ticks(d: Deployment) -> dict[str, Any]:
    """What ``GET /ticks`` says, asked again while workers restart."""
    return read(d, "/ticks")


@dataclass
class Outcome:
    """What a load run saw: replies (status, JSON body) and transport errors."""

    replies: list[tuple[int, Any]]
    errors: list[str]
    slowest: float = 0.0  # seconds, the slowest single request

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [body for status, body in self.replies if status == 200]

    @property
    def pids(self) -> set[int]:
        return {body["pid"] for body in self.ok if "pid" in body}

    def beyond(self, allowed: set[int]) -> str:
        """The statuses seen, and the first three replies of a status not in ``allowed``."""
        statuses = Counter(status for status, _ in self.replies)
        strays = [reply for reply in self.replies if reply[0] not in allowed][:3]
        return f"statuses: {dict(statuses)}; the first others: {strays}"


def hammer(
    url: str,
    path: str,
    total: int,
    concurrency: int = 100,
    method: str = "POST",
    *,
    resend_dropped: bool = False,
    spread: float = 0.0,
) -> Outcome:
    """Send ``total`` requests from ``concurrency`` clients at once.

    Every request opens its own connection, as separate clients would, so
    that the server spreads them over its workers. With ``resend_dropped``,
    a request whose connection the server closed without any response (as
    uvicorn and hypercorn do to queued connections of a recycling worker) is
    sent again, up to ``total`` times in all, so that ``total`` get answers.
    With ``spread``, each client pauses between its requests so that the load
    lasts about ``spread`` seconds, for servers that act on a timer.
    """
    pause = spread * concurrency / total if total else 0.0

    async def run() -> Outcome:
        outcome = Outcome([], [])
        pending = [total]
        # A connection per request, which the server closes once it has
        # answered, as httpx did here. The timeouts are httpx's: per operation.
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=60)
        async with aiohttp.ClientSession(
            url, connector=connector, timeout=timeout, headers={"Connection": "close"}
        ) as session:

            async def client_loop() -> None:
                while pending[0] > 0:
                    pending[0] -= 1
                    started = time.monotonic()
                    try:
                        async with session.request(method, path) as r:
                            outcome.replies.append((r.status, _json(await r.read())))
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        outcome.errors.append(repr(exc))
                        if resend_dropped and len(outcome.errors) <= total:
                            pending[0] += 1
                    outcome.slowest = max(outcome.slowest, time.monotonic() - started)
                    if pause and pending[0] > 0:
                        await asyncio.sleep(pause)

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return outcome

    return asyncio.run(run())


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return {"text": body[:200].decode(errors="replace")}


def sample(
    url: str,
    path: str,
    n: int,
    *,
    workers: int = 2,
    at_most: int = 400,
    cookies: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """At least ``n`` sequential GETs, each on a new connection, and more
    (up to ``at_most``) until ``workers`` different workers have answered.

    The kernel hands each new connection to whichever worker accepts first;
    on a loaded machine one worker can win dozens in a row, so a fixed
    number of requests does not show several workers for certain.
    """
    bodies: list[dict[str, Any]] = []
    pids: set[Any] = set()
    while len(bodies) < n or (len(pids) < workers and len(bodies) < at_most):
        r = get(url + path, headers={"Connection": "close"}, cookies=cookies, timeout=30)
        assert r.status_code == 200, (r.status_code, r.text)
        bodies.append(r.json())
        pids.add(bodies[-1].get("pid"))
    return bodies


# Rows of the table the chaos tests print at the end of the run.
CHAOS_ROWS: list[dict[str, Any]] = []


if __name__ == "__main__":
    print(pairing_table(), end="")


def _tracebacks(lines: list[str], most: int) -> list[str]:
    """The first traceback of each kind of exception in ``lines`` (at most
    ``most``, its last 80 lines each); a chained one counts by its last exception."""
    found: dict[str, str] = {}
    i = 0
    while i < len(lines) and len(found) < most:
        if not lines[i].startswith("Traceback"):
            i += 1
            continue
        end = i + 1
        while end < len(lines):
            line = lines[end]
            chained = line.startswith(("The above exception", "During handling"))
            if line.startswith((" ", "Traceback")) or not line or chained:
                end += 1
            elif end + 1 < len(lines) and not lines[end + 1].strip():
                end += 1  # an exception line a chained traceback follows
            else:
                break
        last = lines[end] if end < len(lines) else ""
        kind = last.split(":", 1)[0]
        found.setdefault(kind, "\n".join(lines[i : end + 1][-80:]))
        i = end + 1
    return list(found.values())
