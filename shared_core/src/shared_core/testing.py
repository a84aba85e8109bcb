"""Helpers for testing an app that uses shared_core against real servers.

>>> with redis_server(tmp_path) as sock:
...     state = SharedState(f"redis+unix://{sock}?app=test")
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

__all__ = ["RedisServer", "redis_server", "wait_for"]


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


class RedisServer:
    """A real ``redis-server`` on ``workdir/redis.sock``, without persistence.

    Parameters:
        workdir: a private directory for the socket; keep its path short
            (a Unix socket path has at most 107 bytes).
        port: also listen on this TCP port of 127.0.0.1 (0: no TCP).
        durable: keep an append-only file, fsynced on every write, so that
            a SIGKILL loses nothing acknowledged (and a restart keeps it).
    """

    def __init__(self, workdir: Path, port: int = 0, durable: bool = False) -> None:
        self.workdir = workdir
        self.port = port
        self.durable = durable
        self.socket = workdir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start it (again) and wait until it listens; RuntimeError if no binary."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install redis-server)"
            )
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "",
             "--appendonly", "yes" if self.durable else "no", "--appendfsync", "always",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        proc = self.proc
        wait_for(lambda: self.socket.exists() or proc.poll() is not None, 20, "redis-server")
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        return self

    def kill(self) -> None:
        """SIGKILL it, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """Stop it cleanly."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextmanager
def redis_server(workdir: Path) -> Iterator[Path]:
    """Run a redis-server for the ``with`` block; yields its socket path."""
    server = RedisServer(workdir).start()
    try:
        yield server.socket
    finally:
        server.stop()
