"""Engine-level benchmarks: latency, throughput and scale, side by side.

Everything is measured in one run, interleaved in rounds, so that the noise of
a shared machine hits every engine alike; the report gives ratios against the
baselines of the same run (the bare ``multiprocessing.connection`` echo,
redis-py with hiredis, and psycopg on one connection for the PostgreSQL
engine), medians over rounds, and the spread.

    python benchmarks/engines.py --out benchmarks/results/engines.json [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Client, Listener
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from shared_core import AsyncSharedState, SharedState
from shared_core.testing import PostgresServer, RedisServer, free_port, private_dir

SPAWN = multiprocessing.get_context("spawn")
VALUE = "v" * 100  # the 100-byte value of get and set
ECHO_REQUEST: tuple[str, str, tuple[str, int], dict[str, Any]] = ("store", "incr", ("k", 1), {})
# The raw psycopg baseline: a table of its own shaped like the engine's
# (text key, bigint or bytea value), and the same kind of statement per call,
# so that engine / psycopg is what the engine adds over the bare driver.
RAW_TABLE = 'CREATE TABLE IF NOT EXISTS bench_raw (key text COLLATE "C" PRIMARY KEY, num bigint, data bytea)'
RAW_INCR = (
    "INSERT INTO bench_raw AS t (key, num) VALUES (%s, %s) "
    "ON CONFLICT (key) DO UPDATE SET num = t.num + EXCLUDED.num RETURNING num"
)
RAW_GET = "SELECT num, data FROM bench_raw WHERE key = %s"
RAW_SET = (
    "INSERT INTO bench_raw (key, data) VALUES (%s, %s) "
    "ON CONFLICT (key) DO UPDATE SET num = NULL, data = EXCLUDED.data"
)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the things measured -----------------------------------------------------


def _echo_server(address: str, authkey: bytes) -> None:
    # Like the state server: a thread per connection, a reply per request.
    with Listener(address, authkey=authkey, backlog=64) as listener:
        while True:
            conn = listener.accept()
            threading.Thread(target=_echo_loop, args=(conn,), daemon=True).start()


def _echo_loop(conn: Any) -> None:
    try:
        while True:
            request = conn.recv()
            conn.send(("#RETURN", request[2][1]))
    except EOFError:
        pass


class Setup:
    """The servers every measurement talks to, started once."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        os.environ["XDG_RUNTIME_DIR"] = str(workdir)
        os.environ["XDG_STATE_HOME"] = str(workdir)  # secrets of its servers too
        self.authkey = os.urandom(32)
        self.echo_address = str(workdir / "echo.sock")
        self.echo = SPAWN.Process(
            target=_echo_server, args=(self.echo_address, self.authkey), daemon=True
        )
        self.echo.start()
        while not os.path.exists(self.echo_address):
            time.sleep(0.01)
        self.redis = RedisServer(workdir, port=free_port()).start()
        self.manager_url = "local://bench?linger=30"
        self.redis_unix = f"redis+unix://{self.redis.socket}?app=bench"
        self.redis_tcp = f"redis://127.0.0.1:{self.redis.port}/0?app=bench"
        self.plain_manager = SyncManager(address=str(workdir / "plain.sock"), authkey=self.authkey)
        self.plain_manager.start()
        self.plain_dict = self.plain_manager.dict()
        self.plain_lock = self.plain_manager.Lock()
        self.diskcache_dir = str(workdir / "diskcache")
        # A directory of its own: run as root, PostgreSQL runs as another
        # user, who cannot enter the 0700 workdir.
        self.postgres_dir = private_dir("bench-pg-")
        self.postgres = PostgresServer(self.postgres_dir).start()
        self.postgres_url = self.postgres.url("bench")
        self.postgres_conninfo = (
            f"host={self.postgres.socket_dir} port={self.postgres.port} "
            "user=postgres dbname=postgres"
        )
        with psycopg.connect(self.postgres_conninfo, autocommit=True) as conn:
            conn.execute(RAW_TABLE)

    def server_pids(self) -> list[int]:
        assert self.redis.proc is not None
        assert self.echo.pid is not None
        manager = SharedState(self.manager_url).info()["pid"]
        plain = self.plain_manager._process.pid  # type: ignore[attr-defined]
        # The postmaster and its helpers: new backends inherit its affinity.
        postgres = [p.pid for p in self.postgres.processes()]
        return [self.redis.proc.pid, self.echo.pid, manager, plain, *postgres]

    def close(self) -> None:
        self.plain_manager.shutdown()
        self.redis.stop()
        self.postgres.stop()
        shutil.rmtree(self.postgres_dir, ignore_errors=True)
        self.echo.terminate()


