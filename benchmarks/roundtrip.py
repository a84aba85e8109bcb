"""Quick check: shared_core ``incr`` p50 against a bare multiprocessing.connection echo.

Both run in this one process against a server process, interleaved in rounds,
so that the machine's noise hits both alike. Prints medians and the ratio.

    python benchmarks/roundtrip.py [--rounds 7] [--calls 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Listener

from shared_core import AsyncSharedState, SharedState


def _echo_server(address: str, authkey: bytes, ready: threading.Event) -> None:
    with Listener(address, authkey=authkey) as listener:
        ready.set()
        with listener.accept() as conn:
            try:
                while True:
                    request = conn.recv()
                    conn.send(("#RETURN", request[2][0]))
            except EOFError:
                pass


def _p50(fn: Callable[[], object], calls: int) -> float:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        t = clock()
        fn()
        samples.append(clock() - t)
    return statistics.median(samples) / 1000


async def _ap50(state: AsyncSharedState, calls: int) -> float:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        t = clock()
        await state.incr("bench")
        samples.append(clock() - t)
    return statistics.median(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="rt")
    os.environ["XDG_RUNTIME_DIR"] = tmp
    authkey = os.urandom(32)
    address = os.path.join(tmp, "echo.sock")
    # The echo server runs in a separate process, like the state server.
    pid = os.fork()
    if pid == 0:
        ready = threading.Event()
        _echo_server(address, authkey, ready)
        os._exit(0)
    while not os.path.exists(address):
        time.sleep(0.01)
    echo = Client(address, authkey=authkey)
    request: tuple[str, str, tuple[str, int], dict[str, object]] = (
        "store",
        "incr",
        ("bench", 1),
        {},
    )

    def echo_call() -> None:
        echo.send(request)
        echo.recv()

    state = SharedState(os.environ.get("RT_URL"), app="roundtrip")
    astate = AsyncSharedState(os.environ.get("RT_URL"), app="roundtrip")
    state.incr("bench")
    loop = asyncio.new_event_loop()
    loop.run_until_complete(astate.incr("bench"))

    rows: dict[str, list[float]] = {"echo": [], "incr": [], "async incr": []}
    for i in range(args.rounds):
        rows["echo"].append(_p50(echo_call, args.calls))
        rows["incr"].append(_p50(lambda: state.incr("bench"), args.calls))
        rows["async incr"].append(loop.run_until_complete(_ap50(astate, args.calls)))
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
    floor = statistics.median(rows["echo"])
    sync = statistics.median(rows["incr"])
    for name, values in rows.items():
        med = statistics.median(values)
        print(
            f"{name:>11}: p50 {med:6.1f} us  (rounds {min(values):.1f}-{max(values):.1f})"
            f"  x{med / floor:.2f} echo  x{med / sync:.2f} sync incr"
        )
    echo.close()
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
