"""The state server: a ``multiprocessing.managers.Server`` holding one store.

Each client connection is served by its own thread (the manager's model), so
the identity of the serving thread is the identity of the connection: locks
are owned by connections and released when a connection ends, however its
client died.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import managers
from multiprocessing.connection import Connection
from pathlib import Path
from traceback import format_exc
from typing import Any

from . import _persist as persist
from ._config import START_LOCK_NAME, Config, ensure_private_dir, is_loopback
from ._errors import ConfigError, LockTimeout

log = logging.getLogger("shared_core.server")

STORE_ID = "store"
# Locks taken by ``mutate`` live in the same table as named locks, in a
# namespace no user lock name can reach.
MUTATE_PREFIX = "\x00mutate\x00"
_MISSING = object()
_POLL = 0.25


# Values are stored as the clients encode them: an int as itself (so that
# ``incr`` can work on it), anything else as pickled bytes that the server
# never unpickles, so it needs none of the apps' classes and runs none of
# their code.
Value = int | bytes


class Store:
    """The shared values, secrets and locks. Every write holds ``_mutex``."""

    exposed = frozenset(
        {
            "get", "set", "delete", "incr", "setdefault", "keys", "clear",
            "secret", "lock_acquire", "lock_release", "mutate_begin",
            "mutate_end", "info", "publish", "subscribe", "receive",
        }
    )  # fmt: skip

    def __init__(self) -> None:
        self._data: dict[str, Value] = {}
        self._secrets: dict[str, str] = {}
        self._mutex = threading.Lock()
        self._lock_cond = threading.Condition(threading.Lock())
        self._lock_owners: dict[str, int] = {}
        self._local = threading.local()
        self._clients_mutex = threading.Lock()
        # Broadcast: the queue of each subscribed connection, per channel.
        self._subs_cond = threading.Condition(threading.Lock())
        self._subscribers: dict[str, set[int]] = {}
        self._inboxes: dict[int, deque[tuple[str, Value]]] = {}
        # Bumped by every write, so that snapshots are taken only when needed.
        self.version = 0
        self.clients = 0
        self.idle_since = time.monotonic()
        self.started = time.time()

    # connections -----------------------------------------------------------

    def connected(self, conn: Connection) -> None:
        self._local.conn = conn
        with self._clients_mutex:
            self.clients += 1

    def disconnected(self) -> None:
        me = threading.get_ident()
        with self._subs_cond:
            if self._inboxes.pop(me, None) is not None:
                for members in self._subscribers.values():
                    members.discard(me)
        with self._lock_cond:
            held = [name for name, owner in self._lock_owners.items() if owner == me]
            for name in held:
                del self._lock_owners[name]
            if held:
                self._lock_cond.notify_all()
        with self._clients_mutex:
            self.clients -= 1
            if self.clients == 0:
                self.idle_since = time.monotonic()

    def _client_gone(self) -> bool:
        # A client waiting for a reply sends nothing, so readable means EOF.
        conn: Connection | None = getattr(self._local, "conn", None)
        try:
            return conn is not None and conn.poll(0)
        except OSError:
            return True

    # values ----------------------------------------------------------------

    def get(self, key: str) -> Value | None:
        return self._data.get(key)

    def set(self, key: str, value: Value) -> None:
        with self._mutex:
            self._data[key] = value
            self.version += 1

    def delete(self, key: str) -> bool:
        with self._mutex:
            self.version += 1
            return self._data.pop(key, _MISSING) is not _MISSING

    def incr(self, key: str, amount: int) -> int:
        with self._mutex:
            value = self._data.get(key, 0)
            if type(value) is not int:
                raise TypeError(f"incr: the value of {key!r} is not an int")
            value += amount
            self._data[key] = value
            self.version += 1
        return value

    def setdefault(self, key: str, value: Value) -> Value:
        with self._mutex:
            self.version += 1
            return self._data.setdefault(key, value)

    def keys(self, prefix: str) -> list[str]:
        with self._mutex:
            return sorted(k for k in self._data if k.startswith(prefix))

    def clear(self, prefix: str) -> int:
        with self._mutex:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for k in doomed:
                del self._data[k]
            self.version += 1
        return len(doomed)

    def secret(self, name: str, nbytes: int) -> str:
        with self._mutex:
            value = self._secrets.get(name)
            if value is None:
                value = self._secrets[name] = secrets.token_hex(nbytes)
                self.version += 1
        return value

    # locks -----------------------------------------------------------------

    def lock_acquire(self, name: str, timeout: float | None) -> bool:
        me = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock_cond:
            if self._lock_owners.get(name) == me:
                raise RuntimeError(f"lock {_shown(name)} is already held by this caller")
            while name in self._lock_owners:
                wait = _POLL
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    wait = min(wait, remaining)
                self._lock_cond.wait(wait)
                if self._client_gone():
                    raise EOFError("client left while waiting for a lock")
            self._lock_owners[name] = me
        return True

    def lock_release(self, name: str) -> None:
        with self._lock_cond:
            if self._lock_owners.get(name) != threading.get_ident():
                raise RuntimeError(f"lock {_shown(name)} is not held by this caller")
            del self._lock_owners[name]
            self._lock_cond.notify_all()

    def mutate_begin(self, key: str, timeout: float | None) -> Value | None:
        if not self.lock_acquire(MUTATE_PREFIX + key, timeout):
            raise LockTimeout(f"mutate({key!r}): another mutation held it for {timeout}s")
        return self._data.get(key)

    def mutate_end(self, key: str, value: Value | None, commit: bool) -> None:
        name = MUTATE_PREFIX + key
        if commit:
            if self._lock_owners.get(name) != threading.get_ident():
                raise RuntimeError(f"mutate({key!r}) is not in progress for this caller")
            if value is not None:
                self.set(key, value)
        self.lock_release(name)

    # broadcast ---------------------------------------------------------------

    def publish(self, channel: str, message: Value) -> int:
        """Queue ``message`` for every connection subscribed to ``channel``."""
        with self._subs_cond:
            members = self._subscribers.get(channel, ())
            for ident in members:
                self._inboxes[ident].append((channel, message))
            if members:
                self._subs_cond.notify_all()
            return len(members)

    def subscribe(self, channels: list[str]) -> None:
        """Make this connection a subscriber; messages queue up from now on."""
        me = threading.get_ident()
        with self._subs_cond:
            self._inboxes.setdefault(me, deque())
            for channel in channels:
                self._subscribers.setdefault(channel, set()).add(me)

    def receive(self, timeout: float) -> list[tuple[str, Value]]:
        """Wait up to ``timeout`` for this subscriber's queued messages."""
        me = threading.get_ident()
        deadline = time.monotonic() + timeout
        with self._subs_cond:
            inbox = self._inboxes.get(me)
            if inbox is None:
                raise RuntimeError("receive() before subscribe() on this connection")
            while not inbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._subs_cond.wait(min(remaining, _POLL))
                if self._client_gone():
                    raise EOFError("subscriber left")
            messages = list(inbox)
            inbox.clear()
        return messages

    # persistence -------------------------------------------------------------

    def dump(self) -> tuple[int, dict[str, Value], dict[str, str]]:
        """A consistent copy of the values and secrets, with its version."""
        with self._mutex:
            return self.version, dict(self._data), dict(self._secrets)

    def load(self, data: dict[str, Value], secrets_: dict[str, str]) -> None:
        with self._mutex:
            self._data.update(data)
            self._secrets.update(secrets_)

    def info(self) -> dict[str, Any]:
        with self._mutex:
            keys = len(self._data)
        return {
            "engine": "manager",
            "pid": os.getpid(),
            "clients": self.clients,
            "keys": keys,
            "locks": len(self._lock_owners),
            "uptime": round(time.time() - self.started, 3),
            "python": sys.version.split()[0],
        }