def raw_postgres(conninfo: str) -> psycopg.Connection[Any]:
    """The baseline's client: one connection, autocommit, no pool."""
    return psycopg.connect(conninfo, autocommit=True)


def sync_ops(setup: Setup, engine: str) -> dict[str, Callable[[], Any]]:
    """For one engine: incr, get and set of one key, as plain calls."""
    if engine == "echo":
        conn = Client(setup.echo_address, authkey=setup.authkey)

        def echo() -> Any:
            conn.send(ECHO_REQUEST)
            return conn.recv()

        return {"incr": echo, "get": echo, "set": echo}
    if engine.startswith("shared_core"):
        url = {
            "shared_core manager": setup.manager_url,
            "shared_core redis unix": setup.redis_unix,
            "shared_core redis tcp": setup.redis_tcp,
            "shared_core postgres unix": setup.postgres_url,
        }[engine]
        state = SharedState(url)
        state.set("v", VALUE)
        return {
            "incr": lambda: state.incr("n"),
            "get": lambda: state.get("v"),
            "set": lambda: state.set("v", VALUE),
        }
    if engine == "redis-py + hiredis unix":
        r = redis.Redis(unix_socket_path=str(setup.redis.socket))
        r.set("raw:v", VALUE)
        return {
            "incr": lambda: r.incr("raw:n"),
            "get": lambda: r.get("raw:v"),
            "set": lambda: r.set("raw:v", VALUE),
        }
    if engine == "psycopg unix":
        pg = raw_postgres(setup.postgres_conninfo)
        pg.execute(RAW_SET, ("raw:v", VALUE.encode()))
        return {
            "incr": lambda: pg.execute(RAW_INCR, ("raw:n", 1)).fetchone(),
            "get": lambda: pg.execute(RAW_GET, ("raw:v",)).fetchone(),
            "set": lambda: pg.execute(RAW_SET, ("raw:v", VALUE.encode())),
        }
    if engine.startswith("SyncManager DictProxy"):
        d, lock = setup.plain_dict, setup.plain_lock
        d["n"] = 0
        d["v"] = VALUE

        def locked_incr() -> None:
            with lock:
                d["n"] += 1

        def bare_incr() -> None:
            d["n"] += 1

        incr = bare_incr if engine.endswith("no lock") else locked_incr
        return {"incr": incr, "get": lambda: d["v"], "set": lambda: d.__setitem__("v", VALUE)}
    if engine == "diskcache":
        import diskcache

        cache = diskcache.Cache(setup.diskcache_dir)
        cache.set("v", VALUE)
        return {
            "incr": lambda: cache.incr("n"),
            "get": lambda: cache.get("v"),
            "set": lambda: cache.set("v", VALUE),
        }
    raise ValueError(engine)


def async_ops(setup: Setup, engine: str) -> tuple[AsyncSharedState, dict[str, Callable[[], Any]]]:
    url = {
        "shared_core manager async": setup.manager_url,
        "shared_core redis unix async": setup.redis_unix,
        "shared_core postgres unix async": setup.postgres_url,
    }[engine]
    state = AsyncSharedState(url)
    return state, {
        "incr": lambda: state.incr("n"),
        "get": lambda: state.get("v"),
        "set": lambda: state.set("v", VALUE),
    }


