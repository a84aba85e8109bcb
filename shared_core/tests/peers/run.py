"""Run a peer library's own test suite against our backend for it.

    python shared_core/tests/peers/run.py PEER [PYTEST ARGS...]

PEER is one of ``PEERS``: ``limits``, ``cachelib``, ``aiocache``. The tests
come from the published source distribution of the version that is installed
(never copied into this repository): ``pip download --no-binary :all:
--no-deps PEER==VERSION``, kept in ``$XDG_CACHE_HOME/shared_core/peers``
(``~/.cache/...``); their ``tests/`` is extracted to a temporary directory and
pytest runs there with the folder ``PEER_peer`` beside this file on the path:
``PEER_peer/PEER_peer.ini`` (the settings the peer's tests rely on, from its own
config), ``PEER_peer_plugin`` (our backend in place of the peer's, on the
embedded engine and a real redis-server; the strict xfails and their
reasons; nothing skipped) and, where the peer's tests are mixins to be put
together, ``PEER_peer_suite.py``, copied in as a test module.

What each peer runs (``Peer.suite``) and needs is in ``PEERS``; every run
needs ``shared-core[testing,redis]``, ``redis-server`` on the PATH, and pip
able to reach the index. Extra arguments go to pytest (``-x``, ``-k moving``,
``-n 2`` with pytest-xdist; ``tests/...`` selects those tests instead of the
suite). The exit status is pytest's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Peer:
    suite: tuple[str, ...]  # what runs unless the arguments select tests/...
    noconftest: bool = False  # the peer's conftest.py starts services we do not use
    ours: str = ""  # our module of the peer's mixins, copied in as this test module


PEERS = {
    # The strategies (sync and async), the storages parametrized by URI, the
    # concurrency tests. Its conftest starts docker services: not loaded.
    # Needs shared-core[limits], pytest-asyncio, pytest-lazy-fixtures, flaky.
    "limits": Peer(
        (
            "tests/test_strategy.py",
            "tests/aio/test_strategy.py",
            "tests/test_storage.py::TestConcreteStorages",
            "tests/aio/test_storage.py::TestConcreteStorages",
            "tests/integration/test_concurrency.py",
        ),
        noconftest=True,
    ),
    # CommonTests, HasTests, ClearTests and DeleteManyWithPrefixTests, put
    # together over our cache. Needs shared-core[cachelib], pytest-xprocess
    # (its conftest imports it).
    "cachelib": Peer(
        ("tests/test_shared_state_cache.py",), ours="tests/test_shared_state_cache.py"
    ),
    # The acceptance tests (aiocache's tests of a backend); not its unit tests
    # (mocks of its own classes) nor its performance tests. Needs
    # shared-core[aiocache], pytest-asyncio, pytest-mock, marshmallow<4.
    "aiocache": Peer(("tests/acceptance",)),
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shared_core" / "peers"


def sdist(name: str, release: str) -> Path:
    """The sdist of ``name`` ``release``, downloaded with pip unless already cached."""
    target = cache_dir()
    path = target / f"{name}-{release}.tar.gz"
    if not path.exists():
        if importlib.util.find_spec("pip") is None:
            raise SystemExit(f"pip is needed to download {name} {release}: install it here")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--disable-pip-version-check", "--dest", str(target), f"{name}=={release}"],
            check=True,
        )  # fmt: skip
    if not path.exists():
        raise SystemExit(f"pip saved no {path.name} in {target}")
    return path


def extract_tests(archive: Path, top: str, into: Path) -> None:
    """Extract ``TOP/tests/`` of ``archive`` to ``into/tests``."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(f"{top}/tests/"):
                continue
            if not (member.isfile() or member.isdir()) or ".." in Path(member.name).parts:
                raise SystemExit(f"{archive}: refusing to extract {member.name}")
            member.name = member.name.removeprefix(f"{top}/")
            members.append(member)
        if not members:
            raise SystemExit(f"{archive} has no tests/")
        # The "data" filter where this Python has it (3.10.12+): checked above anyway.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, members=members, **safe)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PEERS:
        raise SystemExit(f"usage: run.py {{{','.join(PEERS)}}} [PYTEST ARGS...]")
    name, args = argv[0], argv[1:]
    peer, ours = PEERS[name], HERE / f"{name}_peer"
    release = version(name)
    archive = sdist(name, release)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-peer-"))
    try:
        extract_tests(archive, f"{name}-{release}", work)
        if peer.ours:
            shutil.copyfile(ours / f"{name}_peer_suite.py", work / peer.ours)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ours), env.get("PYTHONPATH")) if p)
        command = [
            sys.executable, "-m", "pytest",
            "-c", str(ours / f"{name}_peer.ini"), "--rootdir", str(work),
            *(["--noconftest"] if peer.noconftest else []),
            "-p", "shared_core.testing", "-p", f"{name}_peer_plugin",
            *args,
            *([] if any(a.startswith("tests/") for a in args) else peer.suite),
        ]  # fmt: skip
        print(f"{name} {release}: {archive}\n$ {' '.join(command)}", flush=True)
        return subprocess.run(command, cwd=work, env=env).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
