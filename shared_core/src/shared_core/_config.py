"""Where the state server lives and how clients prove who they are.

One URL selects everything. The forms are:

``local://APP`` (the default, ``APP`` from the ``app`` argument)
    A Unix socket in a private per-user, per-app directory; the first client
    that finds no server starts one.
``unix:///path/to/state.sock``
    A server started explicitly (``shared-core serve``) on that socket.
``tcp://HOST:PORT``
    A server started explicitly on TCP; loopback only unless the server opts in.
``redis://HOST:PORT/DB``, ``rediss://...``, ``redis+unix:///path/redis.sock``
    The Redis engine (needs the ``redis`` extra); keys live under
    ``shared_core:APP:``.
``postgresql://USER@HOST:PORT/DB``, ``postgres://...`` (libpq's URI form; a
Unix socket directory as ``?host=/run/postgresql``)
    The PostgreSQL engine (needs the ``postgres`` extra); tables live in the
    schema ``shared_core_APP``.

Query parameters: ``linger`` (seconds an auto-started server stays without
clients), ``connect_timeout``, ``op_timeout``, ``allow_remote`` (server only),
``persist`` and ``snapshot_interval`` (snapshots), ``fsync`` and ``log_limit``
(the append-only log, with ``persist``), ``max_keys`` and
``eviction`` (a bound on the embedded store), ``data_dir`` (where the embedded
server keeps the deployment's secrets), ``max_connections`` (per client,
for its threads: 8 to the embedded server, 50 to Redis, 10 to PostgreSQL); for
Redis and PostgreSQL also ``app`` and ``serializer`` (``json`` or ``pickle``),
for Redis ``lock_lease``. Other query parameters of a Redis URL go to redis-py,
of a PostgreSQL URL to libpq.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

from ._errors import ConfigError

ENV_URL = "SHARED_STATE_URL"
ENV_AUTHKEY = "SHARED_STATE_AUTHKEY"
ENV_AUTHKEY_FILE = "SHARED_STATE_AUTHKEY_FILE"

DEFAULT_APP = "default"
DEFAULT_LINGER = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
# Well under every app server's worker timeout (gunicorn: 30 s), so that a
# frozen state server gives the app a 503 before its worker is killed.
DEFAULT_OP_TIMEOUT = 5.0
DEFAULT_LOCK_LEASE = 30.0
# Connections one process opens to the embedded state server, whatever its
# thread count: round trips are short, so a few carry many threads' calls.
DEFAULT_MAX_CONNECTIONS = 8
# redis-py's blocking pool: Redis serves connections on an event loop.
DEFAULT_REDIS_MAX_CONNECTIONS = 50
# psycopg's pool; a PostgreSQL server runs a process per connection.
DEFAULT_POSTGRES_MAX_CONNECTIONS = 10
DEFAULT_SNAPSHOT_INTERVAL = 5.0
DEFAULT_LOG_LIMIT = 64 * 1024 * 1024  # bytes of log before it is compacted (Redis: 64mb)
FSYNC_POLICIES = ("always", "everysec", "no")
SNAPSHOT_NAME = "snapshot.json"
SECRETS_NAME = "secrets.json"
EVICTION_POLICIES = ("volatile-lru", "allkeys-lru", "noeviction")
REDIS_SCHEMES = ("redis", "rediss", "redis+unix")
POSTGRES_SCHEMES = ("postgresql", "postgres")
_OURS = {
    "linger",
    "connect_timeout",
    "op_timeout",
    "allow_remote",
    "app",
    "serializer",
    "lock_lease",
    "max_keys",
    "eviction",
    "data_dir",
    "max_connections",
    "near_cache",
    "near_cache_size",
    # The embedded engine's: refused or meaningless elsewhere, never passed on.
    "persist",
    "snapshot_interval",
    "fsync",
    "log_limit",
}

SOCKET_NAME = "state.sock"
AUTHKEY_NAME = "authkey"
START_LOCK_NAME = "start.lock"
DEFAULT_NEAR_CACHE_SIZE = 10_000
LOG_NAME = "server.log"

_APP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# sockaddr_un.sun_path is 108 bytes on Linux, including the final NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Config:
    """Everything a client or a server needs to know, resolved from one URL."""

    url: str
    scheme: str  # "local", "unix", "tcp", or one of REDIS_SCHEMES, POSTGRES_SCHEMES
    # For Redis: the URL handed to redis-py; for PostgreSQL: libpq's conninfo.
    address: str | tuple[str, int]
    state_dir: Path | None  # private directory of a local or unix server
    autostart: bool
    linger: float
    connect_timeout: float
    op_timeout: float
    allow_remote: bool
    app: str = DEFAULT_APP
    serializer: str = "json"  # Redis and PostgreSQL: "json", or "pickle" by opt-in
    lock_lease: float = DEFAULT_LOCK_LEASE  # Redis only
    snapshot: Path | None = None  # manager only: where the state is persisted
    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL
    # Embedded only, with a snapshot: the append-only log's flush policy
    # (None: snapshots only) and the size at which it is compacted.
    fsync: str | None = None
    log_limit: int = DEFAULT_LOG_LIMIT
    max_keys: int | None = None  # embedded only
    eviction: str = "volatile-lru"  # embedded only, with max_keys
    # Embedded only: where the server keeps what must outlive it (secrets).
    data_dir: Path | None = None
    # Connections one client opens for its threads, or (async) per event loop
    # for held locks (None: the engine's default); subscriptions come on top.
    max_connections: int | None = None
    # Keys read through a near cache in each process (prefixes; "" is every
    # key), and how many values a process keeps at most.
    near_cache: tuple[str, ...] = ()
    near_cache_size: int = DEFAULT_NEAR_CACHE_SIZE

    @property
    def is_redis(self) -> bool:
        return self.scheme in REDIS_SCHEMES

    @property
    def is_postgres(self) -> bool:
        return self.scheme in POSTGRES_SCHEMES

    @property
    def is_external(self) -> bool:
        """Redis or PostgreSQL: a server this package neither starts nor owns."""
        return self.is_redis or self.is_postgres

    @property
    def family(self) -> str:
        return "AF_INET" if self.scheme == "tcp" else "AF_UNIX"

    @property
    def authkey_file(self) -> Path | None:
        """The file holding the key when the environment names none."""
        explicit = os.environ.get(ENV_AUTHKEY_FILE)
        if explicit:
            return Path(explicit)
        return None if self.state_dir is None else self.state_dir / AUTHKEY_NAME

    def read_authkey(self) -> bytes:
        """Return the key clients and server share; FileNotFoundError if none yet."""
        env = os.environ.get(ENV_AUTHKEY)
        if env:
            return env.encode()
        path = self.authkey_file
        if path is None:
            raise ConfigError(f"{self.url}: a TCP server needs {ENV_AUTHKEY} or {ENV_AUTHKEY_FILE}")
        check_private_file(path)
        key = path.read_bytes().strip()
        if not key:
            raise ConfigError(f"authkey file {path} is empty")
        return key

    def ensure_authkey(self, *, regenerate: bool) -> bytes:
        """Return the key, writing a new random one (mode 0600) where none is set."""
        if os.environ.get(ENV_AUTHKEY) or os.environ.get(ENV_AUTHKEY_FILE):
            return self.read_authkey()
        path = self.authkey_file
        if path is None:
            return self.read_authkey()  # raises the TCP error
        if not regenerate:
            try:
                return self.read_authkey()
            except FileNotFoundError:
                pass
        key = secrets.token_hex(32).encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.replace(tmp, path)
        return key


def base_dir() -> Path:
    """The per-user directory under which each app gets its private directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "shared_core"
    return Path(tempfile.gettempdir()) / f"shared_core-{os.geteuid()}"


