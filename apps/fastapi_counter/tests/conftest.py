"""The app from its factory, on a real embedded state of its own, driven as a server would.

``isolated_state`` comes from the plugin ``shared_core.testing`` (enabled in
pyproject.toml): a private runtime directory, so each test starts its own
state server, stopped at teardown. The app runs its lifespan and answers
through httpx's ASGI transport.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from fastapi_counter import create_app
from shared_core.testing import IsolatedState


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def serve(isolated_state: IsolatedState) -> AsyncIterator[Callable[..., Any]]:
    """``await serve(url)``: a client of a serving app (default: the test's state);
    several are several workers."""
    async with AsyncExitStack() as stack:

        async def start(state_url: str = isolated_state.url) -> httpx.AsyncClient:
            app = create_app(state_url)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
            return await stack.enter_async_context(client)

        yield start


@pytest.fixture
async def client(serve: Callable[..., Any]) -> httpx.AsyncClient:
    client: httpx.AsyncClient = await serve()
    return client
