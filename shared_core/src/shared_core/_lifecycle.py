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

import os
import select
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path

from ._config import LOG_NAME, Config, base_dir, ensure_private_dir
from ._errors import StateUnavailable
from ._server import start_lock

# The manager protocol's request that turns a fresh connection into one
# that serves method calls on shared objects.
_HANDSHAKE: tuple[None, str, tuple[str], dict[str, object]] = (
    None,
    "accept_connection",
    ("shared_core",),
    {},
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def open_connection(config: Config) -> Connection:
    """One attempt: connect, authenticate, handshake. Raises OSError if no server."""
    try:
        authkey = config.read_authkey()
    except FileNotFoundError as exc:
        raise ConnectionRefusedError(f"no authkey yet at {exc.filename}") from None
    conn = Client(config.address, family=config.family, authkey=authkey)
    try:
        conn.send(_HANDSHAKE)
        kind, result = conn.recv()
    except BaseException:
        conn.close()
        raise
    if kind != "#RETURN":
        conn.close()
        raise StateUnavailable(f"state server refused the connection: {result}")
    return conn


def connect(config: Config) -> Connection:
    """Return a connection, starting the server if ``config`` allows.

    Retries with backoff for ``config.connect_timeout`` seconds, then raises
    :class:`StateUnavailable`.
    """
    deadline = time.monotonic() + config.connect_timeout
    delay = 0.01
    while True:
        try:
            if config.autostart:
                return _join_or_start(config, deadline)
            return open_connection(config)
        except AuthenticationError:
            raise StateUnavailable(f"{config.url}: the state server rejected our authkey") from None
        except (OSError, EOFError) as exc:
            if time.monotonic() + delay > deadline:
                raise StateUnavailable(
                    f"cannot reach the state server at {config.url}: {exc}"
                ) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _join_or_start(config: Config, deadline: float) -> Connection:
    try:
        return open_connection(config)
    except (OSError, EOFError):
        pass
    assert config.state_dir is not None
    ensure_private_dir(base_dir())
    ensure_private_dir(config.state_dir)
    with start_lock(config):
        try:
            return open_connection(config)
        except (OSError, EOFError):
            pass
        config.ensure_authkey(regenerate=True)
        start_server(config, deadline)
    return open_connection(config)


def start_server(config: Config, deadline: float) -> int:
    """Start a detached server for ``config`` and wait until it listens.

    The caller holds the start lock. Returns the server's pid.
    """
    assert config.state_dir is not None
    log_path = config.state_dir / LOG_NAME
    env = dict(os.environ)
    # The server must import this very package, wherever it came from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
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
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
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
