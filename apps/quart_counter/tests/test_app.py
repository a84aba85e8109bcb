"""quart_counter through Quart's test client, on a real shared state."""

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from shared_core import AsyncSharedState
from shared_core.testing import IsolatedState

pytestmark = pytest.mark.anyio


async def call(client: Client, path: str, method: str = "GET") -> tuple[int, Any]:
    """The status and the JSON body of the answer to ``method path``."""
    response = await (client.post(path) if method == "POST" else client.get(path))
    return response.status_code, await response.get_json()


async def test_counts_live_in_the_shared_state(
    client: Client, isolated_state: IsolatedState
) -> None:
    assert await call(client, "/increment", "POST") == (
        200,
        {"count": 1, "key": "counter", "pid": os.getpid()},
    )
    assert (await call(client, "/increment?key=cnt&by=5"))[1]["count"] == 5
    async with AsyncSharedState(isolated_state.url) as state:  # what another worker sees
        assert await state.get("count:counter") == 1
    assert (await call(client, "/reset", "POST"))[1]["count"] == 0
    assert (await call(client, "/report?key=cnt"))[1]["count"] == 5


@pytest.mark.parametrize("query", ["by=-1", "by=1.5", "by=99999", "key=", "key=a/b"])
async def test_bad_input_is_a_400_with_a_json_error(client: Client, query: str) -> None:
    status, body = await call(client, f"/increment?{query}")
    assert status == 400
    assert body["error"]
    assert (await call(client, "/report"))[1]["count"] == 0


async def test_http_errors_are_json(client: Client) -> None:
    response = await client.put("/increment")
    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]
    assert (await response.get_json())["error"]
    assert (await client.post("/increment", data=b"x" * 20_000)).status_code == 413
    assert (await call(client, "/no-such-page"))[0] == 404


async def test_a_session_is_valid_in_every_worker(serve: Callable[..., Any]) -> None:
    first, second = await serve(), await serve()  # two workers
    response = await first.get("/session")
    assert (await response.get_json())["visits"] == 1
    cookie = response.headers["Set-Cookie"].split(";")[0].removeprefix("session=")
    second.set_cookie("localhost", "session", cookie)
    assert (await call(second, "/session"))[1]["visits"] == 2


async def test_a_flash_message_shows_once(client: Client) -> None:
    assert (await client.post("/")).status_code == 302
    assert "You are visitor number 1." in await (await client.get("/")).get_data(as_text=True)
    assert "visitor number" not in await (await client.get("/")).get_data(as_text=True)


async def test_a_reload_reaches_every_worker(serve: Callable[..., Any]) -> None:
    first, second = await serve(), await serve()
    assert (await call(first, "/broadcast/reload", "POST"))[1]["generation"] == 1
    for _ in range(100):  # each worker's listener runs in the background
        if (await call(second, "/report"))[1]["generation"] == 1:
            break
        await asyncio.sleep(0.05)
    assert (await call(second, "/report"))[1]["generation"] == 1


async def test_the_job_runs_in_one_worker_at_a_time(
    client: Client, isolated_state: IsolatedState
) -> None:
    async with (
        AsyncSharedState(isolated_state.url) as other_worker,
        other_worker.lock("job:report"),
    ):
        assert (await call(client, "/jobs/report?seconds=0", "POST"))[0] == 409
    assert (await call(client, "/jobs/report?seconds=0", "POST"))[1]["ran"] is True
    assert (await call(client, "/jobs/report"))[1]["holder"] == os.getpid()


async def test_no_state_is_a_503(serve: Callable[..., Any], isolated_state: IsolatedState) -> None:
    nowhere = f"unix://{isolated_state.runtime_dir}/nobody/state.sock?connect_timeout=0.5"
    client = await serve(SHARED_STATE_URL=nowhere)
    for path in ("/increment", "/healthz", "/session"):
        status, body = await call(client, path)
        assert status == 503
        assert "unavailable" in body["error"]
