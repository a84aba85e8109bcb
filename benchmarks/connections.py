"""Connections and threads: what thread-heavy workers cost the embedded state server.

Two measures, each taken for this checkout's ``shared_core`` and, with
``--baseline-src``, for another one (say a worktree of an older commit), in
interleaved rounds so that the noise of a shared machine hits both alike:

- **engine**: 4 processes, each with T threads calling ``incr`` in a loop
  (T = 1, 8, 64, 256): increments per second, and the state server's threads
  and client connections while they run;
- **http**: the Flask reference app, 4 workers with 100 threads each, under
  granian's WSGI interface and gunicorn's gthread worker, loaded by 400
  concurrent clients: requests per second, and the state server's threads
  and connections at their peak.

    python -m benchmarks.connections [--baseline-src OLD/shared_core/src] [--quick]
        [--out benchmarks/results/connections.json]

(from the repository root: the app servers are started by the suite's
harness, ``tests.harness``).

Each measured variant runs its own state server (its own runtime directory),
started by its own clients, so the baseline's server is the baseline's code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from shared_core.testing import state_servers
from tests.harness import Pairing, start

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 4
THREADS = (1, 8, 64, 256)
HTTP_THREADS = 100
HTTP_CLIENTS = 400

# One client process of the engine measure: T threads call incr until the
# end time and print how many calls they made.
_CLIENT = r"""
import sys, threading, time
from shared_core import SharedState

threads, start, end = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
state = SharedState(sys.argv[4] or None, app="bench")
state.incr("warm")
counts = [0] * threads

def run(i):
    n = 0
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < end:
        state.incr("n")
        n += 1
    counts[i] = n

pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
print(sum(counts))
"""


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Variant:
    """One ``shared_core`` source tree, measured in runtime directories of its own."""

    def __init__(self, name: str, src: Path | None, scratch: Path, query: str = "") -> None:
        self.name = name
        self.src = src
        self.scratch = scratch
        self.url = f"local://bench?{query}" if query else ""

    def env(self, runtime: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARED_STATE_")}
        env.update(XDG_RUNTIME_DIR=str(runtime), XDG_STATE_HOME=str(runtime / "home"))
        if self.url:
            env["SHARED_STATE_URL"] = self.url
        if self.src is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.src), env.get("PYTHONPATH", "")])
        return env

    def runtime(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.scratch))
        path.chmod(0o700)
        (path / "home").mkdir(mode=0o700)
        return path


class Peak:
    """Samples the state servers of a runtime directory: their threads and clients."""

    def __init__(self, runtime: Path) -> None:
        self.runtime = runtime
        self.threads = 0
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for proc in state_servers(runtime_dir=self.runtime):
                try:
                    self.threads = max(self.threads, proc.num_threads())
                    self.connections = max(self.connections, _sockets(proc.pid) - 1)
                except (psutil.Error, OSError):
                    pass


def _sockets(pid: int) -> int:
    """The sockets a process has open: the listener and one per client connection."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(fd).startswith("socket:")
    return count


def engine_round(variant: Variant, threads: int, seconds: float) -> dict[str, Any]:
    runtime = variant.runtime()
    env = variant.env(runtime)
    start = time.time() + 3.0  # every process connected and its threads started
    end = start + seconds
    args = [sys.executable, "-c", _CLIENT, str(threads), str(start), str(end), variant.url]
    with Peak(runtime) as peak:
        procs = [
            subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(PROCESSES)
        ]
        outs = [p.communicate(timeout=seconds + 120)[0] for p in procs]
    for p in procs:
        if p.returncode:
            raise SystemExit(f"{variant.name}: a client process failed ({p.returncode})")
    calls = sum(int(out.split()[-1]) for out in outs)
    _stop_servers(runtime)
    return {
        "incr_per_s": calls / seconds,
        "server_threads": peak.threads,
        "connections": peak.connections,
    }


