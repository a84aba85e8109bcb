"""quart_counter through Quart's test client, on a real shared state."""

import asyncio
import os
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from quart.typing import TestClientProtocol as Client

from quart_counter import CACHE_FOR, LIMIT
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


async def page(client: Client, **headers: str) -> str:
    response = await client.get("/", headers=headers)
    assert response.status_code == 200
    return await response.get_data(as_text=True)


def count_on(html: str) -> int:
    """The shared count as the page shows it."""
    match = re.search(r'id="count">(\d+)<', html)
    assert match, html
    return int(match.group(1))


async def test_the_page_shows_the_count_that_curl_changes(
    client: Client, isolated_state: IsolatedState
) -> None:
    assert (await call(client, "/increment?by=2", "POST"))[0] == 200  # as curl would
    html = await page(client)
    assert count_on(html) == 2
    # This worker, on the list of workers seen recently, for a minute.
    assert f'<li class="this">{os.getpid()}</li>' in html
    async with AsyncSharedState(isolated_state.url) as state:
        assert 0 < (await state.ttl(f"worker:{os.getpid()}") or 0) <= 60


async def test_the_buttons_post_then_redirect_to_the_page(client: Client) -> None:
    posted = await client.post("/")  # the Increment button, or curl -X POST on the page
    assert posted.status_code == 303
    assert urlsplit(posted.headers["Location"]).path == "/"
    html = await page(client)
    assert f"Worker {os.getpid()} raised the count to 1." in html  # the flash
    assert count_on(html) == 1
    assert "raised the count" not in await page(client), "a flash shows once"
    assert (await client.post("/", form={"button": "reset"})).status_code == 303
    html = await page(client)
    assert f"Worker {os.getpid()} reset the count to 0." in html
    assert count_on(html) == 0
    refused = await client.post("/", form={"button": "drop"})
    assert refused.status_code == 400
    assert (await refused.get_json())["error"]


async def test_the_page_shows_what_a_per_worker_global_would_say(
    serve: Callable[..., Any],
) -> None:
    first, second = await serve(), await serve()  # two workers
    for _ in range(3):
        await first.post("/increment")
    html = await page(second)
    assert count_on(html) == 3
    assert 'would say <strong id="alone">0</strong>' in html
    assert 'would say <strong id="alone">3</strong>' in await page(first)


async def test_the_page_escapes_what_it_shows(client: Client) -> None:
    html = await page(client, Host='x"><script>alert(1)</script>')  # the page shows the host
    assert "<script>alert" not in html


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
    for path in ("/increment", "/healthz", "/session", "/cached"):
        status, body = await call(client, path)
        assert status == 503
        assert "unavailable" in body["error"]


async def test_the_limit_is_the_same_in_every_worker(serve: Callable[..., Any]) -> None:
    first, second = await serve(), await serve()  # two workers, one client address
    statuses = [(await call(worker, "/limited"))[0] for worker in (first, second) * 5]
    assert statuses == [200] * LIMIT
    status, body = await call(first, "/limited")
    assert status == 429
    assert body["error"].startswith("rate limit exceeded: ")
    assert body["pid"] == os.getpid()
    response = await second.get("/limited")
    assert response.status_code == 429
    assert response.content_type == "application/json"
    assert int(response.headers["Retry-After"]) > 0


async def test_the_cached_value_is_computed_once_for_every_worker(
    serve: Callable[..., Any], isolated_state: IsolatedState
) -> None:
    first, second = await serve(), await serve()
    status, body = await call(first, "/cached")
    assert status == 200
    value = body["value"]
    assert value["computed_by"] == os.getpid()
    assert abs(value["at"] - time.time()) < 60
    assert (await call(second, "/cached"))[1]["value"] == value
    assert (await call(first, "/cached"))[1]["value"] == value
    async with AsyncSharedState(isolated_state.url) as state:  # kept for CACHE_FOR seconds
        assert 0 < (await state.ttl("aiocache:value") or 0) <= CACHE_FOR


async def test_no_state_is_a_503_on_the_limited_page_too(
    serve: Callable[..., Any], isolated_state: IsolatedState
) -> None:
    nowhere = f"unix://{isolated_state.runtime_dir}/nobody/state.sock?connect_timeout=0.5"
    client = await serve(SHARED_STATE_URL=nowhere)
    status, body = await call(client, "/limited")
    assert status == 503
    assert "unavailable" in body["error"]
