"""Fixtures and hooks of the integration suite; the harness is tests/harness.py.

The pairing comes from ``$PAIRING`` (tox sets it to the env name, e.g.
``quart-hypercorn``) or ``--pairing``: ``FRAMEWORK-SERVER[-WORKER][-ENGINE]``.
With ``-redis`` the apps use the Redis engine on a real redis-server that the
tests start, with ``-postgres`` the PostgreSQL engine on a real PostgreSQL
server; otherwise the embedded default.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from shared_core.testing import private_dir
from tests.harness import (
    CHAOS_ROWS,
    PAIRINGS,
    Deployment,
    EngineServer,
    ExplicitState,
    Pairing,
    PairingError,
    default_state_url,
    start,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pairing",
        default=os.environ.get("PAIRING"),
        help="FRAMEWORK-SERVER[-WORKER][-ENGINE], a comma-separated list, or 'all'",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pairing" not in metafunc.fixturenames:
        return
    names = metafunc.config.getoption("pairing")
    if not names:
        raise pytest.UsageError("set $PAIRING or --pairing, e.g. flask-gunicorn")
    chosen = PAIRINGS if names == "all" else names.split(",")
    try:
        pairings = [Pairing.parse(name) for name in chosen]
    except PairingError as exc:
        raise pytest.UsageError(str(exc)) from None
    metafunc.parametrize("pairing", pairings, ids=chosen, scope="session")


def _matches(value: object, wanted: object) -> bool:
    """``only(name=("a", "b"))``: any of a tuple; otherwise that value."""
    return value in wanted if isinstance(wanted, tuple) else value == wanted


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the pairings a test marked ``only(framework=..., engine=...)`` is not for
    (a tuple: any of its values)."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("only")
        callspec = getattr(item, "callspec", None)
        pairing = callspec.params.get("pairing") if callspec else None
        if (
            marker
            and isinstance(pairing, Pairing)
            and not all(_matches(getattr(pairing, k), v) for k, v in marker.kwargs.items())
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The table of what the chaos tests injected and what was lost."""
    if not CHAOS_ROWS:
        return
    columns = ["scenario", "pairing", "faults", "sent", "acknowledged", "counted", "lost"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in CHAOS_ROWS)) for c in columns}
    terminalreporter.section("fault injection")
    terminalreporter.write_line(" | ".join(c.ljust(widths[c]) for c in columns))
    terminalreporter.write_line("-+-".join("-" * widths[c] for c in columns))
    for row in CHAOS_ROWS:
        terminalreporter.write_line(" | ".join(str(row[c]).ljust(widths[c]) for c in columns))


@pytest.fixture(scope="session")
def external_engine(pairing: Pairing, request: pytest.FixtureRequest) -> EngineServer | None:
    """The session's server of the pairing's external engine, the redis-server
    or the PostgreSQL server (None for the embedded engine): each deployment
    gets an app of its own there (``default_state_url``)."""
    if not pairing.external:
        return None
    server: EngineServer = request.getfixturevalue(f"{pairing.engine}_server")
    return server


@pytest.fixture
def launch(
    pairing: Pairing, external_engine: EngineServer | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """``launch(**options)`` starts a deployment that is stopped at teardown."""
    started: list[Deployment] = []

    def _launch(**options: Any) -> Deployment:
        options.setdefault("state_url", default_state_url(external_engine))
        deployment = start(pairing, tmp_path_factory.mktemp("app"), **options)
        started.append(deployment)
        return deployment

    yield _launch
    for deployment in started:
        deployment.stop()


# Starting a deployment costs about 5 s of CPU (4 workers import the app); the
# tests that need no deployment of their own share these two.
@pytest.fixture(scope="session")
def deployment(
    pairing: Pairing, external_engine: EngineServer | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """The shared-state app with 4 workers, shared by the tests of the run."""
    d = start(pairing, tmp_path_factory.mktemp("app"), state_url=default_state_url(external_engine))
    yield d
    d.stop()


@pytest.fixture(scope="session")
def naive(
    pairing: Pairing, external_engine: EngineServer | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """The app with ``COUNTER_MODE=naive``: module globals and the libraries'
    per-worker defaults, shared by the tests of the run."""
    d = start(
        pairing,
        tmp_path_factory.mktemp("naive"),
        state_url=default_state_url(external_engine),
        mode="naive",
    )
    yield d
    d.stop()


@pytest.fixture
def explicit_state(pairing: Pairing) -> Iterator[ExplicitState]:
    """The pairing's state server run on its own (``.url``, ``.kill()``, ``.start()``)."""
    workdir = private_dir("st-")
    state = ExplicitState(pairing, workdir)
    state.start()
    try:
        yield state
    finally:
        state.stop()
        shutil.rmtree(workdir, ignore_errors=True)
