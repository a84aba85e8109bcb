"""Rate limits, a cache and sessions on the shared state, across real workers.

Each app's ``/limited`` allows ``N`` requests a minute per client address and
``/cached`` serves a value computed once for ``CACHE_SECONDS``, both on the
shared state (flask-limiter/slowapi with ``shared://``, quart-rate-limiter's
``SharedStateStore``, flask-caching/aiocache on the state); with
``COUNTER_MODE=naive`` the same routes use each worker's memory, as the
defaults of those libraries do.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import httpx
import pytest

from tests.harness import Deployment, EngineServer, default_state_url, get, sample

N = 10  # the apps' LIMIT: requests per minute per client address
CACHE_SECONDS = 30
AT_MOST = 400  # requests sent at most while waiting for a second worker to answer


def burst(d: Deployment, enough: Any) -> tuple[list[tuple[int, Any]], float]:
    """Sequential GETs of /limited, each on a new connection: at least 5 N, and
    more (up to ``AT_MOST``) until ``enough(replies)``; the replies and the
    seconds they took."""
    replies: list[tuple[int, Any]] = []
    started = time.monotonic()
    while len(replies) < 5 * N or (not enough(replies) and len(replies) < AT_MOST):
        r = get(f"{d.url}/limited", timeout=30)
        assert r.status_code in (200, 429), d.explain(f"{r.status_code}: {r.text}")
        assert r.headers["content-type"].startswith("application/json"), r.text
        replies.append((r.status_code, r.json()))
    return replies, time.monotonic() - started


def pids(replies: list[tuple[int, Any]], status: int | None = None) -> set[int]:
    return {body["pid"] for s, body in replies if status in (None, s)}


def test_the_rate_limit_holds_across_workers(deployment: Deployment) -> None:
    replies, elapsed = burst(deployment, lambda replies: len(pids(replies)) >= 2)
    ok = sum(status == 200 for status, _ in replies)
    if deployment.pairing.framework == "quart":
        # GCRA: a burst of N, then one more every 60/N s (sent sequentially, so
        # each slot is taken by the next request after it opens).
        slots = math.floor(elapsed / (60 / N))
        assert N + max(slots - 1, 0) <= ok <= N + slots, (ok, elapsed)
    else:
        assert ok == N, deployment.explain(f"{ok} of {len(replies)} got through, not {N}")
    for status, body in replies:
        if status == 200:
            assert body["ok"] is True
        else:
            assert body["error"].startswith("rate limit exceeded: "), body
    assert len(pids(replies)) >= 2, f"all {len(replies)} requests went to {pids(replies)}"


def test_the_naive_rate_limit_counts_in_each_worker(naive: Deployment) -> None:
    # The bug: memory:// counts per worker, so several workers let more than N through.
    def enough(replies: list[tuple[int, Any]]) -> bool:
        return len(pids(replies, 200)) >= 2 and sum(s == 200 for s, _ in replies) > N

    replies, _ = burst(naive, enough)
    ok = sum(status == 200 for status, _ in replies)
    assert len(pids(replies, 200)) >= 2, f"only {pids(replies, 200)} let requests through"
    assert ok > N, f"{ok} of {len(replies)} got through"


def test_the_cached_value_is_the_same_in_every_worker(deployment: Deployment) -> None:
    bodies = sample(deployment.url, "/cached", 20, at_most=AT_MOST)
    values = {(b["value"]["computed_by"], b["value"]["at"]) for b in bodies}
    assert len(values) == 1, deployment.explain(f"several values: {values}")
    assert len({b["pid"] for b in bodies}) >= 2, "all requests went to one worker"
    _, at = values.pop()
    assert 0 <= time.time() - at < CACHE_SECONDS + 5, "computed in this test, 30 s at most ago"


def test_the_naive_cache_computes_in_each_worker(naive: Deployment) -> None:
    bodies = sample(naive.url, "/cached", 20, at_most=AT_MOST)
    by_worker = {b["pid"]: b["value"] for b in bodies}
    assert len(by_worker) >= 2, "all requests went to one worker"
    assert {v["computed_by"] for v in by_worker.values()} == set(by_worker)


@pytest.mark.only(framework="flask")
def test_server_side_sessions_are_valid_on_every_worker(
    launch: Any, external_engine: EngineServer | None
) -> None:
    # On Redis and PostgreSQL, Flask's flash messages (tuples) need ?serializer=pickle
    # (docs/backends.md).
    url = default_state_url(external_engine)
    d = launch(env={"SESSION_STORE": "server"}, state_url=url and f"{url}&serializer=pickle")
    visits: list[int] = []
    seen: set[int] = set()
    cookies: set[str] = set()
    with httpx.Client(base_url=d.url, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while len(visits) < 20 or (len(seen) < 2 and len(visits) < AT_MOST):
            r = client.get("/session")
            assert r.status_code == 200, d.explain(r.text)
            visits.append(r.json()["visits"])
            seen.add(r.json()["pid"])
            cookies.add(client.cookies["session"])
    assert len(seen) >= 2, f"all {len(visits)} requests went to worker {seen}"
    assert visits == list(range(1, len(visits) + 1)), "a worker did not find the session"
    # The cookie is the session's id, the same on every visit; the data stays on the server.
    assert len(cookies) == 1, cookies
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", cookies.pop())
    # The page's buttons flash a message through the session too.
    with httpx.Client(base_url=d.url, cookies=client.cookies) as browser:
        assert browser.post("/").status_code == 303, d.explain("POST / failed")
        assert "raised the count to 1." in browser.get("/").text
