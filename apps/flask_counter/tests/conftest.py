"""The app from its factory, with a test config, on a real embedded state of its own.

``isolated_state`` comes from the plugin ``shared_core.testing`` (enabled in
pyproject.toml): a private runtime directory, so each test starts its own
state server, stopped at teardown.
"""

from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_counter import create_app
from shared_core.flask import close
from shared_core.testing import IsolatedState


@pytest.fixture
def make_app(isolated_state: IsolatedState) -> Iterator[Callable[..., Flask]]:
    """``make_app(**config)``: an app on the test's state; several are several workers."""
    apps: list[Flask] = []

    def make(**config: object) -> Flask:
        apps.append(create_app({"TESTING": True, "SHARED_STATE_URL": isolated_state.url, **config}))
        return apps[-1]

    yield make
    for app in apps:
        close(app)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
