"""The app from its factory, with a test config, on a real embedded state of its own.

``isolated_state`` comes from the plugin ``shared_core.testing`` (enabled in
pyproject.toml): a private runtime directory, so each test starts its own
state server, stopped at teardown. Quart's ``test_app()`` runs the serving
hooks, as a server would.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from quart_counter import create_app
from shared_core.testing import IsolatedState


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def serve(isolated_state: IsolatedState) -> AsyncIterator[Callable[..., Any]]:
    """``await serve(**config)``: a test client of a serving app; several are several workers."""
    async with AsyncExitStack() as stack:

        async def start(**config: object) -> Client:
            app = create_app({"TESTING": True, "SHARED_STATE_URL": isolated_state.url, **config})
            test_app = app.test_app()
            await test_app.startup()  # before_serving, as a server runs it
            stack.push_async_callback(test_app.shutdown)
            return test_app.test_client()

        yield start


@pytest.fixture
async def client(serve: Callable[..., Any]) -> Client:
    client: Client = await serve()
    return client
