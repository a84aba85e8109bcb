"""The state server: a ``multiprocessing.managers.Server`` holding one store.

Each client connection is served by its own thread (the manager's model), so
the identity of the serving thread is the identity of the connection: locks
are owned by connections and released when a connection ends, however its
client died.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from multiprocessing import managers
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from traceback import format_exc
from typing import Any

from ..._config import SECRETS_NAME, Config, ensure_private_dir, is_loopback
from ..._errors import ConfigError, PersistenceError
from . import snapshot
from .lifecycle import start_lock
from .log import AppendLog, Persistence
from .near import ServerTable, table_path
from .protocol import ERROR, RETURN, STORE_ID, TRACEBACK
from .store import Store

log = logging.getLogger("shared_core.server")

_TICK = 0.25  # seconds between checks of the exit rule and snapshot times
_SWEEP_EVERY = 0.1
_SWEEP_BUDGET = 0.05
_SWEEP_BATCH = 64
_SIZE = struct.Struct("!i")  # multiprocessing.connection's framing
_LONG_SIZE = struct.Struct("!Q")
_READ_SIZE = 64 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
# The store's methods that change what the log keeps (secrets have their own file).
WRITES = frozenset(
    {
        "set", "set_many", "set_if_version", "add", "delete", "delete_many", "incr",
        "setdefault", "expire", "clear", "mutate_end",
    }
)  # fmt: skip


class StateServer(managers.Server):
    """A manager server whose only object is the store, at a fixed id."""

    def __init__(self, address: Any, authkey: bytes, store: Store) -> None:
        super().__init__({}, address, authkey, "pickle")
        self.store = store
        self.stop_event = threading.Event()  # serve_forever() would make it
        self.id_to_obj[STORE_ID] = (store, store.exposed, None)  # type: ignore[assignment]
        self.inode: int | None = None
        self.log: AppendLog | None = None  # with fsync=: replies wait for it
        if isinstance(address, str):
            self.inode = os.stat(address).st_ino
            # We unlink the socket ourselves, and only while it is still ours.
            listener = getattr(self, "listener", None)
            unlink = getattr(getattr(listener, "_listener", None), "_unlink", None)
            if unlink is not None:
                unlink.cancel()

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still this server's."""
        address = self.address
        if isinstance(address, str):
            try:
                if os.stat(address).st_ino == self.inode:
                    os.unlink(address)
            except FileNotFoundError:
                pass
        self.listener.close()  # type: ignore[attr-defined]

    def serve_client(self, conn: Connection) -> None:
        """Answer one connection's calls on the store, in order, until it closes.

        The manager's own loop, minus what a single object at a fixed id
        does not need (object lookups, proxies, fallbacks): same messages,
        fewer steps on every call.
        """
        store, exposed, stop, log_ = self.store, self.store.exposed, self.stop_event, self.log
        recv = _Reader(conn.fileno()).recv
        send = conn.send
        store.connected(lambda: _readable(conn))
        try:
            while not stop.is_set():
                try:
                    ident, method, args, kwds = recv()
                except (EOFError, OSError):
                    return
                except Exception:
                    msg: tuple[str, Any] = (TRACEBACK, format_exc())
                else:
                    if ident != STORE_ID or method not in exposed:
                        msg = (TRACEBACK, f"no method {method!r} on {ident!r}")
                    elif log_ is None:
                        try:
                            msg = (RETURN, getattr(store, method)(*args, **kwds))
                        except Exception as exc:
                            msg = (ERROR, exc)
                    else:
                        msg = _logged_call(store, log_, method, args, kwds)
                try:
                    send(msg)
                except Exception:
                    try:
                        send(("#UNSERIALIZABLE", format_exc()))
                    except Exception:
                        return
        finally:
            conn.close()
            store.disconnected()


