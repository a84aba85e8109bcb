"""Test an app that uses shared_core against real servers: a pytest plugin and helpers.

Enable the fixtures in your own tests with ``pytest -p shared_core.testing``
(or ``addopts = ["-p", "shared_core.testing"]`` in your pytest settings); it
needs ``pip install "shared-core[testing]"``:

- ``isolated_state``: a private ``XDG_RUNTIME_DIR`` and ``XDG_STATE_HOME`` and
  a unique app name for one test, so that it starts a state server of its own; every state server
  started under it is stopped at teardown.
- ``state_server``: an explicit ``python -m shared_core serve`` on a Unix socket.
- ``redis_server``: a real ``redis-server`` on a Unix socket, one per session.
- ``postgres_server``: a real PostgreSQL server on a Unix socket, one per session.

Servers started by a test run end with it, however it ends (a CI timeout, a
second Ctrl-C, ``kill -9`` of pytest): see "tying servers to the test run"
below. At the start of a session the plugin also ends, and reports, what an
earlier run of the same checkout left running. A run whose tests are over
but whose process does not exit within 120 s (``$SHARED_CORE_TEST_EXIT_LIMIT``;
0: no limit), say for a non-daemon thread, prints every thread's stack and
exits with status 1.

The helpers work without pytest too:

>>> with RedisServer(workdir) as redis:
...     state = SharedState(f"redis+unix://{redis.socket}?app=test")
>>> with PostgresServer(workdir) as postgres:
...     state = SharedState(postgres.url("test"))
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
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
    "PostgresServer",
    "RedisServer",
    "StateServer",
    "free_port",
    "isolated_state",
    "kill_and_wait",
    "pids_alive",
    "postgres_server",
    "private_dir",
    "redis_server",
    "run_processes",
    "session_processes",
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


# --- tying servers to the test run ---------------------------------------------
#
# What a test run starts must end with it, however it ends: pytest killed by a
# CI timeout, a second Ctrl-C or ``kill -9`` runs no teardown. PR_SET_PDEATHSIG
# cannot do it: it fires when the *thread* that forked the child ends (a
# server restarted from a threading.Timer would die with the timer), and it
# reaches only that child, not a gunicorn master's workers nor the embedded
# state server, which a worker starts detached (a double fork into a session
# of its own: engines/embedded/lifecycle.py).
#
# So a run (the process that loads the plugin, or that first calls spawn())
# has a watchdog: a small process, nobody's child and in a session of its own
# (a Ctrl-C, or a kill of pytest's process group or tree, does not reach it),
# whose stdin is a pipe whose only write end the run holds. However the run
# dies, the kernel closes that end; the watchdog reads EOF, no polling, and
# SIGKILLs (run_processes):
#   - every process whose environment carries the run's marker
#     $SHARED_CORE_TEST_RUN ("PID START CHECKOUT"): pytest sets it in its own
#     environment, so whatever its tests start inherits it, grandchildren
#     included (gunicorn's workers, the state server a worker starts, a
#     test's own Popen);
#   - every process in a session that spawn() started and recorded in the
#     run's registry file, which also catches the servers that overwrite their
#     environment to set their process title (redis-server, nginx, gunicorn
#     with setproctitle), whose marker /proc no longer shows.
# A run whose interpreter exits normally (atexit; a Ctrl-C too) tells the
# watchdog so first; it then gives what leaves by itself up to _GRACE seconds
# before it kills the rest and reports it on stderr.
# At the start of a session the plugin does the same for the earlier runs of
# its checkout whose process is gone and whose watchdog did not finish (killed
# too, say by a kill of every process of the user), and reports what it
# ended. A run still alive, another checkout's, and other users' processes
# are never touched.
#
# Linux first. The pipe, the sessions and psutil work on other POSIX systems
# too; where psutil cannot read an environment, only the registered sessions
# are ended. Without os.getsid (Windows, which shared_core does not support)
# nothing is watched, and spawn() only starts the process.

RUN_VARIABLE = "SHARED_CORE_TEST_RUN"
_WATCHED = hasattr(os, "getsid")
_PROCFS = os.path.isdir("/proc/self")
# The watchdog imports this very module, wherever it came from.
_SRC = str(Path(__file__).resolve().parents[1])
# It forks at once and its first process exits: the watchdog is nobody's child
# (no zombie, and a kill of pytest's process tree does not reach it).
_WATCHDOG = (
    "import os, sys\n"
    "if os.fork(): os._exit(0)\n"
    "from shared_core.testing import _watch; _watch(sys.argv[1])"
)
# Not the run's marker (it is no server of the run), nor what would make a
# process that only waits slow or heavy (PYTHONTRACEMALLOC=25: 10 s, 75 MB).
_NOT_FOR_THE_WATCHDOG = {
    RUN_VARIABLE, "PYTHONTRACEMALLOC", "PYTHONDEVMODE", "PYTHONPROFILEIMPORTTIME",
    "PYTHONWARNINGS", "COVERAGE_PROCESS_START",
}  # fmt: skip
_EXITING = b"exiting\n"
_GRACE = 3.0  # seconds: how long what a normal exit leaves may take to leave by itself


@dataclass(frozen=True)
class _Run:
    """A test run: the process that owns it (pid and start time), and its checkout."""

    pid: int
    started: float
    checkout: str

    @property
    def marker(self) -> str:
        return f"{self.pid} {self.started:.2f} {self.checkout}"

    @classmethod
    def parse(cls, marker: str) -> _Run | None:
        try:
            pid, started, checkout = marker.split(" ", 2)
            return cls(int(pid), float(started), checkout)
        except ValueError:
            return None

    def alive(self) -> bool:
        return _is(self.pid, self.started)

    @property
    def registry(self) -> Path | None:
        """The file of the sessions spawn() started for this run: "PID START" lines."""
        directory = _registry_dir(self.checkout)
        return None if directory is None else directory / f"{self.pid}-{self.started:.2f}"

    def register(self, pid: int) -> None:
        started = _start_time(pid)
        for _ in range(2):  # again if a watchdog removed the empty directory meanwhile
            if started is None or _registry_dir(self.checkout, create=True) is None:
                return
            assert self.registry is not None
            try:
                with open(self.registry, "a") as f:
                    f.write(f"{pid} {started:.2f}\n")
                return
            except FileNotFoundError:
                continue
            except OSError:
                return

    def sessions(self) -> dict[int, bool]:
        """The registered sessions: True where the leader is still the process
        spawn() started, False where the leader is gone. One whose leader is
        another process of the same pid is not listed.

        A leaderless session is most likely ours (a pid is not reused while a
        process is in its session), but it may be a later session of a reused
        pid whose leader left too: run_processes takes only the processes
        with a blanked environment from it.
        """
        try:
            lines = self.registry.read_text().splitlines() if self.registry else []
        except OSError:
            lines = []
        sessions = {}
        for line in lines:
            with contextlib.suppress(ValueError):
                pid_field, started_field = line.split()
                pid, started = int(pid_field), float(started_field)
                if _is(pid, started):
                    sessions[pid] = True
                elif _start_time(pid) is None:
                    sessions[pid] = False
        return sessions


def _start_time(pid: int) -> float | None:
    """When ``pid`` started: on Linux in clock ticks since boot, which never
    change (a wall-clock time, as psutil gives, moves with NTP)."""
    try:
        if _PROCFS:
            with open(f"/proc/{pid}/stat") as f:
                return float(f.read().rsplit(")", 1)[1].split()[19])
        return psutil.Process(pid).create_time()
    except (OSError, IndexError, ValueError, psutil.Error):
        return None


def _is(pid: int, started: float) -> bool:
    """Whether ``pid`` is still the process that started at ``started``."""
    now = _start_time(pid)
    return now is not None and abs(now - started) < 0.05


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _checkout(path: Path) -> str:
    """The checkout a run belongs to: the nearest directory from ``path`` up with a
    ``.git``, else ``path`` (pytest's rootdir differs between ``pytest tests``
    and ``pytest shared_core/tests`` of one checkout)."""
    path = path.resolve()
    return str(next((p for p in (path, *path.parents) if (p / ".git").exists()), path))


def _registry_dir(checkout: str, *, create: bool = False) -> Path | None:
    """This user's private directory of the run registries of ``checkout``."""
    top = Path(tempfile.gettempdir()) / f"shared-core-runs-{os.getuid()}"
    directory = top / hashlib.sha256(checkout.encode()).hexdigest()[:16]
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                top.mkdir(mode=0o700)
        st = os.lstat(top)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None  # not ours alone: what it lists cannot be trusted
        if create:
            directory.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    return directory


