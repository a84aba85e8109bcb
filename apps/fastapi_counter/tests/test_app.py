"""fastapi_counter through httpx's ASGI transport, on a real shared state."""

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest
from httpx import AsyncClient

from shared_core import AsyncSharedState
from shared_core.testing import IsolatedState

pytestmark = pytest.mark.anyio


async def test_counts_live_in_the_shared_state(
    client: AsyncClient, isolated_state: IsolatedState
) -> None:
    response = await client.post("/increment")
    assert response.json() == {"count": 1, "key": "counter", "pid": os.getpid()}
    assert (await client.get("/increment", params={"key": "cnt", "by": 5})).json()["count"] == 5
    async with AsyncSharedState(isolated_state.url) as other_worker:
        assert await other_worker.get("count:counter") == 1
    assert (await client.post("/reset")).json()["count"] == 0
    assert (await client.get("/report", params={"key": "cnt"})).json()["count"] == 5


@pytest.mark.parametrize(
    "params", [{"by": "x"}, {"by": 0}, {"by": 1001}, {"key": "a b"}, {"key": "k" * 65}]
)
async def test_bad_input_is_a_422_with_a_json_error(
    client: AsyncClient, params: dict[str, Any]
) -> None:
    response = await client.post("/increment", params=params)
    assert response.status_code == 422
    assert response.json()["error"]
    assert (await client.get("/report")).json()["count"] == 0


async def test_http_errors_are_json(client: AsyncClient) -> None:
    wrong_method = await client.delete("/increment")
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["allow"]
    assert wrong_method.json()["error"]
    assert (await client.post("/increment", content=b"x" * 20_000)).status_code == 413
    assert (await client.get("/no-such-page")).json() == {"error": "Not Found"}


async def test_a_session_is_valid_in_every_worker(serve: Callable[..., Any]) -> None:
    first, second = await serve(), await serve()  # two workers
    assert (await first.get("/session")).json()["visits"] == 1
    second.cookies = first.cookies
    assert (await second.get("/session")).json()["visits"] == 2


async def test_a_flash_message_shows_once(client: AsyncClient) -> None:
    assert (await client.post("/")).status_code == 303
    assert "You are visitor number 1." in (await client.get("/")).text
    assert "visitor number" not in (await client.get("/")).text


async def test_a_reload_reaches_every_worker(serve: Callable[..., Any]) -> None:
    first, second = await serve(), await serve()
    assert (await first.post("/broadcast/reload")).json()["generation"] == 1
    for _ in range(100):  # each worker's listener runs in the background
        if (await second.get("/report")).json()["generation"] == 1:
            break
        await asyncio.sleep(0.05)
    assert (await second.get("/report")).json()["generation"] == 1


async def test_the_job_runs_in_one_worker_at_a_time(
    client: AsyncClient, isolated_state: IsolatedState
) -> None:
    async with (
        AsyncSharedState(isolated_state.url) as other_worker,
        other_worker.lock("job:report"),
    ):
        assert (await client.post("/jobs/report", params={"seconds": 0})).status_code == 409
    assert (await client.post("/jobs/report", params={"seconds": 0})).json()["ran"] is True
    assert (await client.get("/jobs/report")).json()["holder"] == os.getpid()


async def test_no_state_is_a_503(serve: Callable[..., Any], isolated_state: IsolatedState) -> None:
    client = await serve(
        f"unix://{isolated_state.runtime_dir}/nobody/state.sock?connect_timeout=0.5"
    )
    for path in ("/increment", "/healthz", "/session"):
        response = await client.get(path)
        assert response.status_code == 503
        assert "unavailable" in response.json()["error"]