class _Reader:
    """A connection's messages, read with one ``read(2)`` each where the
    client sent them with one ``write(2)`` (multiprocessing's own reads the
    length and the body apart: two system calls, two hand-offs of the GIL)."""

    __slots__ = ("_buf", "_fd")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()

    def recv(self) -> Any:
        buf, fd = self._buf, self._fd
        while True:
            if len(buf) >= 4:
                (size,) = _SIZE.unpack_from(buf)
                start = 4
                if size == -1:
                    if len(buf) < 12:
                        size, start = 12, 0  # read on until the long length is in
                    else:
                        (size,) = _LONG_SIZE.unpack_from(buf, 4)
                        start = 12
                end = start + size
                if start and len(buf) >= end:
                    try:
                        with memoryview(buf) as whole, whole[start:end] as body:
                            return ForkingPickler.loads(body)
                    finally:
                        del buf[:end]  # even if it does not unpickle: in step
                want = end - len(buf)
            else:
                want = 4 - len(buf)
            chunk = os.read(fd, max(want, _READ_SIZE))
            if not chunk:
                raise EOFError
            buf += chunk


def _logged_call(
    store: Store, log_: AppendLog, method: str, args: Any, kwds: Any
) -> tuple[str, Any]:
    """A call whose reply waits until the log holds what it wrote.

    Reads wait too when writes are in flight, so that nobody sees a value
    the log does not hold yet, unless the log is failing: then reads go on.
    """
    write = method in WRITES
    try:
        if write and log_.failure is not None:
            log_.retry()  # PersistenceError: refused, nothing changed
        result = getattr(store, method)(*args, **kwds)
        # At least this call's entry, if it wrote one; a read waits for the
        # writes it may have seen, unless the log is failing.
        target = log_.appended
        if log_.durable < target and (write or log_.failure is None):
            try:
                log_.commit(target)
            except PersistenceError:
                if write:
                    raise
        return (RETURN, result)
    except Exception as exc:
        return (ERROR, exc)


def _readable(conn: Connection) -> bool:
    # A client waiting for a reply sends nothing, so readable means EOF.
    try:
        return conn.poll(0)
    except OSError:
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie master has exited; only its parent has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def check_bind(config: Config) -> None:
    """Refuse a non-loopback TCP bind unless the user opted in."""
    if config.scheme != "tcp":
        return
    host = config.address[0]
    if is_loopback(str(host)):
        return
    if not config.allow_remote:
        raise ConfigError(
            f"refusing to bind {host}: the manager protocol unpickles what "
            "authenticated clients send; add ?allow_remote=1 (or --allow-remote) "
            "to expose it beyond loopback"
        )
    log.warning(
        "binding %s beyond loopback: anyone holding the authkey who reaches this "
        "port can run code in this process (the protocol unpickles requests)",
        host,
    )


def serve(
    config: Config,
    *,
    linger: float | None,
    watch_pid: int | None = None,
    start_locked: bool = False,
    ready: Callable[[], None] | None = None,
) -> int:
    """Run the state server until a signal, ``shutdown``, or the exit rule.

    Exit rule: with ``linger`` set, exit once no client has been connected for
    ``linger`` seconds, or at once when no client is connected and the process
    ``watch_pid`` (the app server's master) is gone. ``start_locked`` means the
    process that started us holds the start lock for us.
    """
    check_bind(config)
    if config.state_dir is not None and config.scheme == "local":
        ensure_private_dir(config.state_dir.parent)
    if config.state_dir is not None:
        ensure_private_dir(config.state_dir)
    authkey = config.ensure_authkey(regenerate=False)
    _tune_allocator()
    os.umask(0o177)  # the socket file (and any snapshot) is created 0600
    secrets_file = _secrets_file(config)
    store = Store(
        max_keys=config.max_keys,
        eviction=config.eviction,
        on_secrets=None if secrets_file is None else partial(snapshot.write_secrets, secrets_file),
    )
    if secrets_file is not None:
        # SnapshotError: refuse to start rather than hand out new secrets.
        store.load_secrets(snapshot.read_secrets(secrets_file))
    if isinstance(config.address, str) and not start_locked:
        with start_lock(config):
            _remove_stale_socket(config.address)
            server = StateServer(config.address, authkey, store)
    else:
        if isinstance(config.address, str):
            _remove_stale_socket(config.address)
        server = StateServer(config.address, authkey, store)
    # Loaded once the address is ours: recovery may cut a torn log's end,
    # which only the one server of this state may do. Nobody is served yet.
    try:
        _adopt_old_snapshot(config)
        persistence = Persistence(
            store,
            config.snapshot,
            interval=config.snapshot_interval,
            fsync=config.fsync,
            log_limit=config.log_limit,
        )
    except BaseException:
        server.close()
        raise
    server.log = persistence.log
    table = table_path(config)
    if table is not None:
        # Before anyone is served: its new epoch makes what clients kept
        # from an earlier server stale (a server that refuses to start
        # leaves it as it was).
        store.attach_table(ServerTable(table))

    stop = server.stop_event

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=server.accepter, daemon=True, name="accepter").start()
    threading.Thread(target=_sweeper, args=(store, stop), daemon=True, name="sweeper").start()
    log.info("state server %d listening on %s", os.getpid(), _shown_address(config))
    if ready is not None:
        ready()

    reason = "stopped"
    while not stop.wait(_TICK):
        persistence.tick()
        reason = _exit_reason(store, linger, watch_pid)
        if not reason:
            continue
        if not isinstance(config.address, str):
            server.close()
            break
        # Decide under the start lock, so that a client starting a server
        # meanwhile either reached us (and we stay) or waits for us to go.
        with start_lock(config, wait=False) as locked:
            if locked and _exit_reason(store, linger, watch_pid):
                server.close()
                break
    else:
        server.close()
    persistence.close()
    log.info("state server %d exiting: %s", os.getpid(), reason or "stopped")
    return 0


