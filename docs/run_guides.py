"""Run the shell blocks of the READMEs and the deployment pages, as a reader would paste them.

A test per guide. A ```sh block preceded by ``<!-- docs: run -->`` must exit
0; one preceded by ``<!-- docs: serve -->`` is started in the background and
must answer ``GET http://127.0.0.1:8000/healthz`` within a minute; it runs
until the next ``serve`` block, so the ``run`` blocks after it talk to it, and
is then stopped as Ctrl-C stops it. ``<!-- docs: serve twice -->`` marks a
block a reader will run again (up-arrow, Enter) in the shell they are left in:
it is stopped and served a second time, and must leave that shell where it was.
Unmarked blocks (systemd, Docker, nginx) are shown, not run. The guides are
the top-level README, the apps' READMEs and the pages of docs/deploying that
have marked blocks. Each runs in a fresh copy of the repository, as in a
fresh clone, with its own runtime and state directories.

    pytest docs/run_guides.py [-k flask_counter]      (tox -e docs)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from shared_core.testing import RedisServer, spawn

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- docs: (run|serve|serve twice) -->\s*\n```sh\n(.*?)```", re.S)
IGNORED = shutil.ignore_patterns(".tox", ".venv", "__pycache__", "*.egg-info", "results", ".git")
# Seconds a block may take: the slowest (a venv and pip install) takes about a minute.
BLOCK_TIMEOUT = 300
GUIDES = [
    ROOT / "README.md",
    *sorted(ROOT.glob("apps/*/README.md")),
    *sorted(p for p in ROOT.glob("docs/deploying/*.md") if BLOCK.search(p.read_text())),
]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """A ``serve`` block, running in its own process group."""

    def __init__(self, script: str, cwd: Path, env: dict[str, str], log: Path) -> None:
        if port_open(8000):
            pytest.fail("port 8000 is busy: the guides serve there; stop what listens")
        self.log = log
        with open(log, "wb") as out:
            # In a session of its own, ended with the test run however it ends.
            self.proc = spawn(
                ["bash", "-c", script], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        # One client for the poll: httpx.get() builds one, CA bundle and all
        # (about 40 ms of CPU), on every call.
        with httpx.Client(timeout=2) as client:
            while not self._answers(client):
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"nothing answered on port 8000 within 60 s:\n{self.output()}")
                time.sleep(0.2)

    def _answers(self, client: httpx.Client) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the block exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return client.get("http://127.0.0.1:8000/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def output(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        """Ctrl-C: SIGINT to what the block runs, not to the shell, which goes on."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        # The port must be free for the next block.
        deadline = time.monotonic() + 20
        while port_open(8000) and time.monotonic() < deadline:
            time.sleep(0.1)


def left_in(cwd_file: Path) -> Path | None:
    """The directory a block's shell ended in, if it got that far."""
    return Path(cwd_file.read_text().strip()) if cwd_file.exists() else None


def run_guide(guide: Path) -> int:
    blocks = BLOCK.findall(guide.read_text())
    if not blocks:
        pytest.fail(f"{guide}: no <!-- docs: ... --> blocks")
    work = Path(tempfile.mkdtemp(prefix="guide-"))
    repo = work / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORED)
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SHARED_STATE_", "VIRTUAL_ENV"))
    }
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env["XDG_STATE_HOME"] = str(work / "state")  # the deployment's secrets, not the runner's
    cwd_file = work / "cwd"
    cwd = repo
    server: Server | None = None
    redis: RedisServer | None = None
    try:
        for i, (kind, script) in enumerate(blocks, 1):
            say(
                f"{guide} block {i}/{len(blocks)} ({kind}):\n    "
                + script.strip().replace("\n", "\n    ")
            )
            if "redis://127.0.0.1:6379" in script and redis is None and not port_open(6379):
                redis = RedisServer(work, port=6379).start()
            if kind.startswith("serve"):
                if server is not None:
                    server.stop()
                    cwd = left_in(cwd_file) or cwd
                # Where the shell is once the server is stopped is where the reader is left.
                served = f"{script}\npwd > {cwd_file}"
                cwd_file.unlink(missing_ok=True)
                server = Server(served, cwd, env, work / f"block{i}.log")
                if kind == "serve twice":
                    server.stop()
                    if left_in(cwd_file) != cwd:
                        pytest.fail(
                            f"{guide} block {i}: after Ctrl-C the shell is in "
                            f"{left_in(cwd_file) or 'no shell (it was replaced or killed)'}, "
                            f"not in {cwd}, where the block was pasted"
                        )
                    cwd_file.unlink()
                    server = Server(served, cwd, env, work / f"block{i}-again.log")
                continue
            try:
                done = subprocess.run(
                    ["bash", "-e", "-c", f"{script}\npwd > {cwd_file}"],
                    cwd=cwd,
                    env=env,
                    capture_output=True,
                    text=True,
                    # Also bounds a block that leaves a process holding its output open.
                    timeout=BLOCK_TIMEOUT,
                )
            except subprocess.TimeoutExpired as exc:
                late = f"{guide} block {i} still running after {BLOCK_TIMEOUT} s"
                pytest.fail(f"{late}:\n{exc.output}")
            print(done.stdout[-3000:], end="")
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                pytest.fail(f"{guide} block {i} failed with {done.returncode}")
            cwd = Path(cwd_file.read_text().strip())
    finally:
        if server is not None:
            server.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    return len(blocks)


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_marked_block_runs_as_written(guide: Path) -> None:
    run_guide(guide)
