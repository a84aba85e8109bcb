"""Durability of the embedded engine: snapshots, and the append-only log.

Two modes, chosen by the URL:

``persist=1`` (snapshots)
    A snapshot every ``snapshot_interval`` seconds after writes, and at exit.
    A crash loses the writes since the last one.
``persist=1&fsync=always|everysec|no`` (the log)
    Every write is appended to the log, as one entry per call, and written
    to the file (``write(2)``) before its reply is sent, so that the death of
    the process loses nothing acknowledged. ``always`` also flushes it to the
    disk (``fdatasync``) before the reply, so that a power loss loses nothing
    acknowledged either; ``everysec`` flushes once a second in the background
    (a power loss loses about the last second); ``no`` leaves flushing to the
    kernel.

The store hands each entry over as it applies it, under its mutex, so the
log's order is the store's; nothing is written there (a thread that gave up
the GIL for a system call while holding the mutex would stall every caller).
Before its reply, a call makes sure its entry is in the file: the first
caller to find entries pending writes all of them, its own and other
callers', in one ``write(2)``. Group commit for ``always``: a call whose
entry is not on disk yet either finds no flush under way and leads one (an
``fdatasync`` that covers every entry written so far, its own and other
callers'), or waits for the current leader and then, if its entry came too
late for that flush, leads the next. Concurrent writers thus share writes
and flushes, and a lone writer pays one of each without any hand-off
between threads. (Several flushes at once, or a wake-up of every waiter
after each, cost more CPU than they save on a small machine: each
``fdatasync`` takes about 100 µs of the kernel's CPU, and each hand-off
between threads a few context switches.)

Compaction, without stopping writes: under the store's mutex (a copy of the
dict, no I/O) the store is copied and the log switches to a new segment
file; the snapshot is then written and renamed over the old one, naming
that segment as the first to replay, and only then are older segments
removed. A crash at any point recovers to the same state: before the
rename, the old snapshot and every segment since it; after, the new
snapshot and the new segment (older segments left behind are removed).

Recovery reads the snapshot, then replays the segments it names, oldest
first. An entry cut short at the very end of the last segment (a crash
mid-append) is dropped, the file is cut before it, and a warning says so;
damage anywhere else refuses the start with :class:`SnapshotError`, naming
the file and offset, and leaves every file as it is.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Final

from ..._config import FSYNC_POLICIES
from ..._errors import PersistenceError, SnapshotError
from . import records, snapshot
from .store import Store

log = logging.getLogger("shared_core.server")

# A caller waits this long for another thread's write or flush; a client
# gives up sooner (op_timeout), so this only frees the server's thread.
_COMMIT_WAIT: Final = 30.0
_EVERYSEC: Final = 1.0


def segment_path(snapshot_path: Path, seq: int) -> Path:
    """The file of log segment ``seq``, beside the snapshot."""
    return snapshot_path.with_name(f"{snapshot_path.name}.{seq:08d}.log")


def segments(snapshot_path: Path) -> list[int]:
    """The numbers of the log segments beside the snapshot, oldest first."""
    pattern = re.compile(re.escape(snapshot_path.name) + r"\.(\d{8})\.log$")
    found = []
    for entry in os.scandir(snapshot_path.parent):
        match = pattern.match(entry.name)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def filesystem(path: Path) -> str:
    """The type of the file system ``path`` is on (Linux; "" elsewhere)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return ""
    real, best, kind = os.path.realpath(path), "", ""
    for fields in mounts:
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_segment(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    _fsync_dir(path.parent)  # the new name itself must survive a power loss
    return fd


def _datasync(fd: int) -> None:
    sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
    try:
        sync(fd)
    except OSError as exc:
        # After a failed fsync the kernel may have dropped the dirty pages:
        # what is on disk is unknown, so carrying on could acknowledge writes
        # that are gone. Stop, as Redis and PostgreSQL do; a restart recovers
        # from what the disk really holds.
        log.critical("could not flush the log to disk (%s); exiting", exc)
        logging.shutdown()
        os._exit(70)


class AppendLog:
    """The log's writer (see the module's docstring).

    ``appended`` counts the entries handed over, ``written`` those in the
    file, ``durable`` those a reply may count on: written for ``no`` and
    ``everysec``, flushed to disk for ``always``.
    """

    def __init__(self, fd: int, seq: int, policy: str, size: int) -> None:
        if policy not in FSYNC_POLICIES:
            raise ValueError(f"fsync={policy!r}: use one of {', '.join(FSYNC_POLICIES)}")
        self.policy = policy
        self._always = policy == "always"
        self.seq = seq  # the segment being written
        self.size = size  # bytes in that segment
        self._fd = fd
        self._old_fds: list[int] = []  # segments switched from, not flushed yet
        # Entries appended, not written yet, oldest first; a failed write puts
        # back what it could not write, ahead of anything newer.
        self._pending: list[bytes] = []
        self._lock = threading.Lock()  # _pending, appended, and the switch of fd
        # One writer at a time, so in order; it also guards size, _cut, _closed.
        self._write_lock = threading.Lock()
        # A failed write stopped mid-entry: the file ends with part of one,
        # whose rest is first in _pending and must follow it in this segment.
        self._cut = False
        self.appended = self.written = self.durable = 0
        self.failure: OSError | None = None
        self._flush_lock = threading.Lock()  # held by the leader of a flush
        self._unsynced = False
        self._fd_lock = threading.Lock()  # no fd is closed while it is being flushed
        self._stop = threading.Event()
        self._closed = False
        self._syncer: threading.Thread | None = None
        if policy == "everysec":
            self._syncer = threading.Thread(target=self._sync_every_second, daemon=True)
            self._syncer.start()

    # called by the store, under its mutex ------------------------------------

    def append(self, body: bytes) -> None:
        # No system call here: the store's mutex is held, and a thread that
        # gives up the GIL while holding it stalls every other caller.
        entry = records.frame(body)
        with self._lock:
            self._pending.append(entry)
            self.appended += 1

    def switch(self, fd: int, seq: int) -> int:
        """Write to segment ``seq`` (open as ``fd``) from now on; returns the
        previous segment's fd, which :meth:`retire` flushes and closes.

        Entries appended before the switch and not written yet go to the new
        segment: the snapshot taken at the switch holds them already, and
        replaying them over it changes nothing (an entry says what a key
        became). OSError (no switch) while a failed write has left the
        current segment ending mid-entry: its rest belongs there.
        """
        with self._write_lock, self._lock:
            if self._cut:
                raise OSError("the log ends with an entry cut short by a failed write")
            old, self._fd, self.seq, self.size = self._fd, fd, seq, 0
            with self._fd_lock:
                self._old_fds.append(old)
        return old

    # called by the server's threads ------------------------------------------

    def _write_pending(self) -> None:
        """Write every pending entry, in one ``write(2)`` when it can
        (``self._write_lock`` is held); OSError if the file refuses."""
        if self._closed:
            raise OSError(errno.EBADF, "the log is closed")
        with self._lock:
            count, upto, fd = len(self._pending), self.appended, self._fd
            if not count:
                return
            # Joined before they leave _pending, so that no failure loses them.
            blobs = self._pending[:count]
            data = b"".join(blobs)  # one blob: itself, no copy
            del self._pending[:count]
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:] if done else data)
        except OSError:
            with self._lock:
                self._pending.insert(0, data[done:])
            if done:  # every blob ends where an entry does
                self._cut = done not in set(itertools.accumulate(map(len, blobs)))
            raise
        finally:
            self.size += done
            self._unsynced = True
        self._cut = False
        if not self._always:  # before written: nobody sees written without it
            self.durable = upto
        self.written = upto

    def _write(self, target: int) -> None:
        """Return once the first ``target`` entries are in the file (another
        thread's write may have covered them); PersistenceError if not."""
        if self.written >= target:
            return
        if not self._write_lock.acquire(timeout=_COMMIT_WAIT):
            raise PersistenceError(f"the log could not be written within {_COMMIT_WAIT:g}s")
        try:
            if self.written >= target:
                return
            try:
                self._write_pending()
            except OSError as exc:
                if self.failure is None:
                    log.error("could not write the log: %s; writes are refused until it can", exc)
                self.failure = exc
                raise PersistenceError(f"the log cannot be written: {exc}") from None
            if self.failure is not None:
                log.warning("the log can be written again")
                self.failure = None
        finally:
            self._write_lock.release()

    def retry(self) -> None:
        """Before a write runs: :class:`PersistenceError` (and nothing runs) if
        the log still cannot be written."""
        if self.failure is not None:
            self._write(self.appended)

    def commit(self, target: int) -> None:
        """Return once the first ``target`` entries are durable (see the
        class); :class:`PersistenceError` if they cannot be written, or not
        flushed within 30 s."""
        self._write(target)
        if not self._always or self.durable >= target:
            return
        lock = self._flush_lock
        if not lock.acquire(False) and not lock.acquire(timeout=_COMMIT_WAIT):
            raise PersistenceError(f"the log could not be flushed within {_COMMIT_WAIT:g}s")
        try:
            if self.durable < target:  # else the leader before us flushed it
                # Other callers' entries too, appended since their store call.
                with contextlib.suppress(PersistenceError):  # recorded in self.failure
                    self._write(self.appended)
                upto = self.written
                self.sync(always=True)
                self.durable = upto
        finally:
            lock.release()

    def retire(self, fd: int) -> None:
        """Flush and close a segment's fd once :meth:`switch` replaced it."""
        _datasync(fd)
        with self._fd_lock:
            if fd in self._old_fds:
                self._old_fds.remove(fd)
                os.close(fd)

    def _sync_every_second(self) -> None:
        while not self._stop.wait(_EVERYSEC):
            self.sync()

    def sync(self, *, always: bool = False) -> None:
        """Flush what was written to the disk (``always``'s commits, everysec's
        tick, and at exit)."""
        if not (self._unsynced or always or self._old_fds):
            return
        self._unsynced = False
        with self._fd_lock:  # copies, flushed without holding up the writers
            if self._closed:
                raise PersistenceError("the log is closed")
            fds = [os.dup(fd) for fd in (*self._old_fds, self._fd)]
        try:
            for fd in fds:
                _datasync(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """Write what is kept back if it can, flush, and close the files."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=5)
        try:
            self.commit(self.appended)
        except PersistenceError as exc:
            log.error("exiting with log entries not written: %s", exc)
        self.sync()
        # Connection threads may still call in: from now on their writes fail.
        with self._write_lock, self._lock, self._fd_lock:
            self._closed = True
            for fd in (*self._old_fds, self._fd):
                os.close(fd)
            self._old_fds.clear()


class Persistence:
    """What the server keeps on disk: nothing, snapshots, or snapshots and a log."""

    def __init__(
        self,
        store: Store,
        path: Path | None,
        *,
        interval: float,
        fsync: str | None = None,
        log_limit: int = 64 * 1024 * 1024,
    ) -> None:
        self.store, self.path, self.interval = store, path, interval
        self.log: AppendLog | None = None
        self.log_limit = log_limit
        self.saved_version = store.version
        self.next_save = time.monotonic() + interval
        self._snapshot_size = 0
        self._compacting: threading.Thread | None = None
        if path is None:
            return
        for left in path.parent.glob(f".{path.name}.*.tmp"):
            # A snapshot being written when a server died; the address is ours now.
            log.info("removing %s, left by a crash while writing a snapshot", left.name)
            left.unlink(missing_ok=True)
        loaded = snapshot.read(path)  # SnapshotError: refuse to start, keep the file
        if loaded is not None:
            count = store.load(loaded.data, loaded.deadlines, loaded.secrets)
            log.info("loaded %d keys from %s", count, path)
            self._snapshot_size = path.stat().st_size
        if fsync is None:
            if segments(path):
                # Turning the log off must not silently drop what it holds.
                raise SnapshotError(
                    f"{path.parent} holds log segments of {path.name}: start with "
                    "fsync= (always, everysec or no) to replay them"
                )
        else:
            kind = filesystem(path.parent)
            if kind in ("tmpfs", "ramfs") and fsync != "no":
                log.warning(
                    "%s is on a %s: the log survives a crash of this process but "
                    "not a reboot; give persist=/path on a disk for fsync=%s to hold",
                    path.parent,
                    kind,
                    fsync,
                )
            seq, size = recover(path, store, None if loaded is None else loaded.log)
            fd = _open_segment(segment_path(path, seq))
            self.log = AppendLog(fd, seq, fsync, size)
            store.attach_journal(self.log.append)
        self.saved_version = store.version

    def tick(self) -> None:
        """Called a few times a second by the server's main loop."""
        if self.path is None:
            return
        if self.log is not None:
            if (
                self.log.size > max(self.log_limit, self._snapshot_size)
                and self.log.failure is None
                and (self._compacting is None or not self._compacting.is_alive())
            ):
                self._compacting = threading.Thread(
                    target=self._compact_logged, name="compaction", daemon=True
                )
                self._compacting.start()
            return
        if time.monotonic() >= self.next_save:
            self.next_save = time.monotonic() + self.interval
            try:
                self.save()
            except OSError as exc:  # a full disk must not stop the server
                log.error("could not write the snapshot %s: %s", self.path, exc)

    def save(self) -> None:
        """Snapshot mode: write a snapshot if anything changed since the last."""
        if self.path is None or self.store.version == self.saved_version:
            return
        version, data, deadlines, secrets_ = self.store.dump()
        snapshot.write(self.path, data, deadlines, secrets_)
        self.saved_version = version

    def compact(self) -> None:
        """Log mode: a new snapshot and a new segment; older segments go."""
        assert self.path is not None
        assert self.log is not None
        appendlog, path = self.log, self.path
        seq = appendlog.seq + 1
        while segment_path(path, seq).exists():  # left by a crash mid-compaction
            seq += 1
        fd = _open_segment(segment_path(path, seq))
        switched: list[int] = []
        try:
            _version, data, deadlines, secrets_ = self.store.dump(
                then=lambda: switched.append(appendlog.switch(fd, seq))
            )
        except BaseException:
            os.close(fd)
            # Not left behind: the segment written to would not be the last.
            segment_path(path, seq).unlink(missing_ok=True)
            raise
        appendlog.retire(switched[0])
        snapshot.write(path, data, deadlines, secrets_, log=seq)
        self._snapshot_size = path.stat().st_size
        for old in segments(path):
            if old < seq:
                segment_path(path, old).unlink(missing_ok=True)
        log.info("log compacted: %d keys in the snapshot, segment %d from now on", len(data), seq)

    def _compact_logged(self) -> None:
        try:
            self.compact()
        except OSError as exc:  # e.g. a full disk: the log goes on, retried later
            log.error("could not compact the log: %s", exc)

    def close(self) -> None:
        """At exit: snapshot mode saves; log mode writes and flushes the log."""
        if self.log is not None:
            if self._compacting is not None:
                self._compacting.join(timeout=60)
            self.log.close()
            return
        self.save()


def recover(path: Path, store: Store, first: int | None) -> tuple[int, int]:
    """Replay the log segments from ``first`` (all when None) into ``store``.

    Returns the segment to append to and its size. Segments older than
    ``first`` are covered by the snapshot: they are removed.
    """
    found = segments(path)
    if first is None:
        first = found[0] if found else 1
    for seq in found:
        if seq < first:
            log.info("removing %s: the snapshot holds it", segment_path(path, seq).name)
            segment_path(path, seq).unlink()
    live = [seq for seq in found if seq >= first]
    entries = 0
    for seq in live:
        entries += _replay(segment_path(path, seq), store, last=seq == live[-1])
    if live:
        log.info("replayed %d log entries from %d segment(s)", entries, len(live))
        last = live[-1]
        return last, segment_path(path, last).stat().st_size
    return first, 0


def _replay(path: Path, store: Store, *, last: bool) -> int:
    data = path.read_bytes()
    offset, size, count = 0, len(data), 0
    header = records.HEADER
    while offset < size:
        # What a crash mid-append can leave: the last entry cut short, or
        # (after a power loss) the file grown but its end zeros or garbage.
        problem, tearable, end = "", True, size
        if size - offset < header.size:
            problem = "a header cut short"
        else:
            length, crc = header.unpack_from(data, offset)
            end = offset + header.size + length
            if length == 0 or length > records.MAX_ENTRY:
                problem, tearable = f"an impossible length {length}", False
            elif end > size:
                problem = "an entry cut short"
            elif zlib.crc32(data[offset + header.size : end]) != crc:
                tearable = not data[end:].strip(b"\0")  # nothing but zeros after it
                problem = "a checksum mismatch"
        if problem:
            if not last or not (tearable or not data[offset:].strip(b"\0")):
                _damaged(path, offset, problem)
            if _entry_after(data, offset):  # e.g. a length field hit by damage
                _damaged(path, offset, problem + ", with whole entries after it")
            log.warning(
                "%s: dropped %d bytes at offset %d (%s), the end of a write cut "
                "short by a crash; it was never acknowledged",
                path,
                size - offset,
                offset,
                problem,
            )
            with open(path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
            return count
        try:
            ops = list(records.decode(data[offset + header.size : end]))
        except records.Damaged as exc:
            _damaged(path, offset, f"an entry that does not decode: {exc}")
        store.apply(ops)
        count += 1
        offset = end
    return count


def _entry_after(data: bytes, offset: int) -> bool:
    """Whether a whole, checksummed entry starts anywhere after ``offset``.

    A crash mid-append leaves part of one entry and nothing after it; a
    whole entry further on means the bytes at ``offset`` were damaged.
    """
    header, size = records.HEADER, len(data)
    for at in range(offset + 1, size - header.size):
        length, crc = header.unpack_from(data, at)
        end = at + header.size + length
        if length > 0 and end <= size and zlib.crc32(data[at + header.size : end]) == crc:
            return True
    return False


def _damaged(path: Path, offset: int, problem: str) -> None:
    raise SnapshotError(
        f"{path} is damaged at offset {offset} ({problem}); refusing to start. The "
        "files are left as they are: restore them, or cut the log at that offset "
        "to keep what precedes it"
    )
