"""Redis backend against real redis-server processes (RELIABILITY.md cases 10, 11; TTL; cluster)."""

from __future__ import annotations

import threading
import time

import pytest
from _store_fixtures import BULK_OPTIONS, RedisServer, fake_stream, free_port, key_of

from kvcodec.store import StoreFull, StoreUnavailable, open_store


@pytest.fixture
def own_redis(request):
    servers: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        servers.append(RedisServer(*extra))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_killed_mid_write_then_restarted(own_redis) -> None:
    server = own_redis("--appendonly", "yes", "--appendfsync", "always")
    store = open_store(server.url, timeout_s=1, connect_timeout_s=0.5, max_attempts=1,
                       **BULK_OPTIONS)
    written, failures = [], []

    def writer() -> None:
        for i in range(10_000):
            try:
                store.put(key_of(i), fake_stream(i, 300_000))
                written.append(i)
            except StoreUnavailable as exc:
                failures.append(str(exc))
                return

    thread = threading.Thread(target=writer)
    thread.start()
    while len(written) < 5:
        time.sleep(0.01)
    server.kill()
    thread.join(30)
    assert failures and "redis" in failures[0]
    with pytest.raises(StoreUnavailable):
        store.get(key_of(0))
    assert store.health()["status"] == "degraded"
    server.start()  # same port and directory: the AOF is replayed
    report = store.scrub(remove=False)
    assert report["bad"] == [] and report["checked"] >= len(written) - 1
    for i in written[:-1]:  # every acknowledged write before the kill is whole
        assert store.get(key_of(i)) == fake_stream(i, 300_000)
    assert store.put(key_of(99_999), fake_stream(1, 1000)) is True and store.health()["ok"]


def test_noeviction_full_raises_store_full_and_reads_keep_working(own_redis) -> None:
    server = own_redis("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    store = open_store(server.url, **BULK_OPTIONS)
    stored = []
    with pytest.raises(StoreFull, match="maxmemory"):
        for i in range(200):
            store.put(key_of(i), fake_stream(i, 200_000))
            stored.append(i)
    assert stored
    assert store.get_many([key_of(i) for i in stored]) == [fake_stream(i, 200_000) for i in stored]
    with pytest.raises(StoreFull):
        store.put_many([(key_of(500 + i), fake_stream(i, 200_000)) for i in range(40)])


def test_lru_eviction_gives_clean_misses(own_redis) -> None:
    server = own_redis("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    store = open_store(server.url, **BULK_OPTIONS)
    for i in range(60):
        assert store.put(key_of(i), fake_stream(i, 200_000)) is True
    got = store.get_many([key_of(i) for i in range(60)])
    assert any(g is None for g in got) and any(g is not None for g in got)
    assert all(g is None or g == fake_stream(i, 200_000) for i, g in enumerate(got))
    assert store.stats()["bad_entries"] == 0


def test_ttl_expires_entries(redis_server) -> None:
    redis_server.client().flushall()
    store = open_store(redis_server.url, ttl_s=1, **BULK_OPTIONS)
    store.put(key_of(1), fake_stream(1, 100))
    assert 0 < redis_server.client().ttl(store._name(key_of(1))) <= 1
    time.sleep(1.3)
    assert store.get(key_of(1)) is None


def test_unreachable_server_is_unavailable_within_bounds() -> None:
    start = time.monotonic()
    store = open_store(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5,
                       connect_timeout_s=0.5, max_attempts=2, **BULK_OPTIONS)
    with pytest.raises(StoreUnavailable, match="redis"):
        store.get(key_of(1))
    assert store.health()["ok"] is False
    assert time.monotonic() - start < 5


def test_cluster_roundtrip_spreads_over_nodes(redis_cluster) -> None:
    for node in redis_cluster:  # the cluster is shared by the module's tests: start empty
        node.client().flushall()
    store = open_store(f"redis+cluster://127.0.0.1:{redis_cluster[0].port}", **BULK_OPTIONS)
    items = [(key_of(i), fake_stream(i, 2000)) for i in range(30)]
    assert store.put_many(items) == [True] * 30
    assert store.put_many(items[:5]) == [False] * 5
    assert store.get_many([k for k, _ in items]) == [b for _, b in items]
    assert sorted(store.keys()) == sorted(k for k, _ in items)
    per_node = [n.client().dbsize() for n in redis_cluster]
    assert sum(per_node) == 30 and sum(1 for c in per_node if c) >= 2
    assert store.health()["ok"] and store.delete(key_of(0)) and not store.has(key_of(0))


def test_sizes_treat_foreign_data_as_a_miss_and_serve_the_rest(redis_server) -> None:
    """A key of another Redis type in the store's namespace is absent for ``sizes``."""
    redis_server.client().flushall()
    store = open_store(redis_server.url, **BULK_OPTIONS)
    store.put(key_of(1), fake_stream(1, 1000))
    store.put(key_of(2), fake_stream(2, 1000))
    name = next(n for n in redis_server.client().scan_iter(match=f"*{key_of(2)}"))
    redis_server.client().delete(name)
    redis_server.client().rpush(name, b"not a chunk")
    sizes = store.sizes([key_of(1), key_of(2), key_of(3)])
    assert sizes[0] is not None and sizes[0] >= 1000
    assert sizes[1:] == [None, None]