def http_round(variant: Variant, server: str, seconds: float) -> dict[str, Any]:
    runtime = variant.runtime()
    threads = str(HTTP_THREADS)
    if server == "granian":
        pairing, extra = "flask-granian", ["--blocking-threads", threads, "--no-log"]
    else:
        pairing, extra = "flask-gunicorn-gthread", ["--threads", threads]
    d = start(
        Pairing.parse(pairing),
        runtime,
        state_url=variant.url or None,
        workers=PROCESSES,
        runtime_dir=runtime,
        state_home=runtime / "home",
        env=variant.env(runtime),
        extra=extra,
    )
    try:
        with Peak(runtime) as peak:
            done, errors = asyncio.run(_load(d.url, seconds))
    finally:
        d.stop()
    _stop_servers(runtime)
    return {
        "requests_per_s": done / seconds,
        "errors": errors,
        "server_threads": peak.threads,
        "connections": peak.connections,
    }


async def _load(url: str, seconds: float) -> tuple[int, int]:
    done = errors = 0
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=HTTP_CLIENTS)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal done, errors
            while time.monotonic() < end:
                try:
                    async with session.post("/increment") as r:
                        await r.read()
                        if r.status == 200:
                            done += 1
                        else:
                            errors += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1

        await asyncio.gather(*(client() for _ in range(HTTP_CLIENTS)))
    return done, errors


def _stop_servers(runtime: Path) -> None:
    for proc in state_servers(runtime_dir=runtime):
        try:
            proc.kill()
            proc.wait(10)
        except psutil.Error:
            pass


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of every figure over the rounds."""
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", type=Path, help="another shared_core/src to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--only", choices=("engine", "http"), help="one measure only")
    parser.add_argument(
        "--threads", type=int, action="append", help=f"threads per process (default {THREADS})"
    )
    parser.add_argument(
        "--max-connections", type=int, action="append", default=[],
        help="also measure this checkout with ?max_connections=N (repeatable)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/connections.json")
    args = parser.parse_args()
    rounds, seconds = (1, 2.0) if args.quick else (args.rounds, args.seconds)
    scratch = Path(tempfile.mkdtemp(prefix="conns-"))
    variants = [Variant("this", None, scratch)]
    for n in args.max_connections:
        variants.append(
            Variant(f"this, max_connections={n}", None, scratch, f"max_connections={n}")
        )
    if args.baseline_src is not None:
        variants.insert(0, Variant("baseline", args.baseline_src.resolve(), scratch))
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {v.name: {} for v in variants}
    try:
        for r in range(rounds):
            for v in variants:
                if args.only != "http":
                    for threads in args.threads or THREADS:
                        progress(f"round {r + 1}: {v.name}, engine, {threads} threads")
                        row = engine_round(v, threads, seconds)
                        raw[v.name].setdefault(f"engine/{threads}", []).append(row)
                if args.only != "engine":
                    for server in ("granian", "gunicorn-gthread"):
                        progress(f"round {r + 1}: {v.name}, http, {server}")
                        row = http_round(v, server, seconds)
                        raw[v.name].setdefault(f"http/{server}", []).append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rounds": rounds,
        "seconds": seconds,
        "variants": {
            name: {case: summarize(rows) for case, rows in cases.items()}
            for name, cases in raw.items()
        },
    }
    results["table"] = report(results)  # as report.py puts it in RESULTS.md
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])


def report(results: dict[str, Any]) -> str:
    """A Markdown table: every case, each variant's medians (min-max)."""
    variants = list(results["variants"])
    lines = [
        "| case | " + " | ".join(f"{v}: rate/s · server threads · connections" for v in variants)
        + " |",
        "|---|" + "---|" * len(variants),
    ]  # fmt: skip
    cases = results["variants"][variants[-1]]
    for case in cases:
        cells = []
        for v in variants:
            row = results["variants"][v].get(case)
            if row is None:
                cells.append("")
                continue
            rate = row.get("incr_per_s") or row["requests_per_s"]
            cells.append(
                f"{rate['median']:,.0f} ({rate['min']:,.0f}–{rate['max']:,.0f}) · "
                f"{row['server_threads']['max']} · {row['connections']['max']}"
            )
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if len(variants) >= 2:
        lines.append("")
        base = variants[0]
        for v in variants[1:]:
            for case in cases:
                old, new = results["variants"][base].get(case), results["variants"][v].get(case)
                if old and new:
                    key = "incr_per_s" if "incr_per_s" in new else "requests_per_s"
                    ratio = new[key]["median"] / old[key]["median"]
                    lines.append(f"- {case}: {v} / {base} = {ratio:.2f}×")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
