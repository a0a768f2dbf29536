"""One conformance suite, run unchanged on every backend (memory, local, Redis, S3, tiered)."""

from __future__ import annotations

import pytest
from _store_fixtures import chunk_stream, key_of

from kvcodec.store import IntegrityError, InvalidKey, KeyMismatch, KeySpec


def test_put_get_roundtrip_and_create_only(store) -> None:
    blob = chunk_stream(1)
    assert store.get(key_of(1)) is None
    assert store.put(key_of(1), blob) is True
    assert store.get(key_of(1)) == blob
    assert store.put(key_of(1), chunk_stream(2)) is False  # create-only: never overwritten
    assert store.get(key_of(1)) == blob
    stats = store.stats()
    assert stats["puts"] == 1 and stats["put_existing"] == 1
    assert stats["hits"] == 2 and stats["misses"] == 1


def test_batches(store) -> None:
    items = [(key_of(i), chunk_stream(i)) for i in range(6)]
    assert store.put_many(items[:3]) == [True] * 3
    assert store.put_many(items) == [False] * 3 + [True] * 3
    got = store.get_many([key_of(i) for i in range(8)])
    assert got == [chunk_stream(i) for i in range(6)] + [None, None]
    assert sorted(store.keys()) == sorted(key_of(i) for i in range(6))


def test_has_delete(store) -> None:
    store.put(key_of(3), chunk_stream(3))
    assert store.has(key_of(3)) and not store.has(key_of(4))
    assert store.delete(key_of(3)) is True
    assert store.delete(key_of(3)) is False
    assert not store.has(key_of(3)) and store.get(key_of(3)) is None


def test_sizes_answer_a_batch_of_keys(store) -> None:
    store.put_many([(key_of(i), chunk_stream(i)) for i in range(3)])
    sizes = store.sizes([key_of(i) for i in range(5)])
    assert sizes[3:] == [None, None]
    for size, i in zip(sizes[:3], range(3)):
        assert size == 0 or size >= len(chunk_stream(i)), f"key {i}: size {size}"
    assert store.sizes([]) == []
    with pytest.raises(InvalidKey):
        store.sizes([key_of(0), "not-a-key"])


def test_bad_keys_are_refused(store) -> None:
    for bad in ("xyz", key_of(1).upper(), key_of(1)[:-1]):
        with pytest.raises(InvalidKey, match="64 lowercase hex"):
            store.put(bad, chunk_stream(1))
        with pytest.raises(InvalidKey):
            store.get(bad)


def test_corrupt_upload_is_refused(store) -> None:
    blob = bytearray(chunk_stream(5))
    blob[len(blob) // 2] ^= 0x01
    with pytest.raises(IntegrityError, match="stream rejected"):
        store.put(key_of(5), bytes(blob))
    with pytest.raises(IntegrityError):
        store.put_many([(key_of(6), chunk_stream(6)), (key_of(5), bytes(blob))])
    assert not store.has(key_of(5)) and not store.has(key_of(6))  # all-or-nothing verification


def _same_place(store, tenant: str):
    """A second handle on the same backend location serving another tenant."""
    from _store_fixtures import VERIFIER_OPTIONS

    from kvcodec.store import open_store

    if store.scheme == "file":
        return open_store(str(store.root), tenant=tenant, **VERIFIER_OPTIONS)
    if store.scheme == "redis":
        return open_store(store.url, tenant=tenant, **VERIFIER_OPTIONS)
    if store.scheme == "s3":
        return open_store(f"s3://{store.bucket}/{store.prefix}", endpoint_url=store.endpoint_url,
                          tenant=tenant, **VERIFIER_OPTIONS)
    return None


def test_tenants_are_isolated(store) -> None:
    other = _same_place(store, "tenant-b")
    if other is None:
        pytest.skip(f"{store.scheme}: one process-local object per handle, nothing shared")
    store.put(key_of(7), chunk_stream(7))
    assert other.get(key_of(7)) is None and not other.has(key_of(7))
    assert other.put(key_of(7), chunk_stream(8)) is True  # B's own entry; A's untouched
    assert store.get(key_of(7)) == chunk_stream(7)
    assert other.get(key_of(7)) == chunk_stream(8)
    assert list(other.keys()) == [key_of(7)] and list(store.keys()) == [key_of(7)]
    assert other.delete(key_of(7)) and store.get(key_of(7)) == chunk_stream(7)
    other.close()


def test_chunk_key_tenant_must_match_store(store) -> None:
    spec = KeySpec(model="m", layers=2, kv_heads=1, head_dim=16, tenant="someone-else")
    key = spec.chunk_keys([1, 2, 3])[0]
    with pytest.raises(KeyMismatch, match="tenant"):
        store.put(key, chunk_stream(9))
    assert not store.has(key)


def test_scrub_and_stats_and_health(store) -> None:
    for i in range(3):
        store.put(key_of(i), chunk_stream(i))
    report = store.scrub()
    assert report["bad"] == [] and report["checked"] >= 3  # tiered: counted per tier
    assert store.health()["ok"] is True
    assert store.stats()["bad_entries"] == 0


def test_evict_to_zero_empties_the_store(store) -> None:
    for i in range(4):
        store.put(key_of(i), chunk_stream(i))
    store.evict_to(0)
    assert list(store.keys()) == []
    assert store.get(key_of(0)) is None
