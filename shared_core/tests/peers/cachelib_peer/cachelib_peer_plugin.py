"""A pytest plugin for cachelib's own tests run against ``shared_core.contrib.cachelib``.

Loaded by ``run.py`` (``-p cachelib_peer_plugin``). It gives
``cachelib_peer_suite.py`` (copied into cachelib's ``tests/``) the state each
test runs on, ``shared_url``: a fresh app (an empty state) on

- ``manager``: the embedded engine (values pickled by the client);
- ``redis-pickle``: a real redis-server with ``?serializer=pickle``, the
  configuration that matches cachelib's ``RedisCache`` (which pickles);
- ``redis-json``: the same Redis with the engine's default JSON codec.

Tests that cannot pass by design are listed in ``XFAIL`` with the reason and
marked strict xfail (one that passes fails the run, so the list stays true).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from shared_core.contrib.cachelib import UnstorableValue
from shared_core.testing import IsolatedState, RedisServer, private_dir

ENGINES = ("manager", "redis-pickle", "redis-json")

_NOT_JSON = (
    "sample_pairs holds {256: 'truffle'}, a dict with an int key, which the Redis "
    "engine's default JSON codec refuses (UnstorableValue, nothing written) rather "
    "than give back {'256': ...}; passes with ?serializer=pickle"
)
# (engine, test name) -> why it cannot pass there. Every test that stores
# cachelib's sample_pairs, on the JSON codec.
XFAIL: dict[tuple[str, str], str] = {
    ("redis-json", name): _NOT_JSON
    for name in (
        "test_set_get",
        "test_set_get_many",
        "test_get_dict",
        "test_delete",
        "test_delete_many",
        "test_add",
        "test_expiration",
        "test_clear",
        "test_has",
    )
}

NOT_RUN = (
    "not run: cachelib's SerializerTests (they swap a cachelib serializer; this "
    "cache stores through the state's codec), and its test modules of other "
    "backends (file system, memcached, Redis, DynamoDB, MongoDB, uWSGI, serializers)"
)


@pytest.fixture(scope="session")
def shared_redis_server() -> Iterator[RedisServer]:
    """A redis-server of ours for the session (cachelib's conftest has a
    ``redis_server`` fixture of its own, for its RedisCache tests)."""
    workdir = private_dir("redis-")
    try:
        with RedisServer(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=ENGINES)
def shared_url(request: pytest.FixtureRequest, isolated_state: IsolatedState) -> str:
    """The URL of a state of this test's own on one engine."""
    engine = request.param
    if engine == "manager":
        return f"local://{isolated_state.app}?linger=10"
    redis: RedisServer = request.getfixturevalue("shared_redis_server")
    if engine == "redis-pickle":
        return redis.url(isolated_state.app, serializer="pickle")
    return redis.url(isolated_state.app)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of ``XFAIL`` (strict); say which entries matched nothing."""
    unused = set(XFAIL)
    for item in items:
        callspec = getattr(item, "callspec", None)
        engine = callspec.params.get("shared_url") if callspec else None
        key = (str(engine), getattr(item, "originalname", item.name))
        if key in XFAIL:
            unused.discard(key)
            item.add_marker(pytest.mark.xfail(reason=XFAIL[key], raises=UnstorableValue))
    if unused and not config.option.keyword and not config.option.markexpr:
        for engine, name in sorted(unused):
            print(f"cachelib_peer_plugin: XFAIL entry {name} [{engine}] matched no test")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"cachelib_peer_plugin: {NOT_RUN}")