def _shown(name: str) -> str:
    if name.startswith(MUTATE_PREFIX):
        return f"for mutate({name[len(MUTATE_PREFIX) :]!r})"
    return repr(name)


class StateServer(managers.Server):
    """A manager server whose only object is the store, at a fixed id."""

    def __init__(self, address: Any, authkey: bytes, store: Store) -> None:
        super().__init__({}, address, authkey, "pickle")
        self.store = store
        self.stop_event = threading.Event()  # serve_forever() would make it
        self.id_to_obj[STORE_ID] = (store, store.exposed, None)  # type: ignore[assignment]
        self.inode: int | None = None
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
        store, exposed, stop = self.store, self.store.exposed, self.stop_event
        recv, send = conn.recv, conn.send
        store.connected(conn)
        try:
            while not stop.is_set():
                try:
                    ident, method, args, kwds = recv()
                except (EOFError, OSError):
                    return
                except Exception:
                    msg: tuple[str, Any] = ("#TRACEBACK", format_exc())
                else:
                    if ident != STORE_ID or method not in exposed:
                        msg = ("#TRACEBACK", f"no method {method!r} on {ident!r}")
                    else:
                        try:
                            msg = ("#RETURN", getattr(store, method)(*args, **kwds))
                        except Exception as exc:
                            msg = ("#ERROR", exc)
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


@contextmanager
def start_lock(config: Config, *, wait: bool = True) -> Iterator[bool]:
    """Serialize starting and stopping the server of one private directory.

    Yields whether the lock is held (always True when ``wait``).
    """
    assert config.state_dir is not None
    fd = os.open(config.state_dir / START_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


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
    os.umask(0o177)  # the socket file (and any snapshot) is created 0600
    store = Store()
    snapshots = _Snapshots(config.snapshot, config.snapshot_interval, store)
    if isinstance(config.address, str) and not start_locked:
        with start_lock(config):
            _remove_stale_socket(config.address)
            server = StateServer(config.address, authkey, store)
    else:
        if isinstance(config.address, str):
            _remove_stale_socket(config.address)
        server = StateServer(config.address, authkey, store)

    stop = server.stop_event

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=server.accepter, daemon=True, name="accepter").start()
    log.info("state server %d listening on %s", os.getpid(), _shown_address(config))
    if ready is not None:
        ready()

    reason = "stopped"
    while not stop.wait(_POLL):
        snapshots.tick()
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
    snapshots.save()
    log.info("state server %d exiting: %s", os.getpid(), reason or "stopped")
    return 0


class _Snapshots:
    """Load the snapshot at start; save one every ``interval`` after writes."""

    def __init__(self, path: Path | None, interval: float, store: Store) -> None:
        self.path, self.interval, self.store = path, interval, store
        self.saved_version = 0
        self.next_save = time.monotonic() + interval
        if path is None:
            return
        loaded = persist.read(path)  # SnapshotError: refuse to start, keep the file
        if loaded is not None:
            store.load(*loaded)
            log.info("loaded %d keys from %s", len(loaded[0]), path)

    def tick(self) -> None:
        if self.path is not None and time.monotonic() >= self.next_save:
            self.next_save = time.monotonic() + self.interval
            try:
                self.save()
            except OSError as exc:  # a full disk must not stop the server
                log.error("could not write the snapshot %s: %s", self.path, exc)

    def save(self) -> None:
        if self.path is None or self.store.version == self.saved_version:
            return
        version, data, secrets_ = self.store.dump()
        persist.write(self.path, data, secrets_)
        self.saved_version = version


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
    try:
        probe.connect(path)
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
