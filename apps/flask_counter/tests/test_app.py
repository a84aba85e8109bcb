"""flask_counter through Flask's test client, on a real shared state."""

import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from shared_core import SharedState
from shared_core.flask import get_state
from shared_core.testing import IsolatedState, wait_for


def call(client: FlaskClient, path: str, method: str = "GET") -> tuple[int, Any]:
    """The status and the JSON body of the answer to ``method path``."""
    response = client.open(path, method=method)
    return response.status_code, response.json


def test_counts_live_in_the_shared_state(app: Flask, client: FlaskClient) -> None:
    assert call(client, "/increment", "POST") == (
        200,
        {"count": 1, "key": "counter", "pid": os.getpid()},
    )
    assert call(client, "/increment?key=cnt&by=5")[1]["count"] == 5
    assert get_state(app).get("count:counter") == 1  # what every other worker reads
    assert call(client, "/reset", "POST")[1]["count"] == 0
    assert call(client, "/report?key=cnt")[1]["count"] == 5


@pytest.mark.parametrize("query", ["by=abc", "by=0", "by=1001", "key=a%20b", "key="])
def test_bad_input_is_a_400_with_a_json_error(client: FlaskClient, query: str) -> None:
    status, body = call(client, f"/increment?{query}")
    assert status == 400
    assert body["error"]
    assert call(client, "/report")[1]["count"] == 0


def test_http_errors_are_json(client: FlaskClient) -> None:
    wrong_method = client.delete("/increment")
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["Allow"]
    assert wrong_method.get_json()["error"]
    assert client.post("/increment", data=b"x" * 20_000).status_code == 413
    assert call(client, "/no-such-page")[0] == 404


def test_a_session_is_valid_in_every_worker(make_app: Callable[..., Flask]) -> None:
    first, second = make_app().test_client(), make_app().test_client()  # two workers
    assert call(first, "/session")[1]["visits"] == 1
    cookie = first.get_cookie("session")
    assert cookie is not None
    second.set_cookie("session", cookie.value)
    assert call(second, "/session")[1]["visits"] == 2


def page(client: FlaskClient, **headers: str) -> str:
    response = client.get("/", headers=headers)
    assert response.status_code == 200
    return response.text


def count_on(html: str) -> int:
    """The shared count as the page shows it."""
    match = re.search(r'id="count">(\d+)<', html)
    assert match, html
    return int(match.group(1))


def test_the_page_shows_the_count_that_curl_changes(app: Flask, client: FlaskClient) -> None:
    assert call(client, "/increment?by=2", "POST")[0] == 200  # as curl would
    html = page(client)
    assert count_on(html) == 2
    # This worker, on the list of workers seen recently, for a minute.
    assert f'<li class="this">{os.getpid()}</li>' in html
    assert 0 < (get_state(app).ttl(f"worker:{os.getpid()}") or 0) <= 60


def test_the_buttons_post_then_redirect_to_the_page(client: FlaskClient) -> None:
    posted = client.post("/")  # the Increment button, or curl -X POST on the page
    assert posted.status_code == 303
    assert urlsplit(posted.headers["Location"]).path == "/"
    html = page(client)
    assert f"Worker {os.getpid()} raised the count to 1." in html  # the flash
    assert count_on(html) == 1
    assert "raised the count" not in page(client), "a flash shows once"
    assert client.post("/", data={"button": "reset"}).status_code == 303
    html = page(client)
    assert f"Worker {os.getpid()} reset the count to 0." in html
    assert count_on(html) == 0
    refused = client.post("/", data={"button": "drop"})
    assert refused.status_code == 400
    assert refused.json
    assert refused.json["error"]


def test_the_page_shows_what_a_per_worker_global_would_say(
    make_app: Callable[..., Flask],
) -> None:
    first, second = make_app().test_client(), make_app().test_client()  # two workers
    for _ in range(3):
        first.post("/increment")
    html = page(second)
    assert count_on(html) == 3
    assert 'would say <strong id="alone">0</strong>' in html
    assert 'would say <strong id="alone">3</strong>' in page(first)


def test_the_page_escapes_what_it_shows(client: FlaskClient) -> None:
    html = page(client, Host='x"><script>alert(1)</script>')  # the page shows the host
    assert "<script>alert" not in html


def test_a_reload_reaches_every_worker(make_app: Callable[..., Flask]) -> None:
    first, second = make_app().test_client(), make_app().test_client()
    assert call(second, "/report")[1]["generation"] == 0  # it subscribes on its first request
    assert call(first, "/broadcast/reload", "POST")[1]["generation"] == 1
    wait_for(lambda: call(second, "/report")[1]["generation"] == 1, 5, "the broadcast")


def test_the_job_runs_in_one_worker_at_a_time(
    client: FlaskClient, isolated_state: IsolatedState
) -> None:
    with SharedState(isolated_state.url) as other_worker, other_worker.lock("job:report"):
        assert call(client, "/jobs/report?seconds=0", "POST")[0] == 409
    assert call(client, "/jobs/report?seconds=0", "POST")[1]["ran"] is True
    assert call(client, "/jobs/report")[1]["holder"] == os.getpid()


def test_no_state_is_a_503(make_app: Callable[..., Flask], isolated_state: IsolatedState) -> None:
    nowhere = f"unix://{isolated_state.runtime_dir}/nobody/state.sock?connect_timeout=0.5"
    client = make_app(SHARED_STATE_URL=nowhere).test_client()
    for path in ("/increment", "/healthz", "/session", "/limited", "/cached"):
        status, body = call(client, path)
        assert status == 503
        assert "unavailable" in body["error"]


def test_the_rate_limit_is_one_for_every_worker(make_app: Callable[..., Flask]) -> None:
    first, second = make_app().test_client(), make_app().test_client()  # two workers
    statuses = [call(client, "/limited")[0] for _ in range(6) for client in (first, second)]
    assert statuses == [200] * 10 + [429] * 2  # LIMIT is 10 per minute, in all
    status, body = call(second, "/limited")
    assert status == 429
    assert body == {"error": "rate limit exceeded: 10 per 1 minute", "pid": os.getpid()}


def test_the_cached_value_is_computed_once_for_every_worker(
    make_app: Callable[..., Flask],
) -> None:
    first, second = make_app().test_client(), make_app().test_client()
    value = call(first, "/cached")[1]["value"]
    assert value["computed_by"] == os.getpid()
    assert call(second, "/cached")[1]["value"] == value  # not computed again
    assert 0 < (get_state(first.application).ttl("flask_cache_computed") or 0) <= 30


def test_server_side_sessions_keep_only_an_id_in_the_cookie(
    make_app: Callable[..., Flask],
) -> None:
    first = make_app(SESSION_STORE="server").test_client()
    second = make_app(SESSION_STORE="server").test_client()
    assert call(first, "/session")[1]["visits"] == 1
    cookie = first.get_cookie("session")
    assert cookie is not None
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", cookie.value)  # an id, not signed data
    second.set_cookie("session", cookie.value)
    assert call(second, "/session")[1]["visits"] == 2
    state = get_state(first.application)
    assert state.get(f"cachelib:session:{cookie.value}")["visits"] == 2