def _secrets_file(config: Config) -> Path | None:
    if config.data_dir is None:
        return None
    try:
        ensure_private_dir(config.data_dir, parents=True)
    except (OSError, ConfigError) as exc:
        # Serving matters more: secrets then last as long as this server.
        log.warning("secrets are kept in memory only: %s", exc)
        return None
    return config.data_dir / SECRETS_NAME


def _adopt_old_snapshot(config: Config) -> None:
    """``persist=1`` used to keep ``local://`` snapshots in the runtime
    directory; they now live on disk beside the secrets. Move an old one."""
    if config.snapshot is None or config.state_dir is None or config.snapshot.exists():
        return
    old = config.state_dir / config.snapshot.name
    if old != config.snapshot and old.exists():
        shutil.move(old, config.snapshot)
        log.info("moved the snapshot %s to %s", old, config.snapshot)


def _sweeper(store: Store, stop: threading.Event) -> None:
    """Reclaim expired keys in the background, in small steps.

    Every 0.1 s it removes what expired, 64 keys at a time, for at most
    50 ms: half the time at most, and only while a mass expiry lasts. The
    store's mutex and the GIL are let go between batches, so other clients'
    calls wait one batch at most.
    """
    while not stop.wait(_SWEEP_EVERY):
        started = time.monotonic()
        while store.sweep(_SWEEP_BATCH) == _SWEEP_BATCH:
            if time.monotonic() - started > _SWEEP_BUDGET:
                break
            # Let a connection thread take the GIL (sleep(0) would cost ~90 µs).
            os.sched_yield()
        if store.compact():
            _give_back_memory()
            log.debug("tables rebuilt after expiry: %d keys left", store.info()["keys"])


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)


def _tune_allocator() -> None:
    # glibc raises its mmap threshold each time a large block is freed, after
    # which large blocks (a big dict's table, a large request) come from heaps
    # that it rarely gives back. A fixed threshold keeps them in their own
    # mappings, returned to the system when freed.
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _give_back_memory() -> None:
    # Freed small blocks stay in the C allocator's heaps; glibc can return them.
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _exit_reason(store: Store, linger: float | None, watch_pid: int | None) -> str:
    if linger is None or store.clients:
        return ""
    if watch_pid is not None and not _pid_alive(watch_pid):
        return f"no client left and process {watch_pid} is gone"
    if time.monotonic() - store.idle_since >= linger:
        return f"no client for {linger:g}s"
    return ""


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file no server answers on (the start lock is held)."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a frozen server's full backlog would block connect()
    try:
        probe.connect(path)
    except TimeoutError:
        raise ConfigError(f"a state server is listening on {path} but not answering") from None
    except OSError:
        os.unlink(path)
    else:
        raise ConfigError(f"a state server is already listening on {path}")
    finally:
        probe.close()


def _shown_address(config: Config) -> str:
    if isinstance(config.address, str):
        return f"unix:{config.address}"
    return f"tcp:{config.address[0]}:{config.address[1]}"
