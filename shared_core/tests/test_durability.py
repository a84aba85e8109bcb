"""The embedded engine's append-only log: nothing acknowledged is lost.

The record format and replay are checked on a bare store; the rest on real
state servers: SIGKILLed at random moments under 8 writer processes, killed
at each step of a compaction, starved of disk space, and given damaged logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import random
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import server_processes
from shared_core import (
    ConfigError,
    PersistenceError,
    SharedState,
    StateError,
    StateUnavailable,
)
from shared_core._config import data_home, resolve
from shared_core.engines.embedded import records
from shared_core.engines.embedded.log import AppendLog, _replay, segment_path, segments
from shared_core.engines.embedded.store import Store
from shared_core.testing import StateServer, kill_and_wait, spawn, wait_for

SPAWN = multiprocessing.get_context("spawn")


# the record format and replay, without a server ---------------------------------


@pytest.mark.parametrize(
    "op",
    [
        records.put("n", 7, None),
        records.put("big", -(10**40), 1.5e9),
        records.put("é\udcff", b"\x00\xff" * 300, None),
        records.delete("k"),
        records.expire("k", 2e9),
        records.expire("k", None),
        records.clear("p:"),
    ],
)
def test_records_round_trip(op: bytes) -> None:
    (decoded,) = records.decode(op)
    again = {
        records.PUT: lambda: records.put(decoded[1], decoded[2], decoded[3]),  # type: ignore[arg-type]
        records.DELETE: lambda: records.delete(decoded[1]),
        records.EXPIRE: lambda: records.expire(decoded[1], decoded[3]),
        records.CLEAR: lambda: records.clear(decoded[1]),
    }[decoded[0]]()
    assert again == op


def test_a_body_that_does_not_decode_is_damage() -> None:
    with pytest.raises(records.Damaged):
        list(records.decode(b"X\x01\x00\x00\x00k"))
    with pytest.raises(records.Damaged):
        list(records.decode(records.put("k", b"value", None)[:-2]))


def _random_writes(store: Store, rng: random.Random, count: int) -> None:
    keys = [f"k{i}" for i in range(40)] + ["p:a", "p:b", "p:c"]
    for _ in range(count):
        key = rng.choice(keys)
        ttl = rng.choice([None, None, 60.0, 0.0001])
        match rng.randrange(12):
            case 0:
                value: int | bytes = rng.randrange(100) if rng.random() < 0.5 else b"b" * 9
                store.set(key, value, ttl)
            case 1:
                store.set_many({k: rng.randrange(9) for k in rng.sample(keys, 3)}, ttl)
            case 2:
                with_version = store.get_versioned(key)[1]
                store.set_if_version(key, b"cas", rng.choice([with_version, None, 1]), ttl)
            case 3:
                store.add(key, rng.randrange(5), ttl)
            case 4:
                store.delete(key)
            case 5:
                store.delete_many(rng.sample(keys, 4))
            case 6:
                with contextlib.suppress(TypeError):
                    store.incr(key, rng.randrange(-3, 4), ttl)
            case 7:
                store.setdefault(key, b"default")
            case 8:
                store.expire(key, rng.choice([None, 30.0, 0.0001]))
            case 9:
                if rng.random() < 0.1:
                    store.clear("p:")
            case 10:
                store.mutate_begin(key, 1)
                store.mutate_end(key, rng.choice([b"mutated", None]), rng.random() < 0.8)
            case _:
                store.get(key)  # reads that expire keys on the way log nothing


def _state(store: Store) -> tuple[dict[str, Any], dict[str, float]]:
    _, data, deadlines, _ = store.dump()
    return data, deadlines


@pytest.mark.parametrize("max_keys", [None, 25])
def test_replaying_the_log_rebuilds_the_store(max_keys: int | None) -> None:
    """Every write method's entries, replayed into an empty store, give the same
    values and deadlines, evictions included."""
    entries: list[bytes] = []
    store = Store(max_keys=max_keys, eviction="allkeys-lru")
    store.attach_journal(entries.append)
    _random_writes(store, random.Random(17), 3000)
    replayed = Store(max_keys=max_keys, eviction="allkeys-lru")
    for body in entries:
        replayed.apply(list(records.decode(body)))
    data, deadlines = _state(store)
    again, again_deadlines = _state(replayed)
    assert again == data
    assert again_deadlines.keys() == deadlines.keys()
    assert all(math.isclose(again_deadlines[k], d, abs_tol=1e-3) for k, d in deadlines.items())
    assert len(entries) > 1000


def test_a_batch_is_one_entry_and_reads_log_nothing() -> None:
    entries: list[bytes] = []
    store = Store()
    store.attach_journal(entries.append)
    store.set_many({"a": 1, "b": 2, "c": 3})
    store.set("gone", 1, ttl=0.0001)
    time.sleep(0.01)
    before = len(entries)
    assert store.get("gone") is None
    assert store.keys("") == ["a", "b", "c"]
    assert len(entries) == before
    assert len(list(records.decode(entries[0]))) == 3


@pytest.mark.parametrize("policy", ["always", "no"])
def test_concurrent_callers_share_writes_and_flushes(
    tmp_path: Path, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 threads increment one counter through a log, as the server's
    connection threads do: every commit returns with its entry durable, the
    file replays to the same value, and callers share flushes and writes."""
    calls = {"write": 0, "fdatasync": 0}
    real_write, real_sync = os.write, os.fdatasync

    def write(fd: int, data: Any) -> int:
        calls["write"] += 1
        return real_write(fd, data)

    def fdatasync(fd: int) -> None:
        calls["fdatasync"] += 1
        real_sync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    path = tmp_path / "s.1.log"
    appendlog = AppendLog(
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), 1, policy, 0
    )
    store = Store()
    store.attach_journal(appendlog.append)
    threads, each, late = 8, 150, []

    def caller() -> None:
        for _ in range(each):
            store.incr("n", 1)
            target = appendlog.appended
            appendlog.commit(target)
            if appendlog.durable < target:
                late.append(target)

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    appendlog.close()
    assert not late
    assert appendlog.durable == appendlog.appended == threads * each
    replayed = Store()
    _replay(path, replayed, last=True)
    assert replayed.get("n") == threads * each
    data = path.read_bytes()
    if policy == "always":  # shared flushes: a lone caller would need one each
        assert 0 < calls["fdatasync"] < threads * each
    # Entries appended meanwhile go out with the first commit, in one write.
    calls["write"] = 0
    appendlog = AppendLog(os.open(path, os.O_WRONLY | os.O_APPEND), 1, policy, len(data))
    store.attach_journal(appendlog.append)
    for _ in range(5):
        store.incr("n", 1)
    appendlog.commit(appendlog.appended - 4)
    assert calls["write"] == 1
    assert appendlog.written == appendlog.durable == 5
    appendlog.close()
    assert len(path.read_bytes()) > len(data)