SYNC_ENGINES = [
    "echo",
    "shared_core manager",
    "shared_core redis unix",
    "shared_core redis tcp",
    "redis-py + hiredis unix",
    "shared_core postgres unix",
    "psycopg unix",
    "SyncManager DictProxy + Lock",
    "diskcache",
]
ASYNC_ENGINES = [
    "shared_core manager async",
    "shared_core redis unix async",
    "shared_core postgres unix async",
]


def percentiles(samples: list[int]) -> tuple[float, float]:
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def time_sync(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        t = clock()
        fn()
        samples.append(clock() - t)
    return percentiles(samples)


async def time_async(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        t = clock()
        await fn()
        samples.append(clock() - t)
    return percentiles(samples)


def latency(setup: Setup, rounds: int, calls: int) -> dict[str, Any]:
    """p50/p99 in µs per engine and operation: medians over rounds, and spread."""
    ops = {e: sync_ops(setup, e) for e in SYNC_ENGINES}
    loop = asyncio.new_event_loop()
    loops = {e: loop for e in ASYNC_ENGINES}
    astates, aops = {}, {}
    for e in ASYNC_ENGINES:
        astates[e], aops[e] = async_ops(setup, e)
    try:  # uvicorn runs on uvloop when it is installed (uvicorn[standard])
        import uvloop

        name = "shared_core manager async, uvloop"
        loops[name] = uvloop.new_event_loop()
        astates[name], aops[name] = async_ops(setup, "shared_core manager async")
    except ImportError:
        pass
    for engine, fns in aops.items():
        loops[engine].run_until_complete(fns["set"]())
    raw: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in range(rounds):
        progress(f"latency round {r + 1}/{rounds}")
        for engine, fns in ops.items():
            for op, fn in fns.items():
                for _ in range(50):  # warm up
                    fn()
                raw.setdefault(engine, {}).setdefault(op, []).append(time_sync(fn, calls))
        for engine, fns in aops.items():
            for op, fn in fns.items():
                result = loops[engine].run_until_complete(time_async(fn, calls))
                raw.setdefault(engine, {}).setdefault(op, []).append(result)
    # Closed in their loops: a pool's tasks left pending there warn at exit.
    for engine, state in astates.items():
        loops[engine].run_until_complete(state.aclose())
    summary: dict[str, Any] = {}
    for engine, by_op in raw.items():
        for op, rows in by_op.items():
            p50s = [p50 for p50, _ in rows]
            summary.setdefault(engine, {})[op] = {
                "p50_us": statistics.median(p50s),
                "p99_us": statistics.median(p99 for _, p99 in rows),
                "p50_min_us": min(p50s),
                "p50_max_us": max(p50s),
            }
    return summary


# --- throughput: N client processes on one key --------------------------------


def _worker(setup_info: dict[str, Any], engine: str, seconds: float, start: Any, out: Any) -> None:
    os.environ["XDG_RUNTIME_DIR"] = os.environ["XDG_STATE_HOME"] = setup_info["workdir"]
    if engine == "shared_core manager async":
        out.put(asyncio.run(_async_worker(setup_info["manager_url"], seconds, start)))
        return
    fn = _incr_fn(setup_info, engine)
    start.wait()
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(20):
            fn()
        done += 20
    out.put(done)


async def _async_worker(url: str, seconds: float, start: Any) -> int:
    state = AsyncSharedState(url)
    await state.incr("tp")
    start.wait()
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        # 32 concurrent calls per process, as an async app under load makes.
        await asyncio.gather(*(state.incr("tp") for _ in range(32)))
        done += 32
    return done + 1


def _incr_fn(info: dict[str, Any], engine: str) -> Callable[[], Any]:
    if engine == "shared_core manager":
        state = SharedState(info["manager_url"])
        return lambda: state.incr("tp")
    if engine == "shared_core redis unix":
        state = SharedState(info["redis_unix"])
        return lambda: state.incr("tp")
    if engine == "redis-py + hiredis unix":
        r = redis.Redis(unix_socket_path=info["redis_socket"])
        return lambda: r.incr("bench:raw:tp")  # a plain Redis integer of its own
    if engine == "shared_core postgres unix":
        state = SharedState(info["postgres_url"])
        # Its pool opens on first use: before the clock starts, as the
        # baseline's connection does (a read, which leaves the count alone).
        state.get("tp")
        return lambda: state.incr("tp")
    if engine == "psycopg unix":
        conn = raw_postgres(info["postgres_conninfo"])
        return lambda: conn.execute(RAW_INCR, ("tp", 1)).fetchone()
    if engine == "diskcache":
        import diskcache

        cache = diskcache.Cache(info["diskcache_dir"])
        return lambda: cache.incr("tp")
    raise ValueError(engine)


def _plain_worker(info: dict[str, Any], locked: bool, seconds: float, start: Any, out: Any) -> None:
    from multiprocessing.managers import (  # type: ignore[attr-defined]
        AcquirerProxy,
        BaseManager,
        DictProxy,
    )

    class PlainClient(BaseManager):
        pass

    PlainClient.register("get_dict", proxytype=DictProxy)
    PlainClient.register("get_lock", proxytype=AcquirerProxy)
    m = PlainClient(address=info["plain_address"], authkey=info["authkey"])
    m.connect()
    d, lock = m.get_dict(), m.get_lock()  # type: ignore[attr-defined]
    start.wait()
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(20):
            if locked:
                with lock:
                    d["tp"] += 1
            else:
                d["tp"] += 1
        done += 20
    out.put(done)


def _plain_server(address: str, authkey: bytes, ready: Any) -> None:
    from multiprocessing.managers import (  # type: ignore[attr-defined]
        AcquirerProxy,
        BaseManager,
        DictProxy,
    )

    shared: dict[str, int] = {"tp": 0}
    lock = threading.Lock()

    class PlainServer(BaseManager):
        pass

    PlainServer.register("get_dict", lambda: shared, DictProxy)
    PlainServer.register("get_lock", lambda: lock, AcquirerProxy)
    server = PlainServer(address=address, authkey=authkey).get_server()
    ready.set()
    server.serve_forever()


THROUGHPUT_ENGINES = [
    "shared_core manager",
    "shared_core manager async",
    "shared_core redis unix",
    "redis-py + hiredis unix",
    "shared_core postgres unix",
    "psycopg unix",
    "SyncManager DictProxy + Lock",
    "SyncManager DictProxy, no lock",
    "diskcache",
]


def _count(setup: Setup, engine: str, plain_dict: Any) -> int:
    if engine.startswith("shared_core manager"):
        return int(SharedState(setup.manager_url).get("tp", 0))
    if engine == "shared_core redis unix":
        return int(SharedState(setup.redis_unix).get("tp", 0))
    if engine == "redis-py + hiredis unix":
        r = redis.Redis(unix_socket_path=str(setup.redis.socket))
        return int(r.get("bench:raw:tp") or 0)
    if engine == "shared_core postgres unix":
        with SharedState(setup.postgres_url) as state:
            return int(state.get("tp", 0))
    if engine == "psycopg unix":
        with raw_postgres(setup.postgres_conninfo) as conn:
            row = conn.execute(RAW_GET, ("tp",)).fetchone()
            return int(row[0]) if row else 0
    if engine == "diskcache":
        import diskcache

        return int(diskcache.Cache(setup.diskcache_dir).get("tp", 0))
    return int(plain_dict["tp"])


def _reset(setup: Setup, engine: str, plain_dict: Any) -> None:
    if engine.startswith("shared_core manager"):
        SharedState(setup.manager_url).set("tp", 0)
    elif engine == "shared_core redis unix":
        SharedState(setup.redis_unix).set("tp", 0)
    elif engine == "redis-py + hiredis unix":
        redis.Redis(unix_socket_path=str(setup.redis.socket)).set("bench:raw:tp", 0)
    elif engine == "shared_core postgres unix":
        with SharedState(setup.postgres_url) as state:
            state.set("tp", 0)
    elif engine == "psycopg unix":
        with raw_postgres(setup.postgres_conninfo) as conn:
            conn.execute("DELETE FROM bench_raw WHERE key = 'tp'")
    elif engine == "diskcache":
        import diskcache

        diskcache.Cache(setup.diskcache_dir).set("tp", 0)
    else:
        plain_dict["tp"] = 0


def throughput(setup: Setup, clients: list[int], seconds: float, rounds: int) -> dict[str, Any]:
    """Aggregate incr/s of one key from N processes, and the count check."""
    plain_address = str(setup.workdir / "plain-tp.sock")
    ready = SPAWN.Event()
    plain = SPAWN.Process(target=_plain_server, args=(plain_address, setup.authkey, ready))
    plain.daemon = True
    plain.start()
    ready.wait(30)

    from multiprocessing.managers import BaseManager, DictProxy

    class Reader(BaseManager):
        pass

    Reader.register("get_dict", proxytype=DictProxy)
    reader = Reader(address=plain_address, authkey=setup.authkey)
    reader.connect()
    plain_dict = reader.get_dict()  # type: ignore[attr-defined]
    info = {
        "workdir": str(setup.workdir),
        "manager_url": setup.manager_url,
        "redis_unix": setup.redis_unix,
        "redis_socket": str(setup.redis.socket),
        "postgres_url": setup.postgres_url,
        "postgres_conninfo": setup.postgres_conninfo,
        "diskcache_dir": setup.diskcache_dir,
        "plain_address": plain_address,
        "authkey": setup.authkey,
    }
    results: dict[str, Any] = {}
    for r in range(rounds):
        for n in clients:
            progress(f"throughput round {r + 1}/{rounds}, {n} clients")
            for engine in THROUGHPUT_ENGINES:
                _reset(setup, engine, plain_dict)
                start, out = SPAWN.Event(), SPAWN.Queue()
                if engine.startswith("SyncManager"):
                    locked = engine == "SyncManager DictProxy + Lock"
                    target: Any = _plain_worker
                    args: tuple[Any, ...] = (info, locked, seconds, start, out)
                else:
                    target, args = _worker, (info, engine, seconds, start, out)
                procs = [SPAWN.Process(target=target, args=args) for _ in range(n)]
                for p in procs:
                    p.start()
                time.sleep(0.3 + 0.1 * n)  # let them connect before the clock starts
                start.set()
                done = sum(out.get(timeout=120) for _ in procs)
                for p in procs:
                    p.join(30)
                counted = _count(setup, engine, plain_dict)
                row = results.setdefault(engine, {}).setdefault(str(n), [])
                row.append({"ops_s": done / seconds, "done": done, "counted": counted})
    plain.terminate()
    summary: dict[str, Any] = {}
    for engine, by_n in results.items():
        for n, rows in by_n.items():
            rates = [row["ops_s"] for row in rows]
            summary.setdefault(engine, {})[n] = {
                "ops_s": statistics.median(rates),
                "ops_s_min": min(rates),
                "ops_s_max": max(rates),
                "done": sum(row["done"] for row in rows),
                "counted": sum(row["counted"] for row in rows),
            }
    return summary


# --- scale: latency with many keys, and memory --------------------------------


async def _fill_manager(url: str, n: int) -> None:
    state = AsyncSharedState(url)
    batch = 2000
    for start in range(0, n, batch):
        await asyncio.gather(
            *(state.set(f"key:{i}", i) for i in range(start, min(n, start + batch)))
        )
    await state.aclose()


def scale(setup: Setup, sizes: list[int], calls: int, rounds: int) -> dict[str, Any]:
    """incr/get p50 with N keys stored, each size in its own server, measured
    in interleaved rounds on one core like the latency; and the server's RSS."""
    r = redis.Redis(unix_socket_path=str(setup.redis.socket), db=0)
    states: dict[tuple[str, int], SharedState] = {}
    redis_rss: dict[int, float] = {}
    for n in sizes:
        progress(f"scale: filling {n:,} keys")
        url = f"local://scale{n}?linger=60"
        asyncio.run(_fill_manager(url, n))
        states["shared_core manager", n] = SharedState(url)
        # Redis: one database per size, filled in batches through the engine.
        db = sizes.index(n) + 1
        redis.Redis(unix_socket_path=str(setup.redis.socket), db=db).flushdb()
        redis_url = f"redis+unix://{setup.redis.socket}?app=scale&db={db}"
        redis_state = states["shared_core redis unix", n] = SharedState(redis_url)
        for start in range(0, n, 10000):
            redis_state.set_many({f"key:{i}": i for i in range(start, min(n, start + 10000))})
        # One Redis holds every size: its RSS after this fill is cumulative.
        redis_rss[n] = r.info("memory")["used_memory_rss"] / 2**20
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for i in range(rounds):
        progress(f"scale round {i + 1}/{rounds}")
        for key, state in states.items():
            incr = time_sync(partial(state.incr, "key:1"), calls)[0]
            get = time_sync(partial(state.get, "key:2"), calls)[0]
            samples.setdefault(key, []).append((incr, get))
    results: dict[str, Any] = {}
    for (engine, n), rows in samples.items():
        if engine == "shared_core manager":
            pid = states[engine, n].info()["pid"]
            rss = psutil.Process(pid).memory_info().rss / 2**20
        else:
            rss = redis_rss[n]
        results.setdefault(engine, {})[str(n)] = {
            "incr_p50_us": statistics.median(incr for incr, _ in rows),
            "get_p50_us": statistics.median(get for _, get in rows),
            "rss_mb": rss,
        }
    for state in states.values():
        state.close()
    return results


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "redis_py": redis.__version__,
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engines.json"))
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    args = parser.parse_args()
    rounds, calls, seconds = (2, 500, 0.5) if args.quick else (5, 3000, 2.0)
    sizes = [10, 10_000, 100_000] if args.quick else [10, 10_000, 1_000_000]
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    all_cpus = os.sched_getaffinity(0)
    # Latency: client and every server on one core, so that
    # cross-core wake-ups (45-50 µs on a 2-core VM) do not drown the differences.
    os.sched_setaffinity(0, {min(all_cpus)})
    setup = Setup(workdir)
    try:
        info = machine()
        server_info = redis.Redis(unix_socket_path=str(setup.redis.socket)).info("server")
        info["redis_server"] = server_info["redis_version"]
        with raw_postgres(setup.postgres_conninfo) as conn:
            info["postgres_server"] = conn.info.parameter_status("server_version")
        lat = latency(setup, rounds, calls)
        scaled = scale(setup, sizes, calls, rounds)
        # Throughput: every core, for the clients and the servers.
        os.sched_setaffinity(0, all_cpus)
        for pid in setup.server_pids():
            os.sched_setaffinity(pid, all_cpus)
        results = {
            "machine": info,
            "settings": {
                "rounds": rounds,
                "calls": calls,
                "seconds": seconds,
                "latency_and_scale_pinned_to_one_core": True,
            },
            "latency": lat,
            "throughput": throughput(setup, [1, 2, 4, 8], seconds, max(1, rounds - 2)),
            "scale": scaled,
        }
    finally:
        setup.close()
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
