"""The near cache on the embedded engine and on Redis, each against the same
engine without it, measured in the same run.

- ``get`` p50 of a cached key against an uncached one (the same value, the
  same client; rounds interleaved so that the machine's noise hits both);
  target: cached p50 <= 1 us and >= 20x faster;
- how stale a read can be: 8 reader processes read one cached key in a loop
  while another process writes it (a new int every 2 ms, recording when each
  write was acknowledged). A read is stale when it started after a newer
  write was acknowledged; its lag is how long after. Printed per engine: the
  stale reads, and the lag's p50 / p99 / max over writes (target: p99 <= 1 ms;
  none at all on the embedded engine, whose server counts a write before it
  acknowledges it).

    python benchmarks/near_cache.py [--rounds 5] [--writes 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from roundtrip import p50

from shared_core import SharedState
from shared_core.testing import RedisServer

READERS = 8
KEY = "config:flag"


def gets(url: str, near: str, rounds: int, calls: int) -> dict[str, float]:
    """p50 of get, uncached and cached, in µs (medians over rounds)."""
    with SharedState(url) as plain, SharedState(near) as cached:
        plain.set(KEY, {"on": True, "rollout": 25})
        deadline = time.monotonic() + 10
        engine: Any = cached._engine
        while engine.near.hits == 0 and time.monotonic() < deadline:
            cached.get(KEY)  # Redis: until the listener listens
            time.sleep(0.01)
        uncached_p50, cached_p50 = [], []
        for _ in range(rounds):
            uncached_p50.append(p50(lambda: plain.get(KEY), calls))
            cached_p50.append(p50(lambda: cached.get(KEY), calls * 20))
    u, c = statistics.median(uncached_p50), statistics.median(cached_p50)
    return {"uncached_p50_us": u, "cached_p50_us": c, "speedup": u / c}


def _reader(url: str, acked: Any, acked_at: Any, worst: Any, stale: Any, stop: Any) -> None:
    with SharedState(url) as state:
        mine = [0.0] * len(worst)
        count = 0
        while not stop.is_set():
            floor = acked.value  # acknowledged before this read started
            started = time.time()
            value = state.get(KEY, 0)
            if value < floor:
                write = value + 1  # the first write this read missed
                lag = started - acked_at[write]
                if lag > mine[write]:
                    mine[write] = lag
                count += 1
        with worst.get_lock():
            for i, lag in enumerate(mine):
                if lag > worst[i]:
                    worst[i] = lag
        with stale.get_lock():
            stale.value += count


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def staleness(url: str, near: str, writes: int) -> dict[str, float]:
    """Lags (µs) of stale reads in 8 readers while another process writes."""
    ctx = multiprocessing.get_context("spawn")
    acked = ctx.Value("q", 0, lock=False)
    acked_at = ctx.Array("d", writes + 1, lock=False)
    worst = ctx.Array("d", writes + 1)
    stale, stop = ctx.Value("q", 0), ctx.Event()
    with SharedState(url) as writer:
        writer.set(KEY, 0)
        readers = [
            ctx.Process(target=_reader, args=(near, acked, acked_at, worst, stale, stop))
            for _ in range(READERS)
        ]
        for proc in readers:
            proc.start()
        time.sleep(1.0)  # the readers connect and listen
        for n in range(1, writes + 1):
            writer.set(KEY, n)
            acked_at[n] = time.time()
            acked.value = n
            time.sleep(0.002)
        time.sleep(0.2)
        stop.set()
        for proc in readers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    lags = [worst[n] * 1e6 for n in range(1, writes + 1)]
    return {
        "writes": writes,
        "stale_reads": stale.value,
        "lag_p50_us": _pct(lags, 0.5),
        "lag_p99_us": _pct(lags, 0.99),
        "lag_max_us": max(lags),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"readers": READERS}
    app = f"bench-near-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="rk-") as workdir:
        redis = RedisServer(Path(workdir)).start()
        try:
            engines = {
                "embedded": f"local://{app}?linger=5",
                "redis": f"redis+unix://{redis.socket}?app={app}",
            }
            for name, url in engines.items():
                sep = "&" if "?" in url else "?"
                near = f"{url}{sep}near_cache=config:"
                results[name] = {
                    "get": gets(url, near, args.rounds, args.calls),
                    "staleness": staleness(url, near, args.writes),
                }
                g, s = results[name]["get"], results[name]["staleness"]
                print(
                    f"{name:9} get p50: uncached {g['uncached_p50_us']:.1f} us, cached "
                    f"{g['cached_p50_us']:.2f} us ({g['speedup']:.0f}x); stale reads "
                    f"{s['stale_reads']} over {s['writes']} writes, lag p50 "
                    f"{s['lag_p50_us']:.0f} us, p99 {s['lag_p99_us']:.0f} us, "
                    f"max {s['lag_max_us']:.0f} us"
                )
        finally:
            redis.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
