"""Store URLs and tiering options."""

from __future__ import annotations

from pathlib import Path

import pytest
from _store_fixtures import chunk_stream, key_of

from kvcodec.store import InvalidStoreURL, open_store
from kvcodec.store.local import LocalChunkStore
from kvcodec.store.memory import MemoryChunkStore
from kvcodec.store.redis_store import RedisChunkStore
from kvcodec.store.tiered import TieredChunkStore


def test_local_urls(tmp_path: Path, monkeypatch) -> None:
    a = open_store(f"file://{tmp_path}/a?capacity_bytes=12345&fsync=true")
    assert isinstance(a, LocalChunkStore) and a.root == tmp_path / "a"
    assert a.capacity_bytes == 12345 and a.fsync is True
    assert open_store(str(tmp_path / "b")).root == tmp_path / "b"
    monkeypatch.setenv("KVCODEC_STORE", str(tmp_path / "env"))
    assert open_store().root == tmp_path / "env" and open_store("").root == tmp_path / "env"


def test_memory_and_redis_urls(redis_server) -> None:
    assert isinstance(open_store("memory://?capacity_bytes=10"), MemoryChunkStore)
    store = open_store(redis_server.url + "?ttl_s=30&key_prefix=x:")
    assert isinstance(store, RedisChunkStore) and store.ttl_s == 30 and store.key_prefix == "x:"


@pytest.mark.parametrize(("url", "text"), [
    ("ftp://host/x", "scheme 'ftp'"),
    ("file://otherhost/x", "host 'otherhost'"),
    ("s3:///prefix", "no bucket"),
    ("memory://?bogus=1", "unknown option 'bogus'"),
    ("memory://?capacity_bytes=lots", "capacity_bytes='lots'"),
])
def test_bad_urls_are_named(url: str, text: str) -> None:
    with pytest.raises(InvalidStoreURL, match=text):
        open_store(url)


def test_option_a_backend_does_not_take() -> None:
    with pytest.raises(InvalidStoreURL, match="ttl_s"):
        open_store("memory://", ttl_s=5)


def test_disk_and_memory_tiers_in_front_of_redis(redis_server, tmp_path: Path) -> None:
    redis_server.client().flushall()
    store = open_store(redis_server.url, disk_cache=str(tmp_path / "disk"),
                       memory_cache_bytes=1 << 20)
    assert isinstance(store, TieredChunkStore)
    assert [t.scheme for t in store.tiers] == ["memory", "file", "redis"]
    assert store.put(key_of(1), chunk_stream(1)) is True
    assert all(t.has(key_of(1)) for t in store.tiers)  # write-through
    redis_server.client().flushall()  # the remote loses it: the local tiers still serve
    store.tiers[0].delete(key_of(1))
    assert store.get(key_of(1)) == chunk_stream(1)
    assert store.tiers[0].has(key_of(1))  # promoted from disk into memory
    stats = store.stats()
    assert stats["hits"] == 1 and [t["hits"] for t in stats["tiers"]] == [0, 1, 0]
    assert store.health()["ok"] and len(store.health()["tiers"]) == 3
