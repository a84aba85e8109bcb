"""Real app servers, started as real processes, for every framework × server.

The pairing comes from ``$PAIRING`` (tox sets it to the env name, e.g.
``quart-hypercorn``) or ``--pairing``: ``FRAMEWORK-SERVER[-gthread][-redis]``.
With ``-redis`` the apps use the Redis engine on a real redis-server that the
tests start; otherwise the embedded default.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from shared_core.testing import RedisServer, redis_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
APPS = {
    "flask": ("flask_counter", "flask_counter.wsgi:app"),
    "quart": ("quart_counter", "quart_counter.asgi:app"),
    "fastapi": ("fastapi_counter", "fastapi_counter.main:app"),
}
SERVERS = ("gunicorn", "hypercorn", "uvicorn")
WORKERS = 4
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Pairing:
    framework: str
    server: str
    gthread: bool = False
    redis: bool = False

    @classmethod
    def parse(cls, name: str) -> Pairing:
        factors = name.split("-")
        framework = factors[0]
        server = factors[1] if len(factors) > 1 else ""
        if framework not in APPS or server not in SERVERS:
            raise pytest.UsageError(
                f"pairing {name!r}: expected FRAMEWORK-SERVER with FRAMEWORK in "
                f"{sorted(APPS)} and SERVER in {SERVERS}"
            )
        extra = set(factors[2:])
        if extra - {"gthread", "redis"}:
            raise pytest.UsageError(f"pairing {name!r}: unknown factors {extra}")
        return cls(framework, server, "gthread" in extra, "redis" in extra)

    @property
    def name(self) -> str:
        extra = ("-gthread" if self.gthread else "") + ("-redis" if self.redis else "")
        return f"{self.framework}-{self.server}{extra}"

    @property
    def app_name(self) -> str:
        """The app's package, which is also its APP_NAME (its state's name)."""
        return APPS[self.framework][0]

    @property
    def app_dir(self) -> Path:
        return ROOT / "apps" / self.app_name

    def command(self, port: int, workers: int, max_requests: int) -> list[str]:
        target = APPS[self.framework][1]
        bind = f"127.0.0.1:{port}"
        if self.server == "gunicorn":
            cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                   "-w", str(workers), "-b", bind]  # fmt: skip
            if self.gthread:
                cmd += ["-k", "gthread", "--threads", "4"]
            if max_requests:
                cmd += ["--max-requests", str(max_requests),
                        "--max-requests-jitter", str(max_requests // 5)]  # fmt: skip
        elif self.server == "hypercorn":
            cmd = [sys.executable, "-m", "hypercorn", "-c", "hypercorn.toml",
                   "-w", str(workers), "-b", bind]  # fmt: skip
            if max_requests:
                cmd += ["--max-requests", str(max_requests),
                        "--max-requests-jitter", str(max_requests // 5)]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "uvicorn", "--workers", str(workers),
                   "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
            if max_requests:
                cmd += ["--limit-max-requests", str(max_requests)]
        return [*cmd, target]


ALL_PAIRINGS = [
    "flask-gunicorn", "flask-gunicorn-gthread", "flask-hypercorn",
    "quart-hypercorn", "quart-uvicorn", "quart-gunicorn",
    "fastapi-uvicorn", "fastapi-hypercorn", "fastapi-gunicorn",
    "flask-gunicorn-redis", "quart-hypercorn-redis", "fastapi-uvicorn-redis",
]  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pairing",
        default=os.environ.get("PAIRING"),
        help="FRAMEWORK-SERVER[-gthread][-redis], a comma-separated list, or 'all'",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pairing" not in metafunc.fixturenames:
        return
    names = metafunc.config.getoption("pairing")
    if not names:
        raise pytest.UsageError("set $PAIRING or --pairing, e.g. flask-gunicorn")
    chosen = ALL_PAIRINGS if names == "all" else names.split(",")
    pairings = [Pairing.parse(name) for name in chosen]
    metafunc.parametrize("pairing", pairings, ids=chosen, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the pairings a test marked ``only(framework=..., redis=...)`` is not for."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("only")
        callspec = getattr(item, "callspec", None)
        pairing = callspec.params.get("pairing") if callspec else None
        if (
            marker
            and isinstance(pairing, Pairing)
            and not all(getattr(pairing, k) == v for k, v in marker.kwargs.items())
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# Rows of the table the chaos tests print at the end of the run.
CHAOS_ROWS: list[dict[str, Any]] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not CHAOS_ROWS:
        return
    columns = ["scenario", "pairing", "faults", "sent", "acknowledged", "counted", "lost"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in CHAOS_ROWS)) for c in columns}
    terminalreporter.section("fault injection")
    terminalreporter.write_line(" | ".join(c.ljust(widths[c]) for c in columns))
    terminalreporter.write_line("-+-".join("-" * widths[c] for c in columns))
    for row in CHAOS_ROWS:
        terminalreporter.write_line(" | ".join(str(row[c]).ljust(widths[c]) for c in columns))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    """One app server with its workers, and what it printed."""

    pairing: Pairing
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    runtime_dir: Path
    pids_seen: set[int] = field(default_factory=set)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def explain(self, message: str) -> str:
        """``message`` followed by what the server printed (its last 80 lines)."""
        tail = "\n".join(self.output().splitlines()[-80:])
        return f"{message}\n--- {self.pairing} output ---\n{tail}"

    def state_servers(self) -> list[psutil.Process]:
        """Live state-server processes started for this deployment."""
        return state_servers(self.runtime_dir)

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
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


def state_servers(runtime_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if "shared_core" not in cmd or "serve" not in cmd:
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get("XDG_RUNTIME_DIR") == str(runtime_dir):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def start(
    pairing: Pairing,
    workdir: Path,
    *,
    state_url: str | None = None,
    mode: str = "shared",
    workers: int = WORKERS,
    max_requests: int = 0,
    runtime_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Deployment:
    """Start the app server and wait until it answers /healthz.

    ``workdir`` holds its output and (unless ``runtime_dir`` is given) its own
    ``XDG_RUNTIME_DIR``, so that every deployment has its own embedded state
    server unless ``state_url`` names another.
    """
    port = free_port()
    if runtime_dir is None:
        runtime_dir = workdir / "run"
        runtime_dir.mkdir(mode=0o700)
    log = workdir / "server.log"
    extra_env = env
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARED_STATE_")}
    env.update(XDG_RUNTIME_DIR=str(runtime_dir), COUNTER_MODE=mode, PYTHONUNBUFFERED="1")
    if state_url:
        env["SHARED_STATE_URL"] = state_url
    env.update(extra_env or {})
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            pairing.command(port, workers, max_requests),
            cwd=pairing.app_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deployment = Deployment(pairing, proc, f"http://127.0.0.1:{port}", log, runtime_dir)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(deployment.explain(f"{pairing} exited with {proc.returncode}"))
        try:
            r = httpx.get(f"{deployment.url}/healthz", timeout=2)
            if r.status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            deployment.stop()
            raise AssertionError(deployment.explain(f"{pairing} did not answer in time"))
        time.sleep(0.1)
    return deployment


@pytest.fixture(scope="session")
def redis_socket(pairing: Pairing) -> Iterator[Path | None]:
    """The redis-server of a ``-redis`` pairing (None for the others)."""
    if not pairing.redis:
        yield None
        return
    # Short, so that the socket path stays under the 107-byte limit.
    workdir = Path(tempfile.mkdtemp(prefix="redis-"))
    try:
        with redis_server(workdir) as sock:
            yield sock
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def default_state_url(redis_socket: Path | None) -> str | None:
    """A fresh namespace in the pairing's Redis, or None for the embedded default."""
    if redis_socket is None:
        return None
    return f"redis+unix://{redis_socket}?app=it{uuid.uuid4().hex[:8]}"