_run: _Run | None = None


def _current_run(checkout: str | None = None, *, mark_environ: bool = False) -> _Run | None:
    """This process's run, and its watchdog, started on first use.

    ``mark_environ`` (pytest) puts the run's marker in this process's
    environment, so that all its tests start inherits it; used on its own,
    only what spawn() starts gets it.
    """
    global _run
    if _run is None and _WATCHED:
        started = _start_time(os.getpid())
        assert started is not None
        run = _Run(os.getpid(), started, checkout or _checkout(Path.cwd()))
        read, write = os.pipe()  # both close on exec: only this process holds ``write``
        env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_THE_WATCHDOG}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, env.get("PYTHONPATH")) if p)
        try:
            subprocess.run(
                [sys.executable, "-c", _WATCHDOG, run.marker],
                stdin=read,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                timeout=30,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            os.close(write)  # no watchdog: no run
            return None
        finally:
            os.close(read)
        # A child forked without exec must not keep the run alive.
        os.register_at_fork(after_in_child=lambda: _close(write))
        atexit.register(_exiting, run, write)
        _run = run
    if _run is not None and mark_environ:
        os.environ[RUN_VARIABLE] = _run.marker
    return _run


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _exiting(run: _Run, write: int) -> None:
    """Tell the watchdog that the run exits normally (an atexit handler)."""
    if os.getpid() == run.pid:  # not in a forked child, where ``write`` is closed
        with contextlib.suppress(OSError):
            os.write(write, _EXITING)


def _watch(marker: str) -> None:
    """The watchdog: wait until the run's pipe closes, then end what it left.

    A run that exits normally says so first; then what ends by itself with
    it (multiprocessing's resource tracker and forkserver, a server that
    notices its master left) gets a moment to do so before it is SIGKILLed
    and reported as left running.
    """
    run = _Run.parse(marker)
    assert run is not None
    said = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(0, 4096):
            said += chunk
    if said.endswith(_EXITING):
        deadline = time.monotonic() + _GRACE
        while run_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    ended = _reap(run)
    if ended:
        with contextlib.suppress(OSError):
            _report(f"the test run {run.pid} ended; killed what it left running", ended)


def run_processes(marker: str) -> list[psutil.Process]:
    """The live processes of the test run whose marker (``$SHARED_CORE_TEST_RUN``
    in its servers' environment) is ``marker``: those with the marker, and those
    in the sessions spawn() started for it. Never this process nor its
    ancestors, nor another user's processes."""
    run = _Run.parse(marker)
    sessions = run.sessions() if run is not None else {}
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    uid = os.getuid()
    found = []
    for proc in psutil.process_iter(["environ", "status", "uids"]):
        info = proc.info
        if (
            proc.pid in spared
            or info["status"] == psutil.STATUS_ZOMBIE
            or (uid != 0 and (info["uids"] is None or info["uids"].real != uid))
        ):
            continue
        env = info["environ"]
        led = sessions.get(_sid(proc.pid) or -1) if sessions else None
        # In a session whose leader left, only a blanked environment (a process
        # title written over it) stands for the marker.
        if (env or {}).get(RUN_VARIABLE) == marker or led or (led is False and not env):
            found.append(proc)
    return found


def _reap(run: _Run, timeout: float = 10) -> list[str]:
    """SIGKILL the processes of ``run`` until none is left (a gunicorn master may
    fork a worker meanwhile), for ``timeout`` at most; returns them, described."""
    ended: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while procs := run_processes(run.marker):
        for proc in procs:
            ended.setdefault(proc.pid, _describe(proc))
        with contextlib.suppress(AssertionError, psutil.Error):
            kill_and_wait(procs, max(0.1, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            break
    if run.registry is not None:
        with contextlib.suppress(OSError):
            run.registry.unlink(missing_ok=True)
            run.registry.parent.rmdir()  # when no other run of the checkout has a file there
    return [ended[pid] for pid in sorted(ended)]


def _sweep(checkout: str) -> list[str]:
    """End what the earlier runs of ``checkout`` whose process is gone left running."""
    runs: set[_Run | None] = set()
    registry = _registry_dir(checkout)
    with contextlib.suppress(OSError):
        for entry in registry.iterdir() if registry is not None else ():
            pid, _, started = entry.name.partition("-")
            runs.add(_Run.parse(f"{pid} {started} {checkout}"))
    for proc in psutil.process_iter(["environ"]):
        runs.add(_Run.parse((proc.info["environ"] or {}).get(RUN_VARIABLE, "")))
    ended: list[str] = []
    for run in runs:
        if run is not None and run.checkout == checkout and not run.alive():
            ended += _reap(run)
    return ended


def _describe(proc: psutil.Process) -> str:
    try:
        command = " ".join(" ".join(proc.cmdline()).split()) or proc.name()
    except psutil.Error:
        command = "?"
    return f"{proc.pid} {command[:200]}"


def _report(title: str, ended: list[str], write: Callable[[str], object] | None = None) -> None:
    write = write or (lambda line: print(line, file=sys.stderr, flush=True))
    write(f"shared_core.testing: {title} ({len(ended)} processes):")
    for line in ended:
        write(f"    {line}")


def spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    user: int | None = None,
    group: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived server for tests: in a session of its own, and ended
    with the test run however the run ends.

    In its own session, a Ctrl-C meant for pytest does not reach it (its
    fixture stops it), and ``os.killpg(proc.pid, ...)`` reaches all it forked.
    ``env`` (default: this process's environment) gets the run's marker.
    ``user`` and ``group`` (root only) run it as that uid and gid, without
    this process's supplementary groups.
    """
    run = _current_run()
    env = dict(os.environ if env is None else env)
    if run is not None:
        env[RUN_VARIABLE] = run.marker
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        user=user,
        group=group,
        extra_groups=None if user is None else [],
    )
    if run is not None:
        run.register(proc.pid)
    return proc


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes (zombies left out) of session ``sid``.

    For a server that spawn() started, ``sid`` is its pid: this is the server
    and all it forked that did not move to a session of its own, such as the
    workers an app server's master leaves behind when it dies.
    """
    return [
        proc
        for proc in psutil.process_iter(["status"])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and _sid(proc.pid) == sid
    ]


# --- servers -------------------------------------------------------------------


_S = TypeVar("_S", bound="_Server")


class _Server:
    proc: subprocess.Popen[bytes] | None = None
    stop_signal = signal.SIGTERM  # what asks it to stop cleanly

    def start(self) -> _Server:
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL it, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        """Stop it cleanly (``stop_signal``); SIGKILL if it has not left after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(self.stop_signal)
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
        self.proc = proc = spawn(
            [sys.executable, "-m", "shared_core", "serve", "--url", self.url], env=self.env
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
        appendfsync: keep an append-only file flushed by this policy
            (``always``, ``everysec`` or ``no``); ``durable`` is ``always``.
    """

    def __init__(
        self, workdir: Path, port: int = 0, durable: bool = False, appendfsync: str | None = None
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.durable = durable
        self.appendfsync = appendfsync or ("always" if durable else None)
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
        self.proc = proc = spawn(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no" if self.appendfsync is None else "yes",
             "--appendfsync", self.appendfsync or "always",
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


class PostgresServer(_Server):
    """A real PostgreSQL server on a Unix socket in ``workdir``, its data in
    ``workdir/data`` (made by ``initdb`` on the first start), its log in
    ``workdir/postgres.log``. The user ``postgres`` logs in without a password.

    Run as root, initdb and postgres run as the user ``postgres`` (Debian's
    package makes it), else ``nobody``, which gets ``workdir``: the
    directories above it must let others through, as ``private_dir``'s do.

    Parameters:
        workdir: a private directory for the socket, the data and the log;
            keep its path short (a Unix socket path has at most 107 bytes).
        port: also listen on this TCP port of 127.0.0.1 (0: no TCP, and the
            socket is named after the default port, 5432).
    """

    stop_signal = signal.SIGINT  # a fast shutdown

    def __init__(self, workdir: Path, port: int = 0) -> None:
        self.workdir = workdir
        self.tcp = port != 0
        self.port = port or 5432
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        """The directory of the socket: libpq's ``host``."""
        return self.workdir

    @property
    def socket(self) -> Path:
        """The socket itself, ``.s.PGSQL.<port>``."""
        return self.workdir / f".s.PGSQL.{self.port}"

    def start(self, timeout: float = 60) -> PostgresServer:
        """Start it (again) and wait until it lets clients in (after a kill,
        once crash recovery is over); RuntimeError if PostgreSQL is not installed."""
        bin_dir = _postgres_bin_dir()
        owner = _postgres_owner()
        if not (self.data / "PG_VERSION").exists():
            self._initdb(bin_dir, owner)
        uid, gid = owner or (None, None)
        with open(self.log, "ab") as log:
            self.proc = proc = spawn(
                [str(bin_dir / "postgres"), "-D", str(self.data)],
                cwd=self.workdir,  # readable by the server's user (it looks up its own path)
                stdout=log,
                stderr=subprocess.STDOUT,
                user=uid,
                group=gid,
            )
        wait_for(
            lambda: proc.poll() is not None or _accepts_logins(bin_dir, self), timeout, "postgres"
        )
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{self._log_tail()}")
        return self

    def _initdb(self, bin_dir: Path, owner: tuple[int, int] | None) -> None:
        shutil.rmtree(self.data, ignore_errors=True)  # what a failed initdb left
        if owner is not None:
            os.chown(self.workdir, *owner)
        uid, gid = owner or (None, None)
        with open(self.log, "ab") as log:
            done = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
                 "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
                 "--no-instructions"],
                cwd=self.workdir,
                env={**os.environ, "TZ": "UTC"},  # spares initdb its search of the zone files
                stdout=log,
                stderr=subprocess.STDOUT,
                user=uid,
                group=gid,
                extra_groups=None if uid is None else [],
                timeout=120,
                check=False,
            )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb exited with {done.returncode}:\n{self._log_tail()}")
        quoted = str(self.workdir).replace("'", "''")
        settings = [
            f"listen_addresses = '{'127.0.0.1' if self.tcp else ''}'",
            f"port = {self.port}",
            f"unix_socket_directories = '{quoted}'",
            # Faster, and a crash of the server loses nothing committed:
            # each commit still writes its WAL, which stays in the kernel's
            # page cache; only a crash of the machine would lose it.
            "fsync = off",
            "full_page_writes = off",
            # The suite's 4 workers have a pool each per deployment, and the
            # chaos tests start 16 workers at once.
            "max_connections = 300",
            "shared_buffers = 16MB",
            # Files in the data directory, which goes with the test, not in /dev/shm.
            "dynamic_shared_memory_type = mmap",
        ]
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# shared_core.testing.PostgresServer\n" + "\n".join(settings) + "\n")

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the server and every process it forked, as a crash would,
        and wait until all are gone (a restart refuses to start while one
        still holds the old shared memory).

        Its processes each start a session of their own: they are found as
        its children (``processes``), while it is stopped so that it forks
        no other.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGSTOP)
            kill_and_wait(self.processes(), 10)
        self.proc.wait()

    def processes(self) -> list[psutil.Process]:
        """The server's live processes: the postmaster first, then those it
        forked (a backend per connection, and its helpers), each of which
        runs in a session of its own. Freezing the server (SIGSTOP) takes
        all of them: the postmaster alone only holds up new connections."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            postmaster = psutil.Process(self.proc.pid)
            return [postmaster, *postmaster.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def url(self, app: str, **query: object) -> str:
        """A ``postgresql://`` state URL of this server for ``app``, on its socket."""
        options = {"host": str(self.socket_dir), "port": self.port, "app": app, **query}
        return "postgresql://postgres@/postgres?" + urlencode(options, safe="/")


def _postgres_bin_dir() -> Path:
    """The directory of PostgreSQL's ``initdb`` and ``postgres``: that of those
    on PATH, else the newest of Debian's (``/usr/lib/postgresql/N/bin``, not on
    PATH), else Homebrew's."""
    candidates = []
    for name in ("initdb", "postgres"):
        if found := shutil.which(name):
            # A symlink (say in /usr/local/bin) to the installation's own directory.
            candidates += [Path(found).resolve().parent, Path(found).parent]
    patterns = ("/usr/lib/postgresql/*/bin", "/opt/homebrew/opt/postgresql@*/bin",
                "/usr/local/opt/postgresql@*/bin")  # fmt: skip
    for pattern in patterns:
        candidates += sorted(map(Path, glob.glob(pattern)), key=_version, reverse=True)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres")):
            return directory
    raise RuntimeError(
        "PostgreSQL is not installed (Debian: apt-get install postgresql; "
        "macOS: brew install postgresql@17; or run bash ci/test, which installs it)"
    )


def _version(bin_dir: Path) -> tuple[int, ...]:
    """The version in a path such as /usr/lib/postgresql/15/bin or .../postgresql@17/bin."""
    return tuple(int(n) for n in re.findall(r"\d+", bin_dir.parent.name))


def _postgres_owner() -> tuple[int, int] | None:
    """The uid and gid to run initdb and postgres as: this process's (None)
    unless it is root, which they refuse to run as."""
    if os.geteuid() != 0:
        return None
    import pwd  # POSIX only, as running as root is

    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise RuntimeError("PostgreSQL will not run as root, and there is no user postgres nor nobody")


def _accepts_logins(bin_dir: Path, server: PostgresServer) -> bool:
    """Whether the server lets clients in. A bare connect is not enough: while
    it starts or recovers from a crash it accepts connections only to refuse
    them, which ``pg_isready`` tells apart."""
    ready = subprocess.run(
        [str(bin_dir / "pg_isready"), "-q", "-t", "5", "-h", str(server.socket_dir),
         "-p", str(server.port), "-U", "postgres", "-d", "postgres"],
        check=False,
    )  # fmt: skip
    return ready.returncode == 0


# --- the pytest plugin -----------------------------------------------------------


_SWEPT = pytest.StashKey[list[str]]()
# A run whose tests are over but whose process cannot exit (a non-daemon thread
# still running, an atexit handler that waits) would hold a CI job until the
# job's own time limit, with nothing said. So once the last configured pytest
# of the process is unconfigured, faulthandler gets _EXIT_LIMIT seconds: then
# it prints every thread's stack and exits with status 1.
EXIT_LIMIT_VARIABLE = "SHARED_CORE_TEST_EXIT_LIMIT"  # seconds; 0: no limit
_EXIT_LIMIT = 120.0
_configured = 0


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """End what earlier runs of this checkout left running; tie this run's servers to it."""
    global _configured
    _configured += 1
    _exit_limit()  # a bad setting stops the run before its tests, not after
    if not _WATCHED:
        return
    checkout = _checkout(config.rootpath)
    if not hasattr(config, "workerinput"):  # an xdist worker: its controller swept
        config.stash[_SWEPT] = _sweep(checkout)
    _current_run(checkout, mark_environ=True)


@pytest.hookimpl(wrapper=True)
def pytest_sessionstart(session: pytest.Session) -> Iterator[None]:
    """Report the sweep below the header."""
    yield
    ended = session.config.stash.get(_SWEPT, [])
    if ended:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        write = reporter and (lambda line: reporter.write_line(line, yellow=True, bold=True))
        _report("ended what an earlier test run of this checkout left running", ended, write)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Bound the time the process may take to exit once its last session is over."""
    global _configured
    _configured -= 1
    # Not after a run inside another (its outer session is still configured).
    limit = _exit_limit()
    if _configured == 0 and limit > 0 and sys.__stderr__ is not None:
        faulthandler.dump_traceback_later(limit, exit=True, file=sys.__stderr__)


def _exit_limit() -> float:
    setting = os.environ.get(EXIT_LIMIT_VARIABLE) or str(_EXIT_LIMIT)
    try:
        return float(setting)
    except ValueError:
        raise pytest.UsageError(f"{EXIT_LIMIT_VARIABLE}={setting!r}: not a number") from None


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (``.url(app)``, ``.socket_dir``);
    fails the tests that use it when PostgreSQL is not installed."""
    workdir = private_dir("pg-")
    try:
        with PostgresServer(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
