"""A pytest plugin that runs limits' own tests against ``shared_core.contrib.limits``.

Loaded by ``run.py`` (``-p limits_peer_plugin``) over the ``tests/``
of the limits sdist, whose ``conftest.py`` is not loaded (``--noconftest``: it
starts docker services and imports pymemcache, pymongo and valkey). Each test
class or function that limits parametrizes by storage (``"uri, args,
fixture"`` or ``"uri, args, expected_instance, fixture"``) gets our storages
instead of limits' own: ``shared://`` (``async+shared://`` for async tests) on
the manager engine and on Redis. The ``fixture`` argument, which limits uses to
flush its docker services, is one of ours that points ``$SHARED_STATE_URL``
at a state of the test's own (a fresh app: nothing is left from another test).

Tests that cannot pass by design are listed in ``XFAIL`` with the reason, and
marked strict xfail: one that passes fails the run, so the list stays true.
A test that skips itself fails the run (nothing is skipped silently).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from shared_core.contrib.limits import AsyncSharedStorage, SharedStorage
from shared_core.testing import IsolatedState, RedisServer

ENGINES = ("manager", "redis")
# limits' names for the arguments of a storage-parametrized test.
_STORAGE_ARGS = ("uri, args, fixture", "uri, args, expected_instance, fixture")

# Node ids (without the parameter part) of limits' tests that cannot pass with
# our storage by design, and why. Empty when every one passes.
XFAIL: dict[str, str] = {}


def _params(argnames: str, is_async: bool) -> list[Any]:
    uri = "async+shared://" if is_async else "shared://"
    storage = AsyncSharedStorage if is_async else SharedStorage
    params = []
    for engine in ENGINES:
        fixture = lf(f"shared_{engine}")
        values: tuple[Any, ...] = (
            (uri, {}, storage, fixture) if "expected_instance" in argnames else (uri, {}, fixture)
        )
        params.append(pytest.param(*values, marks=pytest.mark.shared, id=f"shared-{engine}"))
    return params


def _is_async(obj: object) -> bool:
    if inspect.isclass(obj):
        return any(
            inspect.iscoroutinefunction(v) for k, v in vars(obj).items() if k.startswith("test")
        )
    return inspect.iscoroutinefunction(obj)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Put our storages in place of limits' in its storage parametrizations."""
    marks = getattr(obj, "pytestmark", None)
    if not isinstance(marks, list) or not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return
    rewritten = []
    for mark in marks:
        if mark.name == "parametrize" and mark.args and mark.args[0] in _STORAGE_ARGS:
            mark = pytest.mark.parametrize(mark.args[0], _params(mark.args[0], _is_async(obj))).mark
            if _is_async(obj):
                rewritten.append(pytest.mark.usefixtures("shared_close_async_storages").mark)
        elif mark.name == "usefixtures" and "shared_close_async_storages" in mark.args:
            continue  # added by an earlier pass
        rewritten.append(mark)
    setattr(obj, "pytestmark", rewritten)  # obj: a class or a function


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of ``XFAIL`` (strict), and check that each still exists."""
    unused = set(XFAIL)
    for item in items:
        base = item.nodeid.split("[", 1)[0]
        if base in XFAIL:
            unused.discard(base)
            item.add_marker(pytest.mark.xfail(reason=XFAIL[base], strict=True))
    if unused and len(items) > 0:
        # Only meaningful when the whole suite was collected.
        for base in sorted(unused):
            print(f"limits_peer_plugin: XFAIL entry {base} matched no test")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A skipped test fails the run: every test runs, or is in ``XFAIL`` with its reason."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped ({reason}); the peer suite skips nothing: list it in XFAIL"
    return report


@pytest.fixture
async def shared_close_async_storages(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Close, on the test's event loop, the async storages the test made.

    limits' tests never close a storage; an ``AsyncSharedState`` left open
    when pytest-asyncio closes the loop would only be noticed by the garbage
    collector (a ResourceWarning for each connection).
    """
    made: list[AsyncSharedStorage] = []
    init = AsyncSharedStorage.__init__

    def recording_init(self: AsyncSharedStorage, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(AsyncSharedStorage, "__init__", recording_init)
    yield
    for storage in made:
        await storage.state.aclose()


@pytest.fixture
def shared_manager(isolated_state: IsolatedState, monkeypatch: pytest.MonkeyPatch) -> str:
    """``shared://`` is a state of this test's own on the manager engine."""
    url = f"local://{isolated_state.app}?linger=10"
    monkeypatch.setenv("SHARED_STATE_URL", url)
    return url


@pytest.fixture
def shared_redis(
    isolated_state: IsolatedState, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> str:
    """``shared://`` is a state of this test's own (a fresh app) in a real redis-server."""
    url = redis_server.url(isolated_state.app)
    monkeypatch.setenv("SHARED_STATE_URL", url)
    return url