@pytest.fixture
def launch(
    pairing: Pairing, redis_socket: Path | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """``launch(**options)`` starts a deployment that is stopped at teardown."""
    started: list[Deployment] = []

    def _launch(**options: Any) -> Deployment:
        options.setdefault("state_url", default_state_url(redis_socket))
        deployment = start(pairing, tmp_path_factory.mktemp("app"), **options)
        started.append(deployment)
        return deployment

    yield _launch
    for deployment in started:
        deployment.stop()


@pytest.fixture(scope="module")
def deployment(
    pairing: Pairing, redis_socket: Path | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """The shared-state app with 4 workers, shared by the tests of a module."""
    d = start(pairing, tmp_path_factory.mktemp("app"), state_url=default_state_url(redis_socket))
    yield d
    d.stop()


class ExplicitState:
    """A state server run on its own: ``shared-core serve``, or a redis-server
    for ``-redis`` pairings. Its URL gives up reconnecting after 0.5 s."""

    def __init__(self, pairing: Pairing, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir) if pairing.redis else None
        self.proc: subprocess.Popen[bytes] | None = None
        if self.redis is not None:
            self.url = f"redis+unix://{self.redis.socket}?app=explicit&connect_timeout=0.5"
        else:
            self.url = f"unix://{workdir}/state.sock?connect_timeout=0.5"

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
            return
        sock = self.workdir / "state.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared_core", "serve", "--url", self.url]
        )
        proc = self.proc
        wait_for(lambda: sock.exists() or proc.poll() is not None, 30, "shared-core serve")
        assert proc.poll() is None, "shared-core serve exited; its output is above"

    def kill(self) -> None:
        if self.redis is not None:
            self.redis.kill()
        elif self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def explicit_state(pairing: Pairing) -> Iterator[ExplicitState]:
    workdir = Path(tempfile.mkdtemp(prefix="st-"))
    os.chmod(workdir, 0o700)
    state = ExplicitState(pairing, workdir)
    state.start()
    try:
        yield state
    finally:
        state.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def final_count(d: Deployment) -> int:
    """The count /report gives, asked again while workers restart (it is a read)."""
    counts: list[int] = []

    def ask() -> bool:
        try:
            r = httpx.get(f"{d.url}/report", timeout=10)
        except httpx.TransportError:
            return False
        if r.status_code == 200:
            counts.append(int(r.json()["count"]))
        return bool(counts)

    wait_for(ask, 30, "a /report answer")
    return counts[-1]


