"""Turn the JSON of engines.py, durability.py and http_load.py into RESULTS.md and PNG plots.

python benchmarks/report.py benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "-"


def _check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def latency_table(lat: dict[str, Any]) -> list[str]:
    floor = lat["echo"]["incr"]["p50_us"]
    lines = [
        "| engine | incr p50 | incr p99 | get p50 | set p50 | incr p50 / echo | spread of incr p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine, ops in lat.items():
        incr = ops["incr"]
        lines.append(
            f"| {engine} | {incr['p50_us']:.1f} | {incr['p99_us']:.1f} | "
            f"{ops['get']['p50_us']:.1f} | {ops['set']['p50_us']:.1f} | "
            f"{_ratio(incr['p50_us'], floor)} | {incr['p50_min_us']:.1f}-{incr['p50_max_us']:.1f} |"
        )
    return lines


def postgres_note(lat: dict[str, Any]) -> list[str]:
    """The PostgreSQL engine against psycopg alone, when the run has both."""
    engine, raw = lat.get("shared_core postgres unix"), lat.get("psycopg unix")
    if engine is None or raw is None:
        return []
    ratios = ", ".join(
        f"`{op}` {_ratio(engine[op]['p50_us'], raw[op]['p50_us'])}" for op in ("incr", "get", "set")
    )
    line = (
        "The PostgreSQL engine over psycopg alone (one connection, autocommit, "
        f"the same kind of statement), p50 in this run: {ratios}"
    )
    aio = lat.get("shared_core postgres unix async")
    if aio is not None:
        async_incr = _ratio(aio["incr"]["p50_us"], engine["incr"]["p50_us"])
        line += f"; the async engine's `incr` over the sync one: {async_incr}"
    return [line + ".", ""]


def throughput_table(tp: dict[str, Any]) -> list[str]:
    clients = list(next(iter(tp.values())).keys())
    lines = [
        "| engine | " + " | ".join(f"{n} clients" for n in clients) + " | counted / done |",
        "|---|" + "---|" * len(clients) + "---|",
    ]
    for engine, by_n in tp.items():
        cells = [
            f"{row['ops_s'] / 1000:.1f}k ({row['ops_s_min'] / 1000:.1f}-{row['ops_s_max'] / 1000:.1f})"
            for row in by_n.values()
        ]
        counted = sum(row["counted"] for row in by_n.values())
        done = sum(row["done"] for row in by_n.values())
        lost = f"{counted}/{done}" + (
            "" if counted == done else f" (**{1 - counted / done:.0%} lost**)"
        )
        lines.append(f"| {engine} | " + " | ".join(cells) + f" | {lost} |")
    return lines


def scale_table(sc: dict[str, Any]) -> list[str]:
    lines = [
        "| engine | keys | incr p50 µs | get p50 µs | server RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for engine, by_n in sc.items():
        for n, row in by_n.items():
            lines.append(
                f"| {engine} | {int(n):,} | {row['incr_p50_us']:.1f} | "
                f"{row['get_p50_us']:.1f} | {row['rss_mb']:.0f} |"
            )
    return lines


def durability_ratios(dur: dict[str, Any]) -> list[tuple[str, list[Any], float | None, bool]]:
    """Each ratio of durability.py: its name, its rows by clients, its target,
    and whether every row meets it."""
    labels = {key: c["label"] for key, c in dur["configs"].items()}
    out = []
    for ratio in dur["ratios"]:
        rows = list(ratio["by_clients"].values())
        target = ratio["target"]
        ok = target is None or all(row["ratio"] >= target for row in rows)
        out.append((f"{labels[ratio['num']]} / {labels[ratio['den']]}", rows, target, ok))
    return out


def durability_section(dur: dict[str, Any]) -> list[str]:
    m, st, fs = dur["machine"], dur["settings"], dur["machine"]["filesystem"]
    clients = st["clients"]
    probe = dur["fdatasync"]
    tp = {dur["configs"][key]["label"]: by_n for key, by_n in dur["throughput"].items()}
    lines = [
        "## Durable writes: `incr` throughput by fsync policy (embedded log vs Redis AOF)",
        "",
        f"Measured {m['date']} on {m['cpus']} CPUs ({m['cpu']}), {m['platform']}; "
        f"Python {m['python']}, redis-server {m['redis_server']}, redis-py {m['redis_py']}"
        f"{' with hiredis' if m['hiredis'] else ' (**no hiredis**)'}. N client processes "
        "increment one shared key, as the apps' workers do; ops/s of all clients together, "
        f"median over {st['rounds']} rounds of {st['seconds']} s (the configurations "
        "interleaved, their order rotated each round), spread min-max; nothing pinned. "
        "Every server is fresh and keeps its files in one directory, on "
        f"{fs.get('type', '?')} ({fs.get('device', '?')}), where one writer's `fdatasync` "
        f"of 64 bytes took {probe['before']['p50_us']:.0f} µs p50, "
        f"{probe['before']['p99_us']:.0f} µs p99 (after the run: "
        f"{probe['after']['p50_us']:.0f} and {probe['after']['p99_us']:.0f} µs). Redis is "
        "driven by redis-py directly. Re-run with `python benchmarks/durability.py`.",
        "",
        *throughput_table(tp),
        "",
        "| ratio of medians (range of the ratio within a round) | "
        + " | ".join(f"{n} client{'s' if n > 1 else ''}" for n in clients)
        + " | target | |",
        "|---|" + "---|" * len(clients) + "---|---|",
    ]
    for name, rows, target, ok in durability_ratios(dur):
        cells = " | ".join(
            f"{row['ratio']:.2f}× ({row['round_min']:.2f}-{row['round_max']:.2f})" for row in rows
        )
        goal = "" if target is None else f"≥ {target:.2f}×"
        lines.append(f"| {name} | {cells} | {goal} | {'' if target is None else _check(ok)} |")
    lines += [
        "",
        "`fsync=no` and `everysec` write every entry to the log (`write(2)`) before the "
        "reply, so the death of the server loses nothing acknowledged; `always` also "
        "flushes it to the disk (`fdatasync`) first. Concurrent callers share a `write(2)`, "
        "and with `always` an `fdatasync`, as Redis's `appendfsync always` shares one per "
        "event-loop turn. The embedded server answers each connection on a thread of its "
        "own: with several clients every system call hands the GIL to another thread, and "
        "with `always` each call also waits for a flush and is woken after it (about 6 "
        "context switches per `incr` at 8 clients, against 2 without the log), on top of "
        "the kernel's CPU for each `fdatasync`.",
        "",
    ]
    return lines


def report_table(http: dict[str, Any]) -> tuple[list[str], list[float]]:
    """``GET /report`` per pairing (runs that measured it), and its ratios to naive."""
    lines = [
        "| pairing | shared req/s | naive req/s | redis req/s | shared / naive | redis / naive | shared p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for pairing, modes in http["pairings"].items():
        if "report" not in modes["shared"]:
            continue
        s, n, r = (modes[m]["report"] for m in ("shared", "naive", "redis"))
        ratio, redis_ratio = s["rps"] / n["rps"], r["rps"] / n["rps"]
        ratios += [ratio, redis_ratio]
        bad = sum(m["non_2xx"] for m in (s, n, r)) or any(m["socket_errors"] for m in (s, n, r))
        lines.append(
            f"| {pairing} | {s['rps']:.0f} | {n['rps']:.0f} | {r['rps']:.0f} | {ratio:.0%} | "
            f"{redis_ratio:.0%} | {s['p99_ms']:.1f} | {'**some**' if bad else 'none'} |"
        )
    return lines, ratios


def http_table(http: dict[str, Any]) -> tuple[list[str], list[float]]:
    lines = [
        "| pairing | shared req/s | naive req/s | redis req/s | shared / naive | shared p99 ms | naive p99 ms | count check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for pairing, modes in http["pairings"].items():
        s, n, r = modes["shared"], modes["naive"], modes["redis"]
        ratio = s["rps"] / n["rps"]
        ratios.append(ratio)
        # wrk counts requests answered within its run; up to one per
        # connection more may have been applied when it stopped.
        ok = all(
            m["requests"] <= m["counted"] <= m["requests"] + http["connections"]
            and not m["non_2xx"]
            for m in (s, r)
        )
        lines.append(
            f"| {pairing} | {s['rps']:.0f} | {n['rps']:.0f} | {r['rps']:.0f} | {ratio:.0%} | "
            f"{s['p99_ms']:.1f} | {n['p99_ms']:.1f} | {'exact' if ok else '**off**'} |"
        )
    return lines, ratios


def cpu_table(http: dict[str, Any]) -> list[str]:
    lines = []
    for pairing, modes in http["pairings"].items():
        s, n = modes["shared"], modes["naive"]
        if s.get("workers_cpu_us") is None or n.get("workers_cpu_us") is None:
            continue
        added = s["workers_cpu_us"] + s["state_cpu_us"] - n["workers_cpu_us"]
        lines.append(
            f"| {pairing} | {n['workers_cpu_us']:.0f} | {s['workers_cpu_us']:.0f} | "
            f"{s['state_cpu_us']:.0f} | {added:+.0f} |"
        )
    return lines


def plots(results: dict[str, Any], out: Path) -> list[str]:
    made = []
    lat = results["engines"]["latency"]
    names = list(lat)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(names, [lat[n]["incr"]["p50_us"] for n in names], color="#4477aa")
    ax.set_xlabel("incr p50 latency, µs (lower is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    made.append("latency.png")
    tp = results["engines"]["throughput"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for engine, by_n in tp.items():
        ax.plot(
            [int(n) for n in by_n],
            [row["ops_s"] for row in by_n.values()],
            marker="o",
            label=engine,
        )
    ax.set_xlabel("client processes")
    ax.set_ylabel("incr/s on one key")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    made.append("throughput.png")
    if "http" in results:
        pairings = list(results["http"]["pairings"])
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.27
        for i, mode in enumerate(("shared", "naive", "redis")):
            values = [results["http"]["pairings"][p][mode]["rps"] for p in pairings]
            ax.bar([x + (i - 1) * width for x in range(len(pairings))], values, width, label=mode)
        ax.set_xticks(range(len(pairings)), pairings, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("POST /increment, req/s (4 workers)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "http.png", dpi=110)
        made.append("http.png")
    plt.close("all")
    return made


def connections_section(c: dict[str, Any]) -> list[str]:
    """benchmarks/connections.py: threads per process against connections and throughput."""
    return [
        "## Threaded workers: connections to the state server, and `incr` throughput",
        "",
        f"Python {c['machine']['python']} on {c['machine']['cpus']} CPUs; medians of "
        f"{c['rounds']} rounds of {c['seconds']:g} s (min-max), the variants interleaved; "
        "each variant runs its own state server, started by its own clients. *engine/T*: "
        "4 processes with T threads each, every thread calling `incr` in a loop. "
        "*http/…*: the Flask app, 4 workers × 100 threads (granian `--interface wsgi "
        "--blocking-threads 100`, gunicorn `-k gthread --threads 100`), 400 concurrent "
        "clients posting `/increment`. Server threads and connections: the highest seen "
        "during the run (sampled every 50 ms; connections = the server's sockets minus "
        "its listener). Re-run with `python -m benchmarks.connections --baseline-src "
        "OLD/shared_core/src`.",
        "",
        c["table"],
        "",
    ]


def near_cache_rows(near: dict[str, Any]) -> list[str]:
    """Target rows of the near cache, per engine."""
    rows = []
    for name in ("embedded", "redis"):
        g, st = near[name]["get"], near[name]["staleness"]
        rows.append(
            f"| near cache, {name}: cached `get` p50 ≤ 1 µs and ≥ 20× uncached | "
            f"{g['cached_p50_us']:.2f} µs, {g['speedup']:.0f}× ({g['uncached_p50_us']:.1f} µs) | "
            f"{_check(g['cached_p50_us'] <= 1.0 and g['speedup'] >= 20)} |"
        )
        never = name == "embedded"
        bound = "no stale read at all" if never else "stale for ≤ 1 ms p99 after the ack"
        ok = st["stale_reads"] == 0 if never else st["lag_p99_us"] <= 1000
        rows.append(
            f"| near cache, {name}: {bound} ({near['readers']} readers) | "
            f"{st['stale_reads']} stale reads over {st['writes']} writes; lag p99 "
            f"{st['lag_p99_us']:.0f} µs, max {st['lag_max_us']:.0f} µs | {_check(ok)} |"
        )
    return rows


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    results: dict[str, Any] = {"engines": json.loads((folder / "engines.json").read_text())}
    if (folder / "http.json").exists():
        results["http"] = json.loads((folder / "http.json").read_text())
    if (folder / "durability.json").exists():
        results["durability"] = json.loads((folder / "durability.json").read_text())
    if (folder / "connections.json").exists():
        results["connections"] = json.loads((folder / "connections.json").read_text())
    if (folder / "near_cache.json").exists():
        results["near_cache"] = json.loads((folder / "near_cache.json").read_text())
    eng = results["engines"]
    lat, tp, sc = eng["latency"], eng["throughput"], eng["scale"]
    m, st = eng["machine"], eng["settings"]
    floor = lat["echo"]["incr"]["p50_us"]
    manager = lat["shared_core manager"]["incr"]["p50_us"]
    hiredis = lat["redis-py + hiredis unix"]["incr"]["p50_us"]
    manager_async = lat["shared_core manager async"]["incr"]["p50_us"]
    uv = lat.get("shared_core manager async, uvloop")
    uvloop_note = (
        f"; on uvloop {_ratio(uv['incr']['p50_us'], manager)} ({uv['incr']['p50_us']:.1f} µs)"
        if uv
        else ""
    )
    tp4 = tp["shared_core manager"]["4"]["ops_s"]
    plain4 = tp["SyncManager DictProxy + Lock"]["4"]["ops_s"]
    sizes = list(sc["shared_core manager"])
    small, big = sc["shared_core manager"][sizes[0]], sc["shared_core manager"][sizes[-1]]
    flat = big["incr_p50_us"] / small["incr_p50_us"]

    # Runs from before the PostgreSQL rows have neither.
    postgres_versions = (
        f", PostgreSQL {m['postgres_server']}, psycopg {m['psycopg']}" if "psycopg" in m else ""
    )
    lines = [
        "# Benchmark results",
        "",
        f"Measured {m['date']} on {m['cpus']} CPUs ({m['cpu']}), {m['memory_gb']} GiB, "
        f"{m['platform']}; Python {m['python']}, redis-py {m['redis_py']}, "
        f"redis-server {m.get('redis_server', '?')}{postgres_versions}. Every figure is a median over "
        f"{st['rounds']} rounds run interleaved in one process ({st['calls']} calls each for "
        f"latency, {st['seconds']} s per throughput point); the spread is min-max over rounds. "
        "Latency and scale: the client and every server pinned to one core (so that "
        "cross-core wake-ups do not drown the differences); throughput: all cores, "
        "unpinned. Re-run with `tox -e bench`.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| manager `incr` p50 ≤ 1.25× the echo floor | {_ratio(manager, floor)} "
        f"({manager:.1f} vs {floor:.1f} µs) | {_check(manager <= 1.25 * floor)} |",
        f"| manager `incr` p50 ≤ redis-py + hiredis, Unix socket | {_ratio(manager, hiredis)} "
        f"({manager:.1f} vs {hiredis:.1f} µs) | {_check(manager <= hiredis)} |",
        f"| throughput at 4 clients ≥ 4× a SyncManager's DictProxy + Lock | "
        f"{_ratio(tp4, plain4)} ({tp4 / 1000:.1f}k vs {plain4 / 1000:.1f}k/s) | "
        f"{_check(tp4 >= 4 * plain4)} |",
        f"| async `incr` p50 ≤ 1.5× sync | {_ratio(manager_async, manager)} "
        f"({manager_async:.1f} vs {manager:.1f} µs){uvloop_note} | "
        f"{_check(manager_async <= 1.5 * manager)} |",
        f"| latency flat from {int(sizes[0]):,} to {int(sizes[-1]):,} keys | incr p50 "
        f"{small['incr_p50_us']:.1f} → {big['incr_p50_us']:.1f} µs ({flat:.2f}×) | "
        f"{_check(flat <= 1.25)} |",
    ]
    if "http" in results:
        table, ratios = http_table(results["http"])
        lines.append(
            f"| HTTP `/increment` shared ≥ 85% of naive, every pairing | "
            f"{min(ratios):.0%} to {max(ratios):.0%} | {_check(min(ratios) >= 0.85)} |"
        )
        reads, read_ratios = report_table(results["http"])
        if read_ratios:
            lines.append(
                f"| HTTP `/report` (a cached read) ≥ 95% of naive, every pairing, "
                f"embedded and Redis | {min(read_ratios):.0%} to {max(read_ratios):.0%} | "
                f"{_check(min(read_ratios) >= 0.95)} |"
            )
    if "near_cache" in results:
        lines += near_cache_rows(results["near_cache"])
    if "durability" in results:
        clients = ", ".join(map(str, results["durability"]["settings"]["clients"]))
        for name, rows, target, ok in durability_ratios(results["durability"]):
            if target is not None:
                measured = " / ".join(f"{row['ratio']:.2f}×" for row in rows)
                lines.append(
                    f"| durable writes: {name} ≥ {target:.2f}×, at {clients} clients | "
                    f"{measured} | {_check(ok)} |"
                )
    lines += ["", "## Latency, one client (µs)", "", *latency_table(lat), ""]
    lines += postgres_note(lat)
    lines += ["![latency](latency.png)", ""]
    lines += ["## Throughput: `incr` of one key from N client processes", ""]
    lines += [*throughput_table(tp), "", "![throughput](throughput.png)", ""]
    lines += [
        "The async row runs 32 concurrent calls per process, pipelined on one "
        "connection. *counted / done* checks the final count against the "
        "increments the clients made; the usual multiprocessing answer (a "
        "SyncManager's DictProxy) without its lock loses "
        "updates as soon as two processes write.",
        "",
        "## Scale: latency with many keys, and the server's memory",
        "",
        *scale_table(sc),
        "",
        "Each size has a state server of its own (Redis: a database of its own in one "
        "server, whose RSS is therefore cumulative).",
        "",
    ]
    if "durability" in results:
        lines += durability_section(results["durability"])
    if "connections" in results:
        lines += connections_section(results["connections"])
    if "http" in results:
        h = results["http"]
        lines += [
            f"## HTTP: `POST /increment`, {h['workers']} workers, wrk with "
            f"{h['connections']} connections for {h['seconds']} s",
            "",
            *table,
            "",
            "![http](http.png)",
            "",
            *(
                [
                    f"### `GET /report` after each run, {h['seconds']} s, the same connections",
                    "",
                    "The count the run left, read in every worker through the apps' near "
                    'cache (`near_cache=("count:",)`): no round trip until the next '
                    "write, on the embedded engine and on Redis.",
                    "",
                    *reads,
                    "",
                ]
                if read_ratios
                else []
            ),
            "### Where the time goes",
            "",
            "CPU per request, measured on the processes during each run (µs; the "
            "workers together, and the state server; Redis is not measured):",
            "",
            "| pairing | workers, naive | workers, shared | state server, shared | "
            "added per request |",
            "|---|---|---|---|---|",
            *cpu_table(h),
            "",
            "On this 2-core machine the load generator and all workers keep both cores "
            "busy, so every microsecond a state call costs (in the worker: a socket "
            "write, a wake-up, a read, unpickling; in the server: the same again) comes "
            "straight out of the requests per second: the lighter the request, the larger "
            "the share. A server loop on one thread with a selector instead of a thread "
            "per connection was tried and measured slower (incr p50 35 µs instead of "
            "20 µs, no gain under HTTP load), so it was not kept.",
            "",
        ]
    out = folder.parent
    made = plots(results, out)
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'RESULTS.md'} and {', '.join(made)}")


if __name__ == "__main__":
    main()
