"""Durable writes: `incr` throughput by fsync policy, embedded log vs Redis AOF.

N client processes (1, 4, 8; spawned) increment one shared key, as the
workers of the HTTP apps do, against eight servers started fresh for the run:

- the embedded engine (``local://``): memory only, and ``persist=1`` with
  ``fsync=no``, ``everysec`` and ``always`` (the append-only log);
- a real redis-server on a Unix socket, driven by redis-py with hiredis:
  no AOF, and ``appendonly yes`` with ``appendfsync no``, ``everysec`` and
  ``always``.

Every server keeps its files in one temporary directory (``--tmp``, default
the system's), so both engines write to the same disk. The configurations are
measured in rounds, their order rotated each round, so that the noise of a
shared machine hits all alike; each cell is the median over rounds, with the
min-max spread. Nothing is pinned to a core. Also recorded: the machine, the
filesystem of the directory, and the latency of one writer's fdatasync on it.

    python benchmarks/durability.py --out benchmarks/results/durability.json [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import redis
from redis.utils import HIREDIS_AVAILABLE

from shared_core import SharedState
from shared_core.testing import RedisServer

SPAWN = multiprocessing.get_context("spawn")
CLIENTS = [1, 4, 8]
KEY = "tp"
# (key, label, engine, policy): policy None is memory only.
CONFIGS: list[tuple[str, str, str, str | None]] = [
    ("embedded memory", "embedded, memory only", "embedded", None),
    ("embedded no", "embedded, `persist=1&fsync=no`", "embedded", "no"),
    ("embedded everysec", "embedded, `persist=1&fsync=everysec`", "embedded", "everysec"),
    ("embedded always", "embedded, `persist=1&fsync=always`", "embedded", "always"),
    ("redis memory", "Redis, no AOF", "redis", None),
    ("redis no", "Redis, AOF `appendfsync no`", "redis", "no"),
    ("redis everysec", "Redis, AOF `appendfsync everysec`", "redis", "everysec"),
    ("redis always", "Redis, AOF `appendfsync always`", "redis", "always"),
]
# (numerator, denominator, target or None): the ratios of medians reported.
RATIOS: list[tuple[str, str, float | None]] = [
    ("embedded everysec", "embedded memory", 0.90),
    ("embedded no", "embedded memory", None),
    ("embedded always", "redis always", 1.0),
]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the servers -------------------------------------------------------------


class Servers:
    """The eight servers, each fresh, with their files under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # persist=1 keeps the snapshot and log under $XDG_STATE_HOME, the
        # socket under $XDG_RUNTIME_DIR: both in workdir, on Redis's disk.
        self.env = {
            "XDG_RUNTIME_DIR": str(workdir),
            "XDG_STATE_HOME": str(workdir / "state"),
        }
        os.environ.update(self.env)
        for name in ("SHARED_STATE_URL", "SHARED_STATE_AUTHKEY", "SHARED_STATE_AUTHKEY_FILE"):
            os.environ.pop(name, None)
        self.targets: dict[str, str] = {}  # key: state URL or Redis socket
        self.dirs: dict[str, Path] = {}  # key: where its files are
        self.redis: dict[str, RedisServer] = {}
        self.states: dict[str, SharedState] = {}
        self.clients: dict[str, redis.Redis] = {}
        self.embedded_pids: list[int] = []

    def start(self) -> Servers:
        workdir = self.workdir
        for key, _label, engine, policy in CONFIGS:
            app = key.replace(" ", "-")
            if engine == "embedded":
                query = "linger=1" + ("" if policy is None else f"&persist=1&fsync={policy}")
                url = f"local://{app}?{query}"
                state = self.states[key] = SharedState(url)  # starts the server
                self.embedded_pids.append(state.info()["pid"])
                self.targets[key] = url
                self.dirs[key] = workdir / "shared_core" / app
            else:
                folder = workdir / app
                folder.mkdir(mode=0o700)
                server = self.redis[key] = RedisServer(folder, appendfsync=policy).start()
                client = self.clients[key] = redis.Redis(unix_socket_path=str(server.socket))
                client.ping()
                # Check that the server runs with the settings measured.
                got = client.config_get("appendonly")["appendonly"]
                assert got == ("no" if policy is None else "yes"), (key, got)
                if policy is not None:
                    assert client.config_get("appendfsync")["appendfsync"] == policy
                self.targets[key] = str(server.socket)
                self.dirs[key] = folder
        devices = {key: os.stat(folder).st_dev for key, folder in self.dirs.items()}
        assert len(set(devices.values())) == 1, f"not one filesystem: {devices}"
        return self

    def count(self, key: str) -> int:
        if key in self.states:
            return int(self.states[key].get(KEY, 0))
        return int(self.clients[key].get(KEY) or 0)

    def disk_bytes(self) -> dict[str, int]:
        """What each server keeps on disk now (log, AOF, snapshot)."""
        return {
            key: sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            for key, folder in self.dirs.items()
        }

    def redis_version(self) -> str:
        if not self.clients:
            return "not measured"
        return str(next(iter(self.clients.values())).info("server")["redis_version"])

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        for server in self.redis.values():
            server.stop()
        for state in self.states.values():
            state.close()
        # With no client left, each embedded server leaves by itself after its
        # linger (a clean exit: it flushes its log); SIGTERM if it stays.
        procs = []
        for pid in self.embedded_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        _gone, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        _gone, alive = psutil.wait_procs(alive, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


# --- the clients ---------------------------------------------------------------


def _incr_fn(key: str, target: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    """incr of the shared key, and close; connected before it returns."""
    if key.startswith("embedded"):
        state = SharedState(target)
        state.get(KEY)
        return lambda: state.incr(KEY), state.close
    r = redis.Redis(unix_socket_path=target)
    r.ping()
    return lambda: r.incr(KEY), r.close


def _worker(conn: Any, env: dict[str, str], targets: dict[str, str]) -> None:
    os.environ.update(env)
    # Connected to every server for the whole run, so that each has the same
    # idle clients whichever is measured.
    fns = {key: _incr_fn(key, target) for key, target in targets.items()}
    conn.send("ready")
    clock = time.monotonic  # CLOCK_MONOTONIC: one clock for all processes
    while (job := conn.recv()) is not None:
        key, start_at, stop_at = job
        incr = fns[key][0]
        warm = done = 0
        while clock() < start_at:
            incr()
            warm += 1
        while clock() < stop_at:
            incr()
            done += 1
        conn.send((warm, done, clock()))
    for _incr, close in fns.values():
        close()


class Clients:
    """Client processes, spawned once and told what to measure through a pipe."""

    def __init__(self, n: int, servers: Servers) -> None:
        self.conns = []
        self.procs = []
        for _ in range(n):
            parent, child = SPAWN.Pipe()
            proc = SPAWN.Process(
                target=_worker, args=(child, servers.env, servers.targets), daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if not conn.poll(120):
                raise RuntimeError("a client process did not connect within 120 s")
            conn.recv()

    def run(self, key: str, n: int, warmup: float, seconds: float) -> tuple[int, int, float]:
        """n clients: warm up together, then count; (warm-up calls, calls, seconds)."""
        start_at = time.monotonic() + 0.05 + warmup
        conns = self.conns[:n]
        for conn in conns:
            conn.send((key, start_at, start_at + seconds))
        replies = []
        for conn in conns:
            if not conn.poll(seconds + warmup + 120):
                raise RuntimeError(f"{key}: a client process gave no answer")
            replies.append(conn.recv())
        # The last call of each client ends after the deadline: count its time.
        elapsed = max(end for _, _, end in replies) - start_at
        return sum(w for w, _, _ in replies), sum(d for _, d, _ in replies), elapsed

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join()


# --- the measurement -----------------------------------------------------------


def measure(
    servers: Servers, clients: Clients, rounds: int, seconds: float, warmup: float
) -> dict[str, Any]:
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    keys = [key for key, *_ in CONFIGS]
    for r in range(rounds):
        # Rotated, so that no configuration always follows the same one (the
        # kernel writes back the dirty pages of `no` during whatever comes next).
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for n in CLIENTS:
            progress(f"round {r + 1}/{rounds}, {n} clients")
            for key in order:
                before = servers.count(key)
                warm, done, elapsed = clients.run(key, n, warmup, seconds)
                counted = servers.count(key) - before
                rows.setdefault(key, {}).setdefault(str(n), []).append(
                    {"ops_s": done / elapsed, "done": warm + done, "counted": counted}
                )
    summary: dict[str, Any] = {}
    for key, by_n in rows.items():
        for clients_n, runs in by_n.items():
            rates = [run["ops_s"] for run in runs]
            summary.setdefault(key, {})[clients_n] = {
                "ops_s": statistics.median(rates),
                "ops_s_min": min(rates),
                "ops_s_max": max(rates),
                "rounds": rates,
                "done": sum(run["done"] for run in runs),
                "counted": sum(run["counted"] for run in runs),
            }
    return summary


def ratios(tp: dict[str, Any]) -> list[dict[str, Any]]:
    """Ratios of medians; the spread is that of the ratio within each round."""
    out = []
    for num, den, target in RATIOS:
        if num not in tp or den not in tp:  # left out by --only
            continue
        by_n = {}
        for n in tp[num]:
            a, b = tp[num][n], tp[den][n]
            paired = [x / y for x, y in zip(a["rounds"], b["rounds"], strict=True)]
            by_n[n] = {
                "ratio": a["ops_s"] / b["ops_s"],
                "round_min": min(paired),
                "round_max": max(paired),
            }
        out.append({"num": num, "den": den, "target": target, "by_clients": by_n})
    return out


def fdatasync_probe(folder: Path, seconds: float) -> dict[str, Any]:
    """One writer: append 64 bytes and fdatasync, again and again (µs)."""
    path = folder / "probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples: list[float] = []
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(samples) < 20_000:
            t = time.perf_counter_ns()
            os.write(fd, b"x" * 63 + b"\n")
            os.fdatasync(fd)
            samples.append((time.perf_counter_ns() - t) / 1000)
    finally:
        os.close(fd)
        path.unlink()
    samples.sort()
    return {
        "calls": len(samples),
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[int(len(samples) * 0.99)],
        "mean_us": statistics.fmean(samples),
    }


def filesystem(path: Path) -> dict[str, str]:
    """The filesystem holding ``path``: device, type, mount point, options."""
    info = {"path": str(path)}
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        fields = subprocess.run(
            ["df", "-T", "-P", str(path)], capture_output=True, text=True, check=True
        ).stdout.splitlines()[-1]
        parts = fields.split()
        info.update(device=parts[0], type=parts[1], mount=parts[-1])
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind, options, *_ = line.split()
            if mount == info.get("mount") and device == info.get("device"):
                info.update(type=kind, options=options)
    return info


def machine(workdir: Path, redis_version: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "redis_py": redis.__version__,
        "hiredis": bool(HIREDIS_AVAILABLE),
        "redis_server": redis_version,
        "filesystem": filesystem(workdir),
    }


# --- the report ------------------------------------------------------------------


def _k(ops: float) -> str:
    return f"{ops / 1000:.1f}k"


def print_report(results: dict[str, Any]) -> None:
    m, st, tp = results["machine"], results["settings"], results["throughput"]
    fs = m["filesystem"]
    print(
        f"\n{m['date']}: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"kernel {m['kernel']}, redis-server {m['redis_server']}, redis-py {m['redis_py']} "
        f"(hiredis: {'yes' if m['hiredis'] else 'NO'}); nothing pinned"
    )
    print(
        f"files in {fs['path']}: {fs.get('type', '?')} on {fs.get('device', '?')} "
        f"({fs.get('options', '?')})"
    )
    for when, probe in results["fdatasync"].items():
        print(
            f"fdatasync of 64 bytes, one writer, {when}: p50 {probe['p50_us']:.0f} µs, "
            f"p99 {probe['p99_us']:.0f} µs ({probe['calls']} calls)"
        )
    print(
        f"\nincr/s of one shared key, all clients together: median (min-max) over "
        f"{st['rounds']} rounds of {st['seconds']} s\n"
    )
    labels = {key: label.replace("`", "") for key, label, *_ in CONFIGS}
    width = max(len(label) for label in labels.values()) + 2
    print(
        "".ljust(width)
        + "".join(f"{n} client{'s' if n > 1 else ''}".ljust(22) for n in CLIENTS)
        + "counted/done"
    )
    for key, by_n in tp.items():
        cells = [
            f"{_k(row['ops_s'])} ({_k(row['ops_s_min'])}-{_k(row['ops_s_max'])})".ljust(22)
            for row in by_n.values()
        ]
        counted = sum(row["counted"] for row in by_n.values())
        done = sum(row["done"] for row in by_n.values())
        print(labels[key].ljust(width) + "".join(cells) + ("exact" if counted == done else "OFF"))
    print("\nratio of medians (range of the ratio within a round)\n")
    for ratio in results["ratios"]:
        name = f"{labels[ratio['num']]} / {labels[ratio['den']]}"
        cells = [
            f"{n}: {row['ratio']:.2f} ({row['round_min']:.2f}-{row['round_max']:.2f})"
            for n, row in ratio["by_clients"].items()
        ]
        target = ratio["target"]
        verdict = ""
        if target is not None:
            ok = all(row["ratio"] >= target for row in ratio["by_clients"].values())
            verdict = f"  target >= {target:.2f}: {'met' if ok else 'MISSED'}"
        print(f"{name}\n    " + "   ".join(cells) + verdict)
    print(f"\non disk at the end: {results['disk_bytes']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 0.5 s, a smoke run")
    parser.add_argument(
        "--tmp", type=Path, default=None, help="where the servers' files go (default: $TMPDIR)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="WORD",
        help="measure only the configurations whose key holds one of these words "
        "(e.g. --only always: both engines' fsync=always)",
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 5; --quick: 2)")
    parser.add_argument("--seconds", type=float, help="seconds per point (default 1.5)")
    args = parser.parse_args()
    if args.only:
        CONFIGS[:] = [c for c in CONFIGS if any(word in c[0] for word in args.only)]
        if not CONFIGS:
            parser.error(f"--only {' '.join(args.only)}: no configuration matches")
    rounds, seconds, warmup, probe = (2, 0.5, 0.1, 0.3) if args.quick else (5, 1.5, 0.2, 1.0)
    rounds = args.rounds or rounds
    seconds = args.seconds or seconds
    workdir = Path(tempfile.mkdtemp(prefix="dur-", dir=args.tmp))
    servers = clients = None
    try:
        progress(f"starting the servers in {workdir}")
        servers = Servers(workdir)
        servers.start()
        clients = Clients(max(CLIENTS), servers)
        results: dict[str, Any] = {
            "machine": machine(workdir, servers.redis_version()),
            "settings": {
                "rounds": rounds,
                "seconds": seconds,
                "warmup": warmup,
                "clients": CLIENTS,
                "key": "one key shared by all clients",
                "pinned": False,
            },
            "configs": {
                key: {"label": label, "engine": engine, "policy": policy}
                for key, label, engine, policy in CONFIGS
            },
            "fdatasync": {"before": fdatasync_probe(workdir, probe)},
        }
        results["throughput"] = measure(servers, clients, rounds, seconds, warmup)
        results["fdatasync"]["after"] = fdatasync_probe(workdir, probe)
        results["ratios"] = ratios(results["throughput"])
        results["disk_bytes"] = servers.disk_bytes()
    finally:
        if clients is not None:
            clients.close()
        if servers is not None:
            servers.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
