"""Opening connections, and starting the state server when nobody has.

Start-up is arbitrated by an exclusive ``flock`` on ``start.lock`` in the
app's private directory: whoever holds it checks once more for a server and,
finding none, starts one and waits until it listens. Everyone else blocks on
the lock and then finds the server running. No timing is involved.

The server is started as an independent process (``subprocess`` + a second
fork, in a new session), never as a ``multiprocessing`` child: hypercorn's
daemonic workers may not have children, and gunicorn's master reaps any child
it sees. It is therefore the child of no worker and outlives all of them.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection
from pathlib import Path

from ..._backoff import Backoff
from ..._config import LOG_NAME, START_LOCK_NAME, Config, base_dir, ensure_private_dir
from ..._errors import StateUnavailable
from .protocol import NoServer, open_connection

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])


def connect(config: Config) -> Connection:
    """Return a connection, starting the server if ``config`` allows.

    Retries with backoff for ``config.connect_timeout`` seconds, then raises
    :class:`StateUnavailable`.
    """
    deadline = time.monotonic() + config.connect_timeout
    retry = Backoff(deadline)
    while True:
        try:
            if config.autostart:
                return _join_or_start(config, deadline)
            return open_connection(config, deadline)
        except AuthenticationError:
            raise StateUnavailable(f"{config.url}: the state server rejected our authkey") from None
        except (OSError, EOFError) as exc:
            if not retry.sleep():
                raise StateUnavailable(
                    f"cannot reach the state server at {config.url} within "
                    f"connect_timeout={config.connect_timeout:g}s: {exc!r}"
                ) from exc


def _join_or_start(config: Config, deadline: float) -> Connection:
    try:
        return open_connection(config, deadline)
    except NoServer:
        pass
    # Anything else (a server that does not answer in time, that hangs up)
    # propagates: a frozen server is still the server, and starting another
    # would replace its authkey under it.
    assert config.state_dir is not None
    ensure_private_dir(base_dir())
    ensure_private_dir(config.state_dir)
    with start_lock(config, deadline=deadline) as locked:
        if not locked:
            raise TimeoutError(f"the start lock of {config.state_dir} was busy until the deadline")
        try:
            return open_connection(config, deadline)
        except NoServer:
            pass
        config.ensure_authkey(regenerate=True)
        start_server(config, deadline)
    return open_connection(config, deadline)


def start_server(config: Config, deadline: float) -> int:
    """Start a detached server for ``config`` and wait until it listens.

    The caller holds the start lock. Returns the server's pid.
    """
    assert config.state_dir is not None
    log_path = config.state_dir / LOG_NAME
    env = dict(os.environ)
    # The server must import this very package, wherever it came from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    # CPython's small-object arenas return to the system only when wholly
    # empty, so a mass expiry would leave most of its memory behind; the C
    # allocator gives freed pages back (measured: 362 -> 28 MiB, not 109 MiB,
    # after a million keys expire), at no measurable cost per call.
    env.setdefault("PYTHONMALLOC", "malloc")
    cmd = [
        sys.executable, "-m", "shared_core", "serve",
        "--url", config.url,
        "--linger", repr(config.linger),
        "--watch-pid", str(os.getppid()),
        "--detach", "--start-locked",
    ]  # fmt: skip
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_fd,
            start_new_session=True,
            env=env,
        )
    finally:
        os.close(log_fd)
    assert proc.stdout is not None
    with proc.stdout:
        # The first process forks the server and exits at once.
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # Not even forked by the deadline (a machine that busy): stop the
            # launcher, so that nothing is left running on our behalf.
            proc.kill()
            proc.wait()
            raise StateUnavailable(
                f"the state server did not start within connect_timeout={config.connect_timeout:g}s"
            ) from None
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
                break
            chunk = os.read(proc.stdout.fileno(), 64)
            if not chunk:
                break
            line += chunk
    if not line.startswith(b"READY "):
        raise StateUnavailable(
            f"the state server did not start; its log {log_path} says:\n" + _tail(log_path)
        )
    return int(line.split()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


@contextmanager
def start_lock(
    config: Config, *, wait: bool = True, deadline: float | None = None
) -> Iterator[bool]:
    """Serialize starting and stopping the server of one private directory.

    Yields whether the lock is held: without ``wait``, only if it was free;
    with ``deadline`` (a ``time.monotonic()`` value), if it came free by then;
    otherwise always True, after waiting as long as it takes.
    """
    assert config.state_dir is not None
    fd = os.open(config.state_dir / START_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield _flock(fd, wait, deadline)
    finally:
        os.close(fd)


def _flock(fd: int, wait: bool, deadline: float | None) -> bool:
    if wait and deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    # flock() itself takes no timeout: try, and try again until the deadline.
    retry = Backoff(deadline if wait else time.monotonic(), first=0.002, cap=0.05)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not retry.sleep():
                return False
