"""Tampered entries on every backend are clean misses, removed and counted (RELIABILITY.md 9, 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _store_fixtures import chunk_stream, key_of

from kvcodec.store import KeySpec
from kvcodec.store.envelope import HEADER_SIZE, wrap


def _raw_get(store) -> bytes:
    return store._read_many([key_of(1)])[0]


def _overwrite(store, kind: str, blob: bytes, request) -> None:
    """Replace the stored bytes of key_of(1) behind the store's back, per backend."""
    if kind == "local":
        path = next(Path(store.root, "objects").rglob(key_of(1)))
        path.write_bytes(blob)
    elif kind == "memory":
        store._entries[(store.namespace, key_of(1))] = blob
    elif kind == "redis":
        client = request.getfixturevalue("redis_server").client()
        client.set(store._name(key_of(1)), blob)
    elif kind == "s3":
        client = request.getfixturevalue("moto_s3").client()
        client.put_object(Bucket=store.bucket, Key=store._name(key_of(1)), Body=blob)


def _flip(blob: bytes, offset: int) -> bytes:
    out = bytearray(blob)
    out[offset] ^= 0x40
    return bytes(out)


TAMPERS = {
    "payload bit": lambda b: _flip(b, len(b) - 20),
    "envelope key": lambda b: _flip(b, 10),
    "truncated": lambda b: b[: len(b) // 2],
    "extended": lambda b: b + b"\0",
    "other key's entry": lambda b: wrap(key_of(2), chunk_stream(2)),
    "valid envelope, corrupt stream": lambda b: wrap(key_of(1), _flip(chunk_stream(1), 30)),
    "other tenant's entry": lambda b: wrap(key_of(1), chunk_stream(1), tenant="mallory"),
    "not an envelope": lambda b: b"garbage",
}


@pytest.mark.parametrize("kind", ["memory", "local", "redis", "s3"])
@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampered_entry_is_a_clean_miss(make_store, request, kind: str, tamper: str) -> None:
    store = make_store(kind)
    store.put(key_of(1), chunk_stream(1))
    _overwrite(store, kind, TAMPERS[tamper](_raw_get(store)), request)
    assert store.get(key_of(1)) is None
    assert store.stats()["bad_entries"] == 1
    assert not store.has(key_of(1))  # removed, so a fresh put can heal it
    assert store.put(key_of(1), chunk_stream(1)) is True
    assert store.get(key_of(1)) == chunk_stream(1)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_scrub_reports_and_removes_bad_entries(make_store, request, kind: str) -> None:
    store = make_store(kind)
    for i in range(3):
        store.put(key_of(i), chunk_stream(i))
    raw = _raw_get(store)
    _overwrite(store, kind, raw[:HEADER_SIZE] + bytes(len(raw) - HEADER_SIZE), request)
    report = store.scrub(remove=False)
    assert [b["key"] for b in report["bad"]] == [key_of(1)]
    assert "payload sha256" in report["bad"][0]["reason"]
    assert store.has(key_of(1))
    assert store.scrub()["bad"] and not store.has(key_of(1))
    assert store.scrub() == {"checked": 2, "bad": []}


def test_tiered_bad_cache_entry_falls_through(make_store) -> None:
    store = make_store("tiered")
    store.put(key_of(1), chunk_stream(1))
    cache = store.tiers[0]
    cache._entries[(cache.namespace, key_of(1))] = b"garbage"
    assert store.get(key_of(1)) == chunk_stream(1)  # served from disk, cache healed
    assert cache.get(key_of(1)) == chunk_stream(1)
    assert store.stats()["bad_entries"] == 1


def test_upload_must_match_its_key_metadata(make_store) -> None:
    """A ChunkKey binds the stream's layout; mismatches are refused (needs real streams)."""
    from _store_fixtures import LAYERS, HEAD_DIM, KV_HEADS, MODEL, USE_CODEC

    if not USE_CODEC:
        pytest.skip("stand-in streams carry no layout")
    store = make_store("local")
    spec = KeySpec(model=MODEL, layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                   codec_profile="balanced")
    good = spec.chunk_keys(list(range(8)), chunk_tokens=8)[0]
    assert store.put(good, chunk_stream(1, 8)) is True
    wrong_len = spec.chunk_keys(list(range(9)), chunk_tokens=9)[0]
    from kvcodec.store import KeyMismatch

    with pytest.raises(KeyMismatch, match="tokens"):
        store.put(wrong_len, chunk_stream(1, 8))
    other_level = KeySpec(model=MODEL, layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                          codec_profile="compact").chunk_keys(list(range(8)), chunk_tokens=8)[0]
    with pytest.raises(KeyMismatch, match="level"):
        store.put(other_level, chunk_stream(1, 8))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvcodec.store import IntegrityError  # noqa: E402
from kvcodec.store.envelope import unwrap  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 10_000), st.integers(0, 255))
def test_envelope_parser_only_raises_integrity_errors(junk: bytes, pos: int, xor: int) -> None:
    """Arbitrary bytes, and any single-byte change of a valid entry, never get through."""
    good = wrap(key_of(1), b"payload" * 10, tenant="t")
    assert unwrap(good, key_of(1), "t") == b"payload" * 10
    for blob in (junk, b"\0" + junk + good, good[: pos % len(good)]):
        with pytest.raises(IntegrityError):
            unwrap(blob, key_of(1), "t")
    if xor:
        bad = bytearray(good)
        bad[pos % len(good)] ^= xor
        with pytest.raises(IntegrityError):
            unwrap(bytes(bad), key_of(1), "t")


def test_redis_setrange_in_place_is_a_clean_miss(make_store, redis_server) -> None:
    store = make_store("redis")
    store.put(key_of(1), chunk_stream(1))
    name = store._name(key_of(1))
    client = redis_server.client()
    client.setrange(name, client.strlen(name) - 7, b"\x00\x01")
    assert store.get(key_of(1)) is None and client.exists(name) == 0
    assert store.stats()["bad_entries"] == 1
