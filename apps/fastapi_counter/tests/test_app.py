"""fastapi_counter through httpx's ASGI transport, on a real shared state."""

import asyncio
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from httpx import AsyncClient

from fastapi_counter import CACHE_FOR, create_app
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
    # Every method of the path, though each has a route of its own.
    assert wrong_method.headers["allow"] == "GET, POST"
    assert wrong_method.json()["error"]
    assert (await client.post("/increment", content=b"x" * 20_000)).status_code == 413
    assert (await client.get("/no-such-page")).json() == {"error": "Not Found"}


async def test_a_session_is_valid_in_every_worker(serve: Callable[..., Any]) -> None:
    first, second = await serve(), await serve()  # two workers
    assert (await first.get("/session")).json()["visits"] == 1
    second.cookies = first.cookies
    assert (await second.get("/session")).json()["visits"] == 2


async def page(client: AsyncClient, **headers: str) -> str:
    response = await client.get("/", headers=headers)
    assert response.status_code == 200
    return response.text


def count_on(html: str) -> int:
    """The shared count as the page shows it."""
    match = re.search(r'id="count">(\d+)<', html)
    assert match, html
    return int(match.group(1))


async def test_the_page_shows_the_count_that_curl_changes(
    client: AsyncClient, isolated_state: IsolatedState
) -> None:
    assert (await client.post("/increment", params={"by": 2})).status_code == 200  # as curl
    html = await page(client)
    assert count_on(html) == 2
    # This worker, on the list of workers seen recently, for a minute.
    assert f'<li class="this">{os.getpid()}</li>' in html
    async with AsyncSharedState(isolated_state.url) as state:
        assert 0 < (await state.ttl(f"worker:{os.getpid()}") or 0) <= 60


async def test_the_buttons_post_then_redirect_to_the_page(client: AsyncClient) -> None:
    posted = await client.post("/")  # the Increment button, or curl -X POST on the page
    assert posted.status_code == 303
    assert urlsplit(posted.headers["Location"]).path == "/"
    html = await page(client)
    assert f"Worker {os.getpid()} raised the count to 1." in html  # the flash
    assert count_on(html) == 1
    assert "raised the count" not in await page(client), "a flash shows once"
    assert (await client.post("/", data={"button": "reset"})).status_code == 303
    html = await page(client)
    assert f"Worker {os.getpid()} reset the count to 0." in html
    assert count_on(html) == 0
    for wrong in ("drop", ""):  # an empty one too, which FastAPI reads as absent
        refused = await client.post("/", data={"button": wrong})
        assert refused.status_code == 422, wrong
        assert refused.json()["error"]


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


async def test_the_page_escapes_what_it_shows(client: AsyncClient) -> None:
    html = await page(client, Host='x"><script>alert(1)</script>')  # the page shows the host
    assert "<script>alert" not in html


def test_every_operation_has_its_own_id() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns of a duplicate operation id
        schema = create_app("local://never-connected").openapi()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), ids
    assert {"increment", "increment_get", "reset", "reset_get", "index", "index_form"} <= set(ids)
    assert {"limited", "cached"} <= set(ids)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_the_api_docs_need_no_other_site(client: AsyncClient, path: str) -> None:
    html = (await client.get(path)).text
    assert not re.search(r"(https?:)?//", html), f"{path} names another site"
    # Whatever it loads (scripts, styles, the icon, the schema), the app serves.
    assets = re.findall(r"""(?:src|href|url)\s*[=:(]\s*['"]([^'"]+)['"]""", html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        response = await client.get(asset)
        assert response.status_code == 200, asset
        assert response.content, asset


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
    for path in ("/increment", "/healthz", "/session", "/limited", "/cached"):
        response = await client.get(path)
        assert response.status_code == 503
        assert "unavailable" in response.json()["error"]


async def test_the_limit_is_the_same_in_every_worker(serve: Callable[..., Any]) -> None:
    first, second = await serve(), await serve()  # two workers, one client address
    statuses = [(await worker.get("/limited")).status_code for worker in (first, second) * 5]
    assert statuses == [200] * 10
    for worker in (first, second):
        response = await worker.get("/limited")
        assert response.status_code == 429
        body = response.json()
        assert body["error"].startswith("rate limit exceeded: ")
        assert body["pid"] == os.getpid()


async def test_the_cached_value_is_computed_once_for_every_worker(
    serve: Callable[..., Any], isolated_state: IsolatedState
) -> None:
    first, second = await serve(), await serve()
    body = (await first.get("/cached")).json()
    value = body["value"]
    assert value["computed_by"] == os.getpid()
    assert abs(value["at"] - time.time()) < 60
    assert (await second.get("/cached")).json()["value"] == value
    assert (await first.get("/cached")).json()["value"] == value
    async with AsyncSharedState(isolated_state.url) as state:  # kept for CACHE_FOR seconds
        assert 0 < (await state.ttl("aiocache:value") or 0) <= CACHE_FOR
