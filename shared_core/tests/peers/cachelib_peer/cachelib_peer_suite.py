"""cachelib's own test mixins, run against ``shared_core.contrib.cachelib``.

Not collected here: ``run.py`` copies this file into the
``tests/`` of cachelib's sdist (as ``test_shared_state_cache.py``), beside the
mixins it imports, so that cachelib's ``conftest.py`` applies to it as to
cachelib's own backends (its ``key_prefix`` fixture: each test runs without a
prefix and with one). ``cache_factory`` is what cachelib's backend modules
define: ``request.cls.cache_factory(*args, **kwargs)`` makes the cache under
test, here on a state of the test's own (``shared_url``, from
``cachelib_peer_plugin``: the manager engine, Redis with pickle, Redis with
its default JSON codec).

The mixins: ``CommonTests``, ``ClearTests``, ``HasTests`` and
``DeleteManyWithPrefixTests``, as cachelib's ``TestRedisCache`` runs them.
``SerializerTests`` is left out: it swaps the cache's cachelib serializer,
which this cache does not have (the state's codec stores values).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest
from cachelib import BaseCache
from clear import ClearTests  # type: ignore[import-not-found]
from common import CommonTests  # type: ignore[import-not-found]
from delete_many_with_prefix import DeleteManyWithPrefixTests  # type: ignore[import-not-found]
from has import HasTests  # type: ignore[import-not-found]

from shared_core.contrib.cachelib import SharedStateCache


@pytest.fixture(autouse=True)
def cache_factory(request: Any, key_prefix: str | None, shared_url: str) -> Iterator[None]:
    made: list[SharedStateCache] = []

    def _factory(self: object, *args: Any, **kwargs: Any) -> SharedStateCache:
        kwargs.setdefault("key_prefix", key_prefix)
        cache = SharedStateCache(*args, url=shared_url, **kwargs)
        made.append(cache)
        return cache

    request.cls.cache_factory = _factory
    yield
    for cache in made:
        cache.close()


class TestSharedStateCache(CommonTests, ClearTests, HasTests, DeleteManyWithPrefixTests):
    def test_types_have_all_base_methods(self) -> None:
        """cachelib's test_interface_uniformity, for this cache."""
        cache = self.cache_factory()
        for name, _ in inspect.getmembers(BaseCache, predicate=inspect.isfunction):
            if not name.startswith("_"):
                assert callable(getattr(cache, name))