@dataclass
class Outcome:
    """What a load run saw: replies (status, JSON body) and transport errors."""

    replies: list[tuple[int, Any]]
    errors: list[str]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [body for status, body in self.replies if status == 200]

    @property
    def pids(self) -> set[int]:
        return {body["pid"] for body in self.ok if "pid" in body}


def hammer(
    url: str,
    path: str,
    total: int,
    concurrency: int = 100,
    method: str = "POST",
    *,
    resend_dropped: bool = False,
) -> Outcome:
    """Send ``total`` requests from ``concurrency`` clients at once.

    Every request opens its own connection, as separate clients would, so
    that the server spreads them over its workers. With ``resend_dropped``,
    a request whose connection the server closed without any response (as
    uvicorn and hypercorn do to queued connections of a recycling worker) is
    sent again, up to ``total`` times in all, so that ``total`` get answers.
    """

    async def run() -> Outcome:
        replies: list[tuple[int, Any]] = []
        errors: list[str] = []
        pending = [total]
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def client_loop() -> None:
                while pending[0] > 0:
                    pending[0] -= 1
                    try:
                        r = await client.request(method, path)
                        replies.append((r.status_code, _json(r)))
                    except httpx.TransportError as exc:
                        errors.append(repr(exc))
                        if resend_dropped and len(errors) <= total:
                            pending[0] += 1

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return Outcome(replies, errors)

    return asyncio.run(run())


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"text": response.text[:200]}


def sample(url: str, path: str, n: int) -> list[dict[str, Any]]:
    """``n`` sequential GETs, each on a new connection (to reach many workers)."""
    bodies = []
    for _ in range(n):
        r = httpx.get(url + path, headers={"Connection": "close"}, timeout=30)
        assert r.status_code == 200, (r.status_code, r.text)
        bodies.append(r.json())
    return bodies