def data_home() -> Path:
    """Where servers keep files that outlive them: ``$XDG_STATE_HOME/shared_core``
    (default ``~/.local/state/shared_core``)."""
    state_home = os.environ.get("XDG_STATE_HOME")
    if state_home and os.path.isabs(state_home):
        return Path(state_home) / "shared_core"
    return Path.home() / ".local" / "state" / "shared_core"


def ensure_private_dir(path: Path, *, parents: bool = False) -> Path:
    """Create ``path`` (mode 0700) or check that an existing one is private to us.

    With ``parents``, missing parents are made too (0700, as ``mkdir -p``
    would with this umask); only ``path`` itself is checked.
    """
    if parents:
        old = os.umask(0o077)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask (a server runs with 0o177)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink is refused)")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):o}; it must be private (0700)"
        )
    return path


def check_private_file(path: Path) -> None:
    """Refuse a key file that other users could read or that is not ours."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise ConfigError(
            f"authkey file {path} has mode {stat.S_IMODE(st.st_mode):o}; "
            "it must be readable by its owner only (0600)"
        )
    if st.st_uid != os.geteuid():
        raise ConfigError(f"authkey file {path} belongs to uid {st.st_uid}, not to us")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _float(query: dict[str, list[str]], name: str, default: float) -> float:
    if name not in query:
        return default
    raw = query[name][-1]
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value >= 0:
        raise ConfigError(f"{name} must be >= 0, not {raw}")
    return value


def resolve(
    url: str | None = None, app: str | None = None, near_cache: Iterable[str] = ()
) -> Config:
    """Resolve ``url`` (else ``$SHARED_STATE_URL``, else ``local://APP``).

    ``near_cache``: the code's own prefixes, kept where the engine can keep
    them (unlike the URL's ``near_cache=``, which refuses the others).
    """
    if isinstance(near_cache, str):
        raise TypeError("near_cache takes prefixes (a tuple or list), not one string")
    asked = _prefixes(list(near_cache))
    if url is None:
        url = os.environ.get(ENV_URL) or f"local://{app or DEFAULT_APP}"
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    linger = _float(query, "linger", DEFAULT_LINGER)
    connect_timeout = _float(query, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    op_timeout = _float(query, "op_timeout", DEFAULT_OP_TIMEOUT)
    if op_timeout == 0 or connect_timeout == 0:
        # Every wait is bounded: there is no "wait for ever".
        raise ConfigError("connect_timeout and op_timeout must be > 0 seconds")
    allow_remote = query.get("allow_remote", ["0"])[-1].lower() in ("1", "true", "yes")
    lock_lease = _float(query, "lock_lease", DEFAULT_LOCK_LEASE)
    serializer = query.get("serializer", ["json"])[-1]
    if serializer not in ("json", "pickle"):
        raise ConfigError(f"serializer={serializer!r}: use json or pickle")
    snapshot_interval = _float(query, "snapshot_interval", DEFAULT_SNAPSHOT_INTERVAL)
    persist = query.get("persist", [""])[-1]
    fsync = query.get("fsync", [""])[-1] or None
    if fsync is not None and fsync not in FSYNC_POLICIES:
        raise ConfigError(f"fsync={fsync!r}: use one of {', '.join(FSYNC_POLICIES)}")
    log_limit = _whole(query, "log_limit", DEFAULT_LOG_LIMIT, minimum=1024)
    max_keys = _max_keys(query)
    max_connections = _whole(query, "max_connections", 0, minimum=1) or None
    eviction = query.get("eviction", ["volatile-lru"])[-1]
    prefixes = _prefixes(query.get("near_cache", []))
    near_cache_size = _whole(query, "near_cache_size", DEFAULT_NEAR_CACHE_SIZE, minimum=0)
    if eviction not in EVICTION_POLICIES:
        raise ConfigError(f"eviction={eviction!r}: use one of {', '.join(EVICTION_POLICIES)}")
    data_dir_arg = query.get("data_dir", [""])[-1]
    if data_dir_arg and not data_dir_arg.startswith("/"):
        raise ConfigError(f"data_dir={data_dir_arg!r} must be an absolute path")
    scheme = parts.scheme
    address: str | tuple[str, int]
    state_dir: Path | None = None
    name = app or DEFAULT_APP
    if scheme == "local":
        name = parts.netloc or parts.path.strip("/") or name
        state_dir = base_dir() / name
        address = str(state_dir / SOCKET_NAME)
    elif scheme == "unix":
        if not parts.path.startswith("/"):
            raise ConfigError(f"{url}: a unix URL needs an absolute path (unix:///...)")
        address = parts.path
        state_dir = Path(parts.path).parent
    elif scheme == "tcp":
        host, port = parts.hostname, parts.port
        if not host or port is None:
            raise ConfigError(f"{url}: a tcp URL needs a host and a port")
        address = (host, port)
    elif scheme in REDIS_SCHEMES:
        name = query.get("app", [name])[-1]
        # redis-py spells a Unix socket unix://; ours is the manager's.
        rest = [(k, v) for k, vs in query.items() if k not in _OURS for v in vs]
        if scheme == "redis+unix":
            address = f"unix://{parts.path}" + (f"?{urlencode(rest)}" if rest else "")
        else:
            address = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), ""))
    elif scheme in POSTGRES_SCHEMES:
        name = query.get("app", [name])[-1]
        rest = [(k, v) for k, vs in query.items() if k not in _OURS for v in vs]
        if "connect_timeout" not in dict(rest):
            # libpq's own bound on one connection attempt (whole seconds, at least 2).
            rest.append(("connect_timeout", str(max(2, math.ceil(connect_timeout)))))
        # quote, not quote_plus: libpq reads "+" as itself, not as a space.
        address = urlunsplit(
            (scheme, parts.netloc, parts.path, urlencode(rest, quote_via=quote), "")
        )
    else:
        raise ConfigError(
            f"unsupported state URL {url!r}: use local://APP, unix:///PATH, "
            "tcp://HOST:PORT, redis://HOST:PORT, rediss://..., redis+unix:///PATH "
            "or postgresql://..."
        )
    if not _APP_RE.match(name):
        raise ConfigError(f"app name {name!r} must match {_APP_RE.pattern}")
    if prefixes and (scheme == "tcp" or scheme in POSTGRES_SCHEMES):
        raise ConfigError(
            f"{url}: near_cache needs Redis or an embedded server on a Unix socket "
            "(local:// or unix://), whose clients share its machine"
        )
    if scheme != "tcp" and scheme not in POSTGRES_SCHEMES:
        prefixes += tuple(p for p in asked if p not in prefixes)
    if near_cache_size == 0:
        prefixes = ()  # the deployer's switch, also for what the code asks for
    data_dir: Path | None = None
    if data_dir_arg:
        data_dir = Path(data_dir_arg)
    elif scheme == "local":
        # An auto-started server leaves with the app server: the deployment's
        # secrets must not leave with it (users would be logged out).
        data_dir = data_home() / name
    snapshot: Path | None = None
    if persist.startswith("/"):
        snapshot = Path(persist)
    elif persist.lower() in ("1", "true", "yes"):
        # On disk, beside the secrets: a runtime directory is often a tmpfs
        # (systemd's /run/user/UID), which a reboot empties.
        home = data_dir or state_dir
        if home is None:
            raise ConfigError(f"{url}: persist=1 needs a private directory; give a path")
        snapshot = home / SNAPSHOT_NAME
    elif persist not in ("", "0", "false", "no"):
        raise ConfigError(f"persist={persist!r}: use 1 or an absolute path")
    if scheme in REDIS_SCHEMES + POSTGRES_SCHEMES and (
        snapshot is not None or max_keys is not None or data_dir_arg or fsync is not None
    ):
        raise ConfigError(
            "persist=, fsync=, max_keys= and data_dir= are for the embedded engine; "
            "Redis has its own persistence (appendonly, appendfsync) and maxmemory "
            "settings, and PostgreSQL's writes are durable"
        )
    if fsync is not None and snapshot is None:
        raise ConfigError(
            f"fsync={fsync} keeps a log beside the snapshot: add persist=1 (or persist=/path)"
        )
    if scheme in ("local", "unix") and len(os.fsencode(str(address))) > _MAX_SOCKET_PATH:
        raise ConfigError(f"socket path {address} is too long for a Unix socket")
    return Config(
        url=url,
        scheme=scheme,
        address=address,
        state_dir=state_dir,
        autostart=scheme == "local",
        linger=linger,
        connect_timeout=connect_timeout,
        op_timeout=op_timeout,
        allow_remote=allow_remote,
        app=name,
        serializer=serializer,
        lock_lease=lock_lease,
        snapshot=snapshot,
        snapshot_interval=snapshot_interval,
        fsync=fsync,
        log_limit=log_limit,
        max_keys=max_keys,
        eviction=eviction,
        data_dir=data_dir,
        max_connections=max_connections,
        near_cache=prefixes,
        near_cache_size=near_cache_size,
    )


def _prefixes(values: list[str]) -> tuple[str, ...]:
    """``near_cache=config:,flags:`` (repeatable); ``*`` alone: every key."""
    prefixes: list[str] = []
    for value in values:
        for prefix in value.split(","):
            if prefix == "*":
                prefix = ""
            elif not prefix:
                continue
            if prefix not in prefixes:
                prefixes.append(prefix)
    return tuple(prefixes)


def _max_keys(query: dict[str, list[str]]) -> int | None:
    if "max_keys" not in query:
        return None
    return _whole(query, "max_keys", 0, minimum=1)


def _whole(query: dict[str, list[str]], name: str, default: int, *, minimum: int) -> int:
    if name not in query:
        return default
    raw = query[name][-1]
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, not {raw}")
    return value
