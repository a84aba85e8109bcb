"""Quick check: shared_core ``incr`` and ``get`` p50 against a bare
multiprocessing.connection echo (the floor of any call over a socket), and
the async client's ``incr`` against a bare echo client on the same event
loop (asyncio, and uvloop when installed): the floor of an async call, since
a reply wakes the loop, which then runs the waiting task on its next turn.

All run in this one process against a server process, interleaved in rounds,
so that the machine's noise hits both alike. Prints medians and the ratios.
Pin it to one core (``taskset -c 0``) to leave cross-core wake-ups out.

    python benchmarks/roundtrip.py [--rounds 7] [--calls 5000]

``--against REV`` measures the package of git revision REV too, round by
round in turn with this tree's, and prints each one's ratio to the echo floor
and how the ratio changed: a change must not make a call slower relative to
the floor.

    python benchmarks/roundtrip.py --against HEAD~1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from pathlib import Path

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


def _raw_echo_server(address: str) -> None:
    # Frames as the state server's (4-byte length, pickle), no handshake:
    # what the async echo client below measures is the event loop's cost.
    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(address)
        server.listen()
        while True:  # one connection per event loop
            threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()


class _EchoPipe(asyncio.BufferedProtocol):
    """The least an async client does per call: write, wake on the reply, unpickle."""

    def __init__(self) -> None:
        self.buf = bytearray(65536)
        self.end = 0
        self.waiter: asyncio.Future[object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        if self.end >= 4 and self.end >= 4 + int.from_bytes(self.buf[:4], "big"):
            assert self.waiter is not None
            self.waiter.set_result(pickle.loads(memoryview(self.buf)[4 : self.end]))
            self.end = 0


async def _echo_ap50(address: str, frame: bytes, calls: int) -> float:
    loop = asyncio.get_running_loop()
    transport, pipe = await loop.create_unix_connection(_EchoPipe, address)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        t = clock()
        pipe.waiter = loop.create_future()
        transport.write(frame)
        await pipe.waiter
        samples.append(clock() - t)
    transport.close()
    return statistics.median(samples) / 1000


def p50(fn: Callable[[], object], calls: int) -> float:
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
    parser.add_argument("--against", metavar="REV", help="also measure git revision REV")
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args()
    if args.against:
        compare(args.against, args.rounds, args.calls)
        return

    tmp = tempfile.mkdtemp(prefix="rt")
    os.environ["XDG_RUNTIME_DIR"] = os.environ["XDG_STATE_HOME"] = tmp
    authkey = os.urandom(32)
    address = os.path.join(tmp, "echo.sock")
    raw_address = os.path.join(tmp, "raw.sock")
    # The echo servers run in a separate process, like the state server.
    pid = os.fork()
    if pid == 0:
        ready = threading.Event()
        threading.Thread(target=_raw_echo_server, args=(raw_address,), daemon=True).start()
        _echo_server(address, authkey, ready)
        os._exit(0)
    while not (os.path.exists(address) and os.path.exists(raw_address)):
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

    frame = len(payload := pickle.dumps(request, 5)).to_bytes(4, "big") + payload
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(raw_address)
    raw_buf = bytearray(65536)

    def raw_echo_call() -> None:  # the sync twin of _EchoPipe: write, one read, unpickle
        raw.sendall(frame)
        got = raw.recv_into(raw_buf)
        pickle.loads(memoryview(raw_buf)[4:got])

    state = SharedState(os.environ.get("RT_URL"), app="roundtrip")
    state.incr("bench")
    loops = {"": asyncio.new_event_loop()}
    try:  # uvicorn's loop when it is installed (uvicorn[standard])
        import uvloop

        loops[", uvloop"] = uvloop.new_event_loop()
    except ImportError:
        pass
    astates = {}
    for name, loop in loops.items():
        astates[name] = AsyncSharedState(os.environ.get("RT_URL"), app="roundtrip")
        loop.run_until_complete(astates[name].incr("bench"))

    rows: dict[str, list[float]] = {"echo": [], "incr": [], "get": [], "raw echo": []}
    for i in range(args.rounds):
        rows["echo"].append(p50(echo_call, args.calls))
        rows["raw echo"].append(p50(raw_echo_call, args.calls))
        rows["incr"].append(p50(lambda: state.incr("bench"), args.calls))
        rows["get"].append(p50(lambda: state.get("bench"), args.calls))
        for name, loop in loops.items():
            echo_p50 = loop.run_until_complete(_echo_ap50(raw_address, frame, args.calls))
            rows.setdefault(f"async echo{name}", []).append(echo_p50)
            incr_p50 = loop.run_until_complete(_ap50(astates[name], args.calls))
            rows.setdefault(f"async incr{name}", []).append(incr_p50)
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
    for name, loop in loops.items():
        loop.run_until_complete(astates[name].aclose())
    if args.json:
        print(json.dumps({name: statistics.median(values) for name, values in rows.items()}))
        echo.close()
        raw.close()
        os.waitpid(pid, 0)
        return
    floor = statistics.median(rows["echo"])
    sync = statistics.median(rows["incr"])
    for name, values in rows.items():
        med = statistics.median(values)
        print(
            f"{name:>18}: p50 {med:6.1f} us  (rounds {min(values):.1f}-{max(values):.1f})"
            f"  x{med / floor:.2f} echo  x{med / sync:.2f} sync incr"
        )
    for name in loops:
        echo_ratio = statistics.median(rows[f"async echo{name}"]) / statistics.median(
            rows["raw echo"]
        )
        incr_ratio = statistics.median(rows[f"async incr{name}"]) / sync
        print(
            f"async / sync{name or ', asyncio'}: incr x{incr_ratio:.2f}, "
            f"bare echo x{echo_ratio:.2f} (async echo / raw echo: the loop's own cost)"
        )
    echo.close()
    raw.close()
    os.waitpid(pid, 0)


def compare(rev: str, rounds: int, calls: int) -> None:
    """This tree's package against revision ``rev``'s, one round each in turn."""
    root = Path(__file__).resolve().parent.parent
    old = Path(tempfile.mkdtemp(prefix="rt-old"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", rev, "shared_core/src"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {rev: old / "shared_core" / "src", "this tree": root / "shared_core" / "src"}
        ratios: dict[str, dict[str, list[float]]] = {t: {"incr": [], "get": []} for t in trees}
        for i in range(rounds):
            for tree, src in trees.items():
                env = dict(os.environ, PYTHONPATH=str(src))
                out = subprocess.run(
                    [sys.executable, __file__, "--rounds", "1", "--calls", str(calls), "--json"],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                medians = json.loads(out)
                for call in ("incr", "get"):
                    ratios[tree][call].append(medians[call] / medians["echo"])
            print(f"round {i + 1}/{rounds}", file=sys.stderr)
        for call in ("incr", "get"):
            before = statistics.median(ratios[rev][call])
            after = statistics.median(ratios["this tree"][call])
            spread = ", ".join(
                f"{t} {min(r[call]):.2f}-{max(r[call]):.2f}" for t, r in ratios.items()
            )
            print(
                f"{call:>4} p50 / echo p50: {rev} x{before:.2f}, this tree x{after:.2f} "
                f"({(after / before - 1) * 100:+.1f}%; rounds: {spread})"
            )
    finally:
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    main()
