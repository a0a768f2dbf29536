"""KeySpec.salt: a per-request salt narrows a tenant's namespace in the embedded store
(FORMAT.md "Chunk keys"; RELIABILITY cases 15, 16 and 27)."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path

import pytest
import torch

from kvcodec.codec import encode
from kvcodec.store import KeySpec, open_store

SPEC = KeySpec(model="smollm2-135m", tokenizer="smollm2", layers=30, kv_heads=3, head_dim=64)
FORMAT_MD = (Path(__file__).resolve().parent.parent / "FORMAT.md").read_text(encoding="utf-8")
SALTED = ["052a77fa2321629a18eda37eb20958e33ddb0d7333f28ede355f6927cc4166b2",
          "8e31aff8f2bcc80ad0acbbc38b04f421073b681cbbaab1c325bd90a987956347"]


def hexes(spec: KeySpec) -> list[str]:
    return [k.hex for k in spec.chunk_keys([1, 2, 3, 4, 5], 4)]


def test_salted_vector_is_the_one_in_format_md():
    spec = dataclasses.replace(SPEC, tenant="acme", salt="user-1")
    assert hexes(spec) == SALTED
    assert all(key in FORMAT_MD for key in SALTED)


def test_salt_is_an_optional_last_field_of_the_spec_record():
    salted = dataclasses.replace(SPEC, tenant="acme", salt="user-1")
    plain = dataclasses.replace(SPEC, tenant="acme")
    assert salted.encoding() == plain.encoding() + struct.pack("<I", 6) + b"user-1"
    assert salted.digest() == hashlib.sha256(salted.encoding()).digest()
    assert hexes(dataclasses.replace(SPEC, salt="")) == hexes(SPEC)  # no salt: keys as before


@pytest.mark.parametrize("a,b", [
    (("acme", "s"), ("acme", "")), (("acme", "s"), ("acme", "t")), (("acme", "s"), ("other", "s")),
    (("", "acme"), ("acme", "")), (("a", "b"), ("ab", "")), (("a", ""), ("a\x00\x00\x00\x00", "")),
    (("cafe\u0301", ""), ("café", "")),  # NFD and NFC forms: two namespaces, never one
])
def test_every_tenant_salt_pair_has_its_own_keys(a, b):
    one = hexes(dataclasses.replace(SPEC, tenant=a[0], salt=a[1]))
    two = hexes(dataclasses.replace(SPEC, tenant=b[0], salt=b[1]))
    assert not set(one) & set(two)


def test_salt_must_be_a_string():
    with pytest.raises(ValueError, match="salt: expected a string"):
        KeySpec(model="m", layers=1, kv_heads=1, head_dim=8, salt=None)  # type: ignore[arg-type]


def test_a_salted_entry_is_reachable_only_with_its_salt(tmp_path):
    store = open_store(f"file://{tmp_path}", tenant="acme")
    spec = KeySpec(model="m", layers=1, kv_heads=1, head_dim=16, codec_profile="high",
                   tenant="acme", salt="user-1")
    key = spec.chunk_keys(list(range(8)), 8)[0]
    kv = torch.randn(1, 1, 8, 16).half()
    assert store.put(key, encode(kv, kv, level="high", model="m"))
    for other in (dataclasses.replace(spec, salt=""), dataclasses.replace(spec, salt="user-2")):
        assert store.get(other.chunk_keys(list(range(8)), 8)[0]) is None
    assert store.get(key) is not None
    other_tenant = open_store(f"file://{tmp_path}", tenant="acme2")
    assert other_tenant.get(key.hex) is None
