"""publish/subscribe on both engines: once per subscriber, in order."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from typing import Any

import pytest

from conftest import server_processes
from shared_core import AsyncSharedState, SharedState
from shared_core.testing import PostgresServer, RedisServer, kill_and_wait, wait_for

SPAWN = multiprocessing.get_context("spawn")


def test_a_subscriber_gets_every_message_once_in_order(url: str) -> None:
    state = SharedState(url)
    got: list[Any] = []
    sub = state.subscribe("news", "other", callback=lambda c, m: got.append((c, m)))
    try:
        for i in range(50):
            assert state.publish("news", {"n": i}) >= 1
        state.publish("unrelated", "x")
        state.publish("other", [1, "two"])
        wait_for(lambda: len(got) >= 51, 10, "51 messages")
        time.sleep(0.2)
        assert got == [("news", {"n": i}) for i in range(50)] + [("other", [1, "two"])]
    finally:
        sub.close()


def test_publish_without_subscribers_reaches_no_one(url: str, engine: str) -> None:
    state = SharedState(url)
    received = state.publish("nobody-listens", 1)
    assert received == 0


def test_publish_counts_exactly_the_subscribers_it_reaches(url: str) -> None:
    """A publish racing a new subscription either reaches it and counts it,
    or does neither: its count is never off by the subscriber joining."""
    state = SharedState(url)
    for attempt in range(8):
        channel = f"race-{attempt}"
        counts: dict[int, int] = {}
        stop = threading.Event()

        def publish() -> None:
            i = 0
            while not stop.is_set():
                counts[i] = state.publish(channel, i)
                i += 1

        publisher = threading.Thread(target=publish)
        publisher.start()
        got: list[Any] = []
        try:
            time.sleep(0.005 * (attempt % 5))  # the subscription lands at varied moments
            sub = state.subscribe(channel, callback=lambda _c, m: got.append(m))
            wait_for(lambda: any(counts.values()), 10, "a publish that counts the subscriber")
        finally:
            stop.set()
            publisher.join(10)
        try:
            counted = {i for i, n in counts.items() if n}
            wait_for(lambda: counted <= set(got), 10, "every counted message")
            time.sleep(0.1)  # a message delivered but not counted would show by now
            assert sorted(got) == sorted(counted), (len(got), len(counted))
            assert all(n == 1 for n in counts.values() if n)
        finally:
            sub.close()


def test_channel_names_are_checked(url: str) -> None:
    state = SharedState(url)
    with pytest.raises(TypeError):
        state.publish(1, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one channel"):
        state.subscribe(callback=lambda c, m: None)


def _listen(url: str, ready: Any, out: Any) -> None:
    state = SharedState(url)
    got: list[Any] = []
    done = threading.Event()

    def on_message(channel: str, message: Any) -> None:
        got.append(message)
        if message == "last":
            done.set()

    state.subscribe("reload", callback=on_message)
    ready.release()
    done.wait(30)
    out.put(got)


def test_every_subscribed_process_receives_a_broadcast_once(url: str) -> None:
    ready = SPAWN.Semaphore(0)
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_listen, args=(url, ready, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for _ in procs:
        assert ready.acquire(timeout=60)
    state = SharedState(url)
    assert state.publish("reload", {"generation": 7}) >= 4
    state.publish("reload", "last")
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [[{"generation": 7}, "last"]] * 4


def test_async_subscription_is_an_async_iterator(url: str) -> None:
    async def main() -> list[Any]:
        state = AsyncSharedState(url)
        got = []
        async with state.subscribe("a", "b") as messages:
            await state.publish("a", 1)
            await state.publish("b", {"x": None})
            async for channel, message in messages:
                got.append((channel, message))
                if len(got) == 2:
                    break
        await state.aclose()
        return got

    assert asyncio.run(main()) == [("a", 1), ("b", {"x": None})]


def test_an_async_subscription_whose_on_connect_fails_unsubscribes(url: str) -> None:
    # ``async with`` runs no exit when its entry raises (or is cancelled).
    async def fail() -> None:
        raise RuntimeError("on_connect failed")

    async def main() -> int:
        state = AsyncSharedState(url)
        subscription = state.subscribe("a", on_connect=fail)
        with pytest.raises(RuntimeError):
            async with subscription:
                pass
        for _ in range(100):
            if (reached := await state.publish("a", 1)) == 0:
                break
            await asyncio.sleep(0.02)
        await state.aclose()
        return reached

    assert asyncio.run(main()) == 0


def test_a_subscriber_resubscribes_after_the_server_restarts(
    engine: str, url: str, app: str, runtime_dir: Any
) -> None:
    # An external server of the test's own, to kill.
    server: RedisServer | PostgresServer | None = None
    if engine == "redis":
        server = redis = RedisServer(runtime_dir).start()
        url = redis.url(app)
    elif engine == "postgres":
        server = postgres = PostgresServer(runtime_dir).start()
        url = postgres.url(app)
    state = SharedState(url)
    got: list[Any] = []
    connects: list[float] = []
    sub = state.subscribe(
        "reload", callback=lambda c, m: got.append(m), on_connect=lambda: connects.append(1)
    )
    try:
        assert len(connects) == 1
        if server is not None:
            server.kill()
            server.start()
        else:
            kill_and_wait(server_processes(app))
        # It comes back by itself, says so, and hears what is published next.
        wait_for(lambda: len(connects) == 2, 15, "the subscriber to resubscribe")
        wait_for(lambda: state.publish("reload", "after") >= 1, 10, "a subscriber")
        wait_for(lambda: "after" in got, 10, "the message after the restart")
    finally:
        sub.close()
        if server is not None:
            server.stop()
