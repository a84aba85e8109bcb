"""HTTP-level benchmark: ``POST /increment``, then ``GET /report`` (a read
of the count, kept in each worker by the apps' near cache), on every
pairing, 4 workers.

For each framework × server, three modes in one run: the shared state on the
embedded manager engine, the naive per-worker global (fast and wrong: the
upper bound), and the Redis engine. The load generator is ``wrk`` (Debian's
package): written in C, it keeps 64 connections busy on one core while the
servers use the rest, where a Python client would be the bottleneck itself.
After each shared run the count is checked against wrk's successful requests.

    python -m benchmarks.http_load --out benchmarks/results/http.json [--seconds 5]

(from the repository root, so that the suite's harness, ``tests.harness``,
is importable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from shared_core.testing import RedisServer
from tests.harness import PAIRINGS, Pairing, start, state_servers

# Every framework × server of the suite (not its -redis and -postgres twins);
# each is run in the three modes below, Redis included.
HTTP_PAIRINGS = [name for name in PAIRINGS if not Pairing.parse(name).external]
MODES = ["shared", "naive", "redis"]
POST_LUA = 'wrk.method = "POST"\n'


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    return {
        "requests": requests,
        "rps": rps,
        "p50_ms": _seconds(p50.group(1)) * 1000 if p50 else None,
        "p99_ms": _seconds(p99.group(1)) * 1000 if p99 else None,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def cpu_seconds(d: Any, seconds: int) -> dict[str, float]:
    """Cores used by the workers and by the state server over the middle of a run."""
    time.sleep(min(1.0, seconds / 4))
    master = psutil.Process(d.proc.pid)
    parts = {"workers": master.children(), "state": state_servers(d.runtime_dir)}
    for procs in parts.values():
        for p in procs:
            p.cpu_percent(None)
    window = max(1.0, seconds / 2)
    time.sleep(window)
    used = {}
    for part, procs in parts.items():
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.cpu_percent(None) / 100
        used[part] = total
    return used


def run_one(pairing: str, mode: str, seconds: int, redis_url: str | None) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="hb-"))
    script = workdir / "post.lua"
    script.write_text(POST_LUA)
    state_url = redis_url if mode == "redis" else None
    d = start(
        Pairing.parse(pairing),
        workdir,
        mode="naive" if mode == "naive" else "shared",
        state_url=state_url,
    )
    try:
        httpx.post(f"{d.url}/reset")
        # Warm up every worker (connections, imports) before measuring.
        subprocess.run(
            ["wrk", "-t1", "-c16", "-d1s", "-s", str(script), f"{d.url}/increment"],
            capture_output=True,
            check=True,
        )
        # The warm-up's last requests, dropped by wrk when it stopped, may still
        # run (an async server finishes them): after the reset they would count.
        time.sleep(1.0)
        httpx.post(f"{d.url}/reset")
        wrk = subprocess.Popen(
            ["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", "-s", str(script),
             f"{d.url}/increment"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        cpu = cpu_seconds(d, seconds)
        out, _ = wrk.communicate()
        assert wrk.returncode == 0, out
        result = parse_wrk(out)
        count = httpx.get(f"{d.url}/report").json()["count"]
        result["counted"] = count
        # Where the time goes: CPU per request in the workers and the state server.
        for part, used in cpu.items():
            result[f"{part}_cpu_us"] = used / result["rps"] * 1e6 if result["rps"] else None
        # Then reads of the count the run left: the apps keep it in each worker
        # (a near cache), so /report makes no round trip until the next write.
        reads = subprocess.run(
            ["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", f"{d.url}/report"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result["report"] = parse_wrk(reads.stdout)
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/http.json"))
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--pairings", nargs="*", default=HTTP_PAIRINGS)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    redis_dir = Path(tempfile.mkdtemp(prefix="hbr-"))
    redis = RedisServer(redis_dir).start()
    results: dict[str, Any] = {"seconds": args.seconds, "connections": 64, "workers": 4}
    try:
        total = len(args.pairings) * len(MODES)
        i = 0
        for pairing in args.pairings:
            for mode in MODES:
                i += 1
                progress(f"{i}/{total} {pairing} {mode}")
                url = f"redis+unix://{redis.socket}?app=hb{i}"
                row = run_one(pairing, mode, args.seconds, url)
                results.setdefault("pairings", {}).setdefault(pairing, {})[mode] = row
    finally:
        redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