def test_a_write_cut_mid_entry_is_finished_in_its_own_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full file system (here a file-size limit) cuts a write mid-entry:
    the write is refused, the log does not switch segment under the rest of
    that entry, and once there is room the entry is finished where it
    began, so that each segment replays whole."""
    first, second = tmp_path / "s.1.log", tmp_path / "s.2.log"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    appendlog = AppendLog(os.open(first, flags, 0o600), 1, "no", 0)
    store = Store()
    store.attach_journal(appendlog.append)
    store.incr("n", 1)
    appendlog.commit(appendlog.appended)
    before = first.stat().st_size
    for _ in range(3):
        store.incr("n", 1)
    # Quiet: a log record written to a captured file would hit the limit too.
    monkeypatch.setattr(logging.getLogger("shared_core.server"), "disabled", True)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (before + 10, hard))
    try:
        with pytest.raises(PersistenceError, match="cannot be written"):
            appendlog.commit(appendlog.appended)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert first.stat().st_size == before + 10  # part of an entry is in the file
    new_fd = os.open(second, flags, 0o600)
    with pytest.raises(OSError, match="cut short"):
        appendlog.switch(new_fd, 2)
    appendlog.retry()  # room again: the rest of the entry, then the others
    appendlog.retire(appendlog.switch(new_fd, 2))
    store.incr("n", 1)
    appendlog.commit(appendlog.appended)
    appendlog.close()
    replayed = Store()
    _replay(first, replayed, last=False)  # damage anywhere in it would refuse
    assert replayed.get("n") == 4
    _replay(second, replayed, last=True)
    assert replayed.get("n") == 5


# servers ------------------------------------------------------------------------


def _writer(url: str, index: int, counts: Any, stop: Any) -> None:
    state = SharedState(url)
    while not stop.is_set():
        counts[2 * index + 1] += 1  # attempted, before the call
        try:
            state.incr("n")
        except StateError:
            time.sleep(0.01)
            continue
        counts[2 * index] += 1  # acknowledged, after it


def _value(url: str) -> int:
    def read() -> int | None:
        try:
            with SharedState(url) as probe:
                return int(probe.get("n") or 0) + 1  # +1: 0 is an answer too
        except StateUnavailable:
            return None

    found = wait_for(read, 20, "a state server to answer again")
    assert found is not None
    return found - 1


@pytest.mark.stress
@pytest.mark.parametrize(("fsync", "kills"), [("always", 20), ("everysec", 10), ("no", 5)])
def test_sigkill_at_random_moments_loses_nothing_acknowledged(
    app: str, fsync: str, kills: int
) -> None:
    """Jepsen's counter rule after every kill: acknowledged <= value <= attempted.

    A small log_limit makes compactions frequent, so that kills also land in
    them. Every policy writes the log before replying, so a process crash
    loses nothing with any of them (``always`` also survives a power loss).
    """
    url = f"local://{app}?linger=30&persist=1&fsync={fsync}&log_limit=4096"
    counts = SPAWN.Array("q", 16, lock=False)
    stop = SPAWN.Event()
    writers = [SPAWN.Process(target=_writer, args=(url, i, counts, stop)) for i in range(8)]
    for w in writers:
        w.start()
    rng = random.Random()
    worst = 0
    try:
        wait_for(lambda: all(counts[i] > 20 for i in range(0, 16, 2)), 60, "8 writers writing")
        for _ in range(kills):
            time.sleep(rng.uniform(0.02, 0.4))
            kill_and_wait(server_processes(app))
            acknowledged = sum(counts[0::2])
            value = _value(url)
            attempted = sum(counts[1::2])
            worst = max(worst, acknowledged - value)
            assert acknowledged <= value <= attempted, (acknowledged, value, attempted)
    finally:
        stop.set()
        for w in writers:
            w.join(30)
    print(f"fsync={fsync}: {kills} SIGKILLs, {sum(counts[0::2])} acknowledged, worst loss {worst}")
    files = segments(data_home() / app / "snapshot.json")
    assert 1 <= len(files) <= 3, f"compaction leaves one segment (two mid-way): {files}"


_FAILPOINT = """
import os, signal, sys
from shared_core.engines.embedded import log, snapshot

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

