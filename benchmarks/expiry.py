"""Expiry and batch calls on the embedded engine, each against a baseline
measured in the same run.

- ``get_many`` of 100 keys against 100 ``get`` calls (one round trip vs 100);
- a mass expiry: 1,000,000 keys with a 1 s ttl. Printed: the state server's
  RSS before the keys, with them, and each second after they expire (target:
  back near the baseline within 10 s), and another client's ``incr``
  latency (p50 and p99) while the server reclaims them, against the same
  client's idle latency measured just before (target: p99 at most 2x).

    python benchmarks/expiry.py [--keys 1000000] [--json out.json]

Figures are whole round trips, client and server unpinned; compare the
ratios, not the absolute numbers, across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from typing import Any

import psutil

from shared_core import SharedState


def _lat(fn: Any, calls: int) -> list[float]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        t = clock()
        fn()
        samples.append((clock() - t) / 1000)
    return samples


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def batches(state: SharedState, rounds: int) -> dict[str, float]:
    keys = [f"b{i}" for i in range(100)]
    state.set_many({k: "v" * 100 for k in keys})
    many, single = [], []
    for _ in range(rounds):
        many += _lat(lambda: state.get_many(keys), 50)
        single += _lat(lambda: [state.get(k) for k in keys], 50)
    return {
        "get_many_100_p50_us": statistics.median(many),
        "get_x100_p50_us": statistics.median(single),
        "ratio": statistics.median(single) / statistics.median(many),
    }


def mass_expiry(state: SharedState, n: int, ttl: float) -> dict[str, Any]:
    server = psutil.Process(int(state.info()["pid"]))
    mib = 1024 * 1024
    baseline = server.memory_info().rss / mib
    chunk = 10_000
    for start in range(0, n, chunk):
        state.set_many({f"x{i}": b"v" * 16 for i in range(start, start + chunk)}, ttl=ttl)
    full = server.memory_info().rss / mib
    # Idle latency of another client first, then wait for the deadline.
    probe = SharedState(state.url)
    idle = _lat(lambda: probe.incr("probe"), 5000)
    filled = time.monotonic()
    time.sleep(max(0.0, ttl - (time.monotonic() - filled)) + 0.05)
    expired_at = time.monotonic()
    during: list[float] = []
    rss: list[tuple[float, float]] = []
    reclaimed_after = None
    while time.monotonic() - expired_at < 12:
        during += _lat(lambda: probe.incr("probe"), 500)
        now = time.monotonic() - expired_at
        if not rss or now - rss[-1][0] >= 0.5:
            rss.append((round(now, 1), round(server.memory_info().rss / mib, 1)))
            info = state.info()
            if reclaimed_after is None and info["expiring"] == 0:
                reclaimed_after = round(now, 2)
    # The latency during the sweep: the samples taken until it was done.
    sweep_samples = during[: max(500, int(len(during) * (reclaimed_after or 12) / 12))]
    return {
        "keys": n,
        "rss_baseline_mib": round(baseline, 1),
        "rss_full_mib": round(full, 1),
        "rss_after_mib": rss,
        "all_reclaimed_after_s": reclaimed_after,
        "incr_idle_p50_us": round(statistics.median(idle), 1),
        "incr_idle_p99_us": round(_pct(idle, 0.99), 1),
        "incr_sweep_p50_us": round(statistics.median(sweep_samples), 1),
        "incr_sweep_p99_us": round(_pct(sweep_samples, 0.99), 1),
        "p99_ratio": round(_pct(sweep_samples, 0.99) / _pct(idle, 0.99), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="bx")
    os.environ["XDG_STATE_HOME"] = os.environ["XDG_RUNTIME_DIR"]
    state = SharedState(f"local://bench{uuid.uuid4().hex[:6]}?linger=1")
    result = {"batches": batches(state, args.rounds)}
    b = result["batches"]
    print(
        f"get_many(100): p50 {b['get_many_100_p50_us']:.0f} us; 100 x get: "
        f"{b['get_x100_p50_us']:.0f} us; ratio {b['ratio']:.1f}x"
    )
    m = result["mass_expiry"] = mass_expiry(state, args.keys, args.ttl)
    print(
        f"{m['keys']:,} keys, ttl {args.ttl:g}s: server RSS {m['rss_baseline_mib']} MiB "
        f"before, {m['rss_full_mib']} MiB full; every key reclaimed after "
        f"{m['all_reclaimed_after_s']} s; RSS over time (s, MiB): {m['rss_after_mib']}"
    )
    print(
        f"another client's incr: idle p50 {m['incr_idle_p50_us']} us p99 "
        f"{m['incr_idle_p99_us']} us; during the sweep p50 {m['incr_sweep_p50_us']} us "
        f"p99 {m['incr_sweep_p99_us']} us; p99 ratio {m['p99_ratio']}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
