"""Chunk-key derivation (RELIABILITY.md case 15; FORMAT.md "Chunk keys" vectors)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcodec.store import ChunkKey, InvalidKey, KeySpec, chunk_token_ids
from kvcodec.store.keys import check_key, config_fingerprint

SPEC = KeySpec(model="smollm2-135m", tokenizer="smollm2", layers=30, kv_heads=3, head_dim=64)
TOKENS = [1, 2, 3, 4, 5]

# The vectors printed in FORMAT.md ("Chunk keys"): spec above, chunk_tokens=4.
GOLDEN = {
    ("", "prefix"): ["98a31b57baf9aefe484519e5ba0b89fe7973ca474da496f1a1dcface668ad3aa",
                     "43841eb404db7a2d5a7c24a1d3dd362c55ae856aed2044ae59ba7158d9383c8a"],
    ("", "position_free"): ["652838abfd7084854e43dea6648f85d5e4cbc8727e0f6820ca7812af3795e2fc",
                            "035a87ad6664a2e2bf243ef41e6d84c825573094940d4c2f7282efea5979d2ba"],
    ("acme", "prefix"): ["bcce97e806256058515296998a71a18f639fc2b05618034f0b75fcda361ed6fc",
                         "998d4e1225cf6d27b47803d3055dbc501164a9ed0037f3621a0da4edd28cb1f8"],
}
SPEC_DIGEST = "3c330535323675902bd4409575335cb0d5a359a5fc301161bc55a6e48f718e28"


def hexes(spec: KeySpec, tokens=TOKENS, **kw) -> list[str]:
    return [k.hex for k in spec.chunk_keys(tokens, **{"chunk_tokens": 4, **kw})]


@pytest.mark.parametrize(("tenant", "mode"), list(GOLDEN))
def test_golden_vectors(tenant: str, mode: str) -> None:
    spec = dataclasses.replace(SPEC, tenant=tenant)
    assert hexes(spec, mode=mode) == GOLDEN[(tenant, mode)]


def test_spec_encoding_follows_format_md() -> None:
    """Rebuild the records from the FORMAT.md field table alone, with hashlib."""
    def s(text: str) -> bytes:
        return struct.pack("<I", len(text.encode())) + text.encode()

    spec_record = (b"kvcodec.key.spec\x00" + struct.pack("<H", 1) + s("smollm2-135m") + s("")
                   + s("smollm2") + struct.pack("<III", 30, 3, 64) + s("float16")
                   + s("balanced") + s(""))
    assert spec_record == SPEC.encoding()
    spec_digest = hashlib.sha256(spec_record).digest()
    assert spec_digest.hex() == SPEC_DIGEST
    first = hashlib.sha256(b"kvcodec.key.chunk\x00" + struct.pack("<HB", 1, 1) + spec_digest
                           + bytes(32) + struct.pack("<Q4I", 4, 1, 2, 3, 4)).digest()
    second = hashlib.sha256(b"kvcodec.key.chunk\x00" + struct.pack("<HB", 1, 1) + spec_digest
                            + first + struct.pack("<QI", 1, 5)).digest()
    assert [first.hex(), second.hex()] == GOLDEN[("", "prefix")]


@pytest.mark.parametrize("change", [
    {"model": "smollm2-360m"}, {"model_fingerprint": "abc"}, {"tokenizer": "llama"},
    {"layers": 31}, {"kv_heads": 4}, {"head_dim": 128}, {"dtype": "bfloat16"},
    {"codec_profile": "compact"}, {"tenant": "b"},
])
def test_every_spec_field_changes_every_key(change: dict) -> None:
    base = hexes(SPEC)
    other = hexes(dataclasses.replace(SPEC, **change))
    assert not set(base) & set(other)


def test_tokens_change_the_key_and_prefix_keys_chain() -> None:
    base = hexes(SPEC, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    changed_first = hexes(SPEC, [0, 2, 3, 4, 5, 6, 7, 8, 9])
    changed_last = hexes(SPEC, [1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert all(a != b for a, b in zip(base, changed_first))  # every later key moves
    assert base[:2] == changed_last[:2] and base[2] != changed_last[2]


def test_position_free_keys_ignore_what_precedes() -> None:
    a = hexes(SPEC, [1, 2, 3, 4, 9, 9, 9, 9], mode="position_free")
    b = hexes(SPEC, [7, 7, 7, 7, 9, 9, 9, 9], mode="position_free")
    assert a[1] == b[1] and a[0] != b[0]
    assert hexes(SPEC, [9, 9, 9, 9], mode="position_free")[0] == a[1]
    assert hexes(SPEC, [9, 9, 9, 9], mode="prefix")[0] != a[1]


def test_tail_chunk_is_explicit() -> None:
    keys = SPEC.chunk_keys(list(range(10)), chunk_tokens=4)
    assert [(k.index, k.token_start, k.token_count) for k in keys] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert len(SPEC.chunk_keys(list(range(10)), chunk_tokens=4, include_tail=False)) == 2
    # A 2-token tail never equals a chunk over a longer run of the same leading ids.
    assert hexes(SPEC, [5, 6], mode="position_free") != hexes(SPEC, [5, 6, 0, 0], mode="position_free")
    assert chunk_token_ids(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_token_ids([], 4) == []


def test_dtype_names_are_canonical() -> None:
    import torch

    assert hexes(dataclasses.replace(SPEC, dtype=torch.float16)) == hexes(SPEC)
    assert hexes(dataclasses.replace(SPEC, dtype="fp16")) == hexes(SPEC)


CHILD = (
    "import json,sys; from kvcodec.store import KeySpec;"
    "s=KeySpec(model='smollm2-135m', tokenizer='smollm2', layers=30, kv_heads=3, head_dim=64);"
    "print(json.dumps([k.hex for k in s.chunk_keys(list(range(600)))]))"
)


def test_keys_identical_across_processes_and_hash_seeds() -> None:
    results = []
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        results.append(json.loads(out.stdout))
    assert all(r == results[0] for r in results)
    assert results[0] == [k.hex for k in SPEC.chunk_keys(list(range(600)))]
    assert len(results[0]) == 3


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"model": ""}, "model"), ({"layers": 0}, "layers"), ({"head_dim": -1}, "head_dim"),
    ({"dtype": "int8"}, "dtype"), ({"tenant": None}, "tenant"),
])
def test_bad_spec_fields_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SPEC, **kwargs)


def test_bad_tokens_and_modes() -> None:
    with pytest.raises(ValueError, match=r"token_ids\[1\]"):
        SPEC.chunk_keys([1, -2, 3])
    with pytest.raises(ValueError, match="token_ids"):
        SPEC.chunk_keys([1, 2**32])
    with pytest.raises(ValueError, match="mode"):
        SPEC.chunk_keys([1], mode="sliding")
    with pytest.raises(ValueError, match="chunk_tokens"):
        SPEC.chunk_keys([1], chunk_tokens=0)


def test_check_key() -> None:
    key = SPEC.chunk_keys([1])[0]
    assert isinstance(key, ChunkKey) and check_key(key) == key.hex == str(key)
    assert len(key.digest) == 32
    for bad in ("A" * 64, "a" * 63, "g" * 64, 5, None, key.hex.upper()):
        with pytest.raises(InvalidKey, match="64 lowercase hex"):
            check_key(bad)


def test_config_fingerprint_is_order_independent() -> None:
    assert config_fingerprint({"a": 1, "b": [1, 2]}) == config_fingerprint({"b": [1, 2], "a": 1})
    assert config_fingerprint({"a": 1}) != config_fingerprint({"a": 2})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=40), st.integers(1, 9))
def test_chunking_properties(tokens: list[int], size: int) -> None:
    keys = SPEC.chunk_keys(tokens, chunk_tokens=size)
    assert sum(k.token_count for k in keys) == len(tokens)
    assert all(k.token_count == size for k in keys[:-1])
    assert len({k.hex for k in keys}) == len(keys)  # prefix keys never repeat within a sequence
    assert [k.token_start for k in keys] == list(range(0, len(tokens), size))