url, phase = sys.argv[1], sys.argv[2]
real_write = snapshot.write
if phase == "switched":  # writes go to the new segment; no snapshot yet
    log.snapshot.write = die
elif phase == "half-written":  # the new snapshot half in its temporary file
    real_json = snapshot.write_json
    def write_json(path, document):
        if path.name != "snapshot.json":
            return real_json(path, document)
        path.with_name(f".{path.name}.{os.getpid()}.tmp").write_text('{"format": "shared')
        die()
    snapshot.write_json = write_json
elif phase == "renamed":  # the new snapshot in place; old segments still there
    def write(*args, **kwargs):
        real_write(*args, **kwargs)
        die()
    log.snapshot.write = write
from shared_core._cli import main
sys.exit(main(["serve", "--url", url]))
"""


@pytest.mark.parametrize("phase", ["switched", "half-written", "renamed"])
def test_a_crash_at_any_step_of_compaction_recovers_the_same_state(
    runtime_dir: Path, phase: str
) -> None:
    workdir = runtime_dir / "cp"
    workdir.mkdir(mode=0o700)
    server = StateServer(workdir, persist=1, fsync="always", log_limit=1024, connect_timeout=1)
    proc = spawn([sys.executable, "-c", _FAILPOINT, server.url, phase])
    wait_for(lambda: (workdir / "state.sock").exists(), 30, "the server to listen")
    acknowledged: dict[str, int] = {}
    state = SharedState(server.url)
    deadline = time.monotonic() + 20
    with pytest.raises(StateUnavailable):
        for i in range(1_000_000):  # until the failpoint kills it at its first compaction
            state.set(f"k{i % 300}", i)
            acknowledged[f"k{i % 300}"] = i
            assert time.monotonic() < deadline, "no compaction within 20 s"
    # The write in flight may have been kept; it was never acknowledged.
    attempted = (f"k{i % 300}", i)
    state.close()
    assert proc.wait(10) == -signal.SIGKILL
    left = sorted(p.name for p in workdir.iterdir())
    snapshot_file = workdir / "snapshot.json"
    if phase == "switched":
        assert segments(snapshot_file) == [1, 2], left
        assert not snapshot_file.exists(), left
    elif phase == "half-written":
        assert any(name.endswith(".tmp") for name in left), left
    else:
        assert json.loads(snapshot_file.read_text())["log"] == 2, left
        assert segments(snapshot_file) == [1, 2], left
    server.start()
    try:
        with SharedState(server.url) as again:
            found = again.get_many(list(acknowledged))
        if found.get(attempted[0]) == attempted[1]:
            found[attempted[0]] = acknowledged[attempted[0]]
        assert found == acknowledged
        if phase == "renamed":  # the segment the snapshot holds is gone now
            assert segments(snapshot_file) == [2]
        assert not any(p.name.endswith(".tmp") for p in workdir.iterdir())
    finally:
        server.stop()


def test_a_full_disk_refuses_writes_and_loses_nothing_acknowledged(runtime_dir: Path) -> None:
    workdir = runtime_dir / "df"
    workdir.mkdir(mode=0o700)
    server = StateServer(workdir, persist=1, fsync="always", log_limit=1 << 30).start()
    assert server.proc is not None
    pid = server.proc.pid
    log_file = segment_path(workdir / "snapshot.json", 1)
    try:
        state = SharedState(server.url)
        state.set("before", b"x" * 100)
        # A file-size limit on the server process acts as a full disk: a
        # write past it fails (EFBIG) once the bytes that fit are written.
        limit = log_file.stat().st_size + 4000
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        acknowledged = {}
        with pytest.raises(PersistenceError):
            for i in range(100):
                state.set(f"k{i}", b"y" * 100)
                acknowledged[f"k{i}"] = b"y" * 100
        assert 10 <= len(acknowledged) < 100
        # Refused before it ran: changes nothing; reads go on.
        with pytest.raises(PersistenceError):
            state.set("refused", 1)
        with pytest.raises(PersistenceError):
            state.incr("before_counter")
        assert state.get_many(["refused", "before_counter"]) == {}
        assert state.get_many(list(acknowledged)) == acknowledged
        assert state.get("before") == b"x" * 100
        # Space again: the entry kept back is written first, then new writes.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        state.set("after", 2)
        state.close()
        server.kill()
        server.start()
        with SharedState(server.url) as again:
            assert again.get_many(list(acknowledged)) == acknowledged
            assert again.get_many(["after", "refused"]) == {"after": 2}
            # The write that failed mid-way was kept and written afterwards.
            assert len(again.keys("k")) == len(acknowledged) + 1
    finally:
        server.stop()


def _filled(workdir: Path, **query: Any) -> tuple[StateServer, Path]:
    """A server that wrote 50 keys to its log, then stopped."""
    server = StateServer(workdir, persist=1, fsync="everysec", **query).start()
    with SharedState(server.url) as state:
        for i in range(50):
            state.set(f"k{i}", i)
    server.stop()
    return server, segment_path(workdir / "snapshot.json", 1)


def test_a_torn_last_entry_is_dropped_and_reported(
    runtime_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    workdir = runtime_dir / "torn"
    workdir.mkdir(mode=0o700)
    server, log_file = _filled(workdir)
    good = log_file.stat().st_size
    torn = records.frame(records.put("torn", 1, None))
    with open(log_file, "ab") as f:
        f.write(torn[:-3])  # a crash mid-append
    server.start()
    try:
        with SharedState(server.url) as state:
            assert state.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
            assert state.get("torn") is None
            state.set("next", 1)  # appended after the cut, not after the torn bytes
    finally:
        server.stop()
    message = capfd.readouterr().err
    assert f"{log_file}: dropped {len(torn) - 3} bytes at offset {good}" in message, message
    server.start()
    try:
        with SharedState(server.url) as state:
            assert state.get_many(["next", "k49"]) == {"next": 1, "k49": 49}
    finally:
        server.stop()
    assert log_file.stat().st_size > good


@pytest.mark.parametrize("damaged", [0, 3, 9, 700, -40])
def test_damage_in_the_middle_refuses_to_start_and_leaves_the_files(
    runtime_dir: Path, capfd: pytest.CaptureFixture[str], damaged: int
) -> None:
    """A length field (bytes 0-3 of an entry), a checksum (4-7), a body; the
    last entry but one."""
    workdir = runtime_dir / "bad"
    workdir.mkdir(mode=0o700)
    server, log_file = _filled(workdir)
    content = bytearray(log_file.read_bytes())
    content[damaged] ^= 0xFF
    log_file.write_bytes(bytes(content))
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    # It listens before it loads (recovery is for the address's owner only),
    # so start() may see it listening for a moment before it exits.
    with contextlib.suppress(RuntimeError):
        server.start(timeout=10)
    assert server.proc is not None
    assert server.proc.wait(10) != 0
    message = capfd.readouterr().err
    assert f"{log_file} is damaged at offset" in message, message[-2000:]
    assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before


def test_expired_keys_are_not_brought_back(runtime_dir: Path) -> None:
    workdir = runtime_dir / "ttl"
    workdir.mkdir(mode=0o700)
    server = StateServer(workdir, persist=1, fsync="always").start()
    with SharedState(server.url) as state:
        state.set("short", 1, ttl=0.3)
        state.set("long", 2, ttl=60)
        state.set("made_short", 3)
        state.expire("made_short", 0.3)
        state.set("made_long", 4, ttl=0.3)
        state.expire("made_long", None)
    server.kill()
    time.sleep(0.5)
    server.start()
    try:
        with SharedState(server.url) as state:
            assert state.get_many(["short", "long", "made_short", "made_long"]) == {
                "long": 2,
                "made_long": 4,
            }
            assert 50 < (state.ttl("long") or 0) <= 60
    finally:
        server.stop()


def test_segments_without_fsync_are_refused(
    runtime_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    workdir = runtime_dir / "off"
    workdir.mkdir(mode=0o700)
    _filled(workdir)
    plain = StateServer(workdir, persist=1)
    with contextlib.suppress(RuntimeError):
        plain.start(timeout=10)
    assert plain.proc is not None
    assert plain.proc.wait(10) != 0
    assert "start with fsync=" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("local://a?persist=1&fsync=sometimes", "use one of always, everysec, no"),
        ("local://a?fsync=always", "add persist=1"),
        ("redis://localhost?fsync=always", "for the embedded engine"),
        ("local://a?persist=1&fsync=no&log_limit=12", "log_limit must be >= 1024"),
        ("local://a?persist=1&fsync=no&log_limit=big", "not a whole number"),
    ],
)
def test_bad_settings_are_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(url)


def test_log_files_are_private(runtime_dir: Path) -> None:
    workdir = runtime_dir / "mode"
    workdir.mkdir(mode=0o700)
    _, log_file = _filled(workdir)
    assert os.stat(log_file).st_mode & 0o777 == 0o600
