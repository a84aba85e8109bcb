"""The embedded engine's wire protocol, shared by the server and both clients.

It is the ``multiprocessing.managers`` protocol, reduced to one object:

- connecting: ``multiprocessing.connection``'s HMAC challenge in both
  directions (the authkey never crosses the socket), then the manager's
  ``accept_connection`` handshake;
- framing: a 4-byte big-endian length (-1 and an 8-byte length above 2 GiB),
  then a pickle;
- a request is ``(STORE_ID, method, args, {})``; a reply is ``(kind, result)``
  where kind is ``#RETURN`` (the result), ``#ERROR`` (an exception to raise)
  or ``#TRACEBACK`` (a failure described as text).

Pickles are only exchanged after both sides proved they hold the authkey.
Every blocking step on a client has a deadline: a frozen server gives
``TimeoutError`` here and ``StateUnavailable`` to the caller.
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

from ..._config import Config
from ..._errors import StateError, StateUnavailable

STORE_ID = "store"
# The manager's request that turns a fresh connection into one that serves
# method calls on shared objects.
HANDSHAKE: tuple[None, str, tuple[str], dict[str, object]] = (
    None,
    "accept_connection",
    ("shared_core",),
    {},
)
RETURN, ERROR, TRACEBACK = "#RETURN", "#ERROR", "#TRACEBACK"

_SIZE = struct.Struct("!i")
_BIG_SIZE = struct.Struct("!iQ")


class NoServer(ConnectionRefusedError):
    """Nobody listens at the address (no socket file, or connection refused)."""


def request(method: str, args: tuple[Any, ...]) -> tuple[str, str, tuple[Any, ...], dict[str, Any]]:
    """The message that calls ``method(*args)`` on the store."""
    return (STORE_ID, method, args, {})


def result(reply: Any, method: str) -> Any:
    """Return the result a reply carries, or raise the error it carries."""
    kind, value = reply
    if kind == RETURN:
        return value
    if kind == ERROR:
        raise value
    raise StateError(f"{method} failed in the state server:\n{value}")


def frame(message: Any) -> bytes:
    """``message`` as the bytes ``Connection.send`` would write."""
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    size = len(data)
    header = _SIZE.pack(size) if size <= 0x7FFFFFFF else _BIG_SIZE.pack(-1, size)
    return header + data


def frame_at(buf: Any, start: int, end: int) -> tuple[int, int] | None:
    """Where the payload of the frame at ``buf[start:end]`` lies, as
    ``(first, past)``; None while the frame is not whole."""
    if end - start < 4:
        return None
    (size,) = _SIZE.unpack_from(buf, start)
    first = start + 4
    if size == -1:
        if end - start < 12:
            return None
        size = _BIG_SIZE.unpack_from(buf, start)[1]
        first = start + 12
    past = first + size
    return None if past > end else (first, past)


def frame_size(buf: Any, start: int, end: int) -> int:
    """The whole size of the frame that starts at ``buf[start:end]`` (its
    header must be there), so that a reader can make room for it."""
    (size,) = _SIZE.unpack_from(buf, start)
    if size == -1:
        return 12 + int(_BIG_SIZE.unpack_from(buf, start)[1]) if end - start >= 12 else 12
    return 4 + int(size)


def set_timeouts(fd: int, seconds: float | None) -> None:
    """Bound every blocking read and write on ``fd`` (None: no bound).

    A kernel timeout costs nothing per call, unlike a poll() before each
    read; an expired one makes the read or write fail with EAGAIN
    (``BlockingIOError``), which callers treat as "no answer in time".
    """
    seconds = seconds or 0.0
    sec = int(seconds)
    usec = int((seconds - sec) * 1_000_000)
    if seconds and not sec and not usec:
        usec = 1  # 0 would mean "no timeout"
    value = struct.pack("ll", sec, usec)
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    finally:
        sock.detach()


def _socket(config: Config, timeout: float) -> socket.socket:
    try:
        if isinstance(config.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)  # a frozen server's full backlog blocks connect()
                sock.connect(config.address)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(config.address, timeout=timeout)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NoServer(f"nobody listens at {config.address}: {exc.strerror}") from None
    sock.settimeout(None)  # blocking again; the kernel timeouts bound it
    return sock


def open_connection(config: Config, deadline: float | None = None) -> Connection:
    """One attempt: connect, authenticate, handshake, each step bounded.

    Raises :class:`NoServer` when nobody listens, ``TimeoutError`` when a
    server is there but does not answer before ``deadline`` (default: now +
    ``connect_timeout``), other ``OSError`` or ``EOFError`` when it hangs up,
    ``multiprocessing.AuthenticationError`` on a wrong key. The connection
    returned waits at most ``op_timeout`` for each reply.
    """
    if deadline is None:
        deadline = time.monotonic() + config.connect_timeout
    try:
        authkey = config.read_authkey()
    except FileNotFoundError as exc:
        raise NoServer(f"no authkey yet at {exc.filename}") from None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("no time left to connect")
    conn = Connection(_socket(config, remaining).detach())
    try:
        set_timeouts(conn.fileno(), max(deadline - time.monotonic(), 0.001))
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        conn.send(HANDSHAKE)
        kind, value = conn.recv()
        set_timeouts(conn.fileno(), config.op_timeout)
    except BlockingIOError:
        conn.close()
        raise TimeoutError("the state server did not answer while connecting") from None
    except BaseException:
        conn.close()
        raise
    if kind != RETURN:
        conn.close()
        raise StateUnavailable(f"state server refused the connection: {value}")
    return conn
