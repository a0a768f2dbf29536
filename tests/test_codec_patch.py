"""Patches (header flag 16): the values of the tokens most like the attention sink, coded finer."""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from kvcodec.codec import container, decode, decode_layer, decode_layers, encode, inspect, patch, verify
from kvcodec.codec import transform as tr
from kvcodec.codec.errors import ChecksumMismatch, CorruptStream, InvalidInput, UnsupportedFormat
from test_codec_predict import _kv
from test_codec_transform import INV_FREQ, LAYERS, _profile

TOKENS = 300
SECONDARY = [37, 120, 121, 250, 299]  # tokens made to point like the sink


@pytest.fixture(scope="module")
def prof():
    return _profile()


@pytest.fixture(scope="module")
def kv():
    """KV whose SECONDARY tokens have the sink's keys (before RoPE): secondary attention sinks."""
    keys, values = (t.float() for t in _kv(5, TOKENS))
    rope = tr.Rope(INV_FREQ)
    pre = torch.stack([tr.unrotate(layer, rope, 0) for layer in keys])
    pre[:, :, SECONDARY] = pre[:, :, :1] * 0.9
    keys = torch.stack([tr.rotate(layer, rope, 0) for layer in pre])
    return keys.half(), values.half()


def test_high_patches_the_tokens_that_point_like_the_sink(prof, kv):
    keys, values = kv
    blob = encode(keys, values, level="high", model="tiny", profile=prof)
    h = container.parse(blob).header
    assert h.patched and h.n_entries == h.n_substreams + 2 * LAYERS
    assert inspect(blob).patched_tokens == round(0.02 * (TOKENS - 1)) == 6
    entry = patch.parse_entry(container.substream(blob, container.parse(blob), h.patch_id(0, True)), 2, TOKENS, 8)
    assert set(SECONDARY) <= set(entry.tokens.tolist()) and 0 not in entry.tokens
    assert container.parse(blob).lengths[h.patch_id(0, False)] == 0  # keys are not patched

    plain = encode(keys, values, level="balanced", model="tiny", profile=prof)  # balanced patches nothing
    assert not container.parse(plain).header.patched and inspect(plain).patched_tokens == 0

    # the patched tokens' value error shrinks ~8x; every other element is as the unpatched stream decodes
    without = container.pack(_unflagged(h), [bytes(container.substream(blob, container.parse(blob), s))
                                             for s in range(h.n_substreams)])
    a, b = decode(without, profile=prof), decode(blob, profile=prof)
    assert torch.equal(a.keys, b.keys)
    idx = entry.tokens
    rest = np.setdiff1d(np.arange(TOKENS), idx)
    assert torch.equal(a.values[:, :, rest], b.values[:, :, rest])
    err_a = (a.values[:, :, idx].float() - values[:, :, idx].float()).pow(2).mean()
    err_b = (b.values[:, :, idx].float() - values[:, :, idx].float()).pow(2).mean()
    assert err_b < err_a / 20


def _unflagged(h: container.Header) -> container.Header:
    return replace(h, flags=h.flags & ~container.FLAG_PATCHED)


def test_every_decoder_applies_the_same_patches(prof, kv):
    keys, values = kv
    blob = encode(keys, values, level="high", model="tiny", profile=prof)
    ref = decode(blob, profile=prof)
    for other in (decode(blob, profile=prof, threads=3), decode(blob, profile=prof, backend="torch")):
        assert torch.equal(other.keys, ref.keys) and torch.equal(other.values, ref.values)
    for layer, k, v in decode_layers(blob, profile=prof, threads=2):
        assert torch.equal(k, ref.keys[layer]) and torch.equal(v, ref.values[layer])
    for layer, k, v in decode_layers(blob, profile=prof, backend="torch", batch_layers=1):
        assert torch.equal(v, ref.values[layer])
    one = decode_layer(blob, 1, profile=prof)
    assert torch.equal(one.values, ref.values[1])
    wide = decode(blob, profile=prof, dtype=torch.float32)  # float32, then rounded: the float16 decode
    assert torch.equal(wide.values.half(), ref.values) and torch.equal(wide.keys.half(), ref.keys)
    # the device encoder (torch on the CPU here) writes the same bytes, patches included
    assert encode(keys, values, level="high", model="tiny", profile=prof, backend="torch") == blob
    assert verify(blob, profile=prof).patched_tokens == 6


def test_streams_after_position_zero_patch_only_with_the_sinks_keys(prof, kv):
    keys, values = kv
    first = 1000
    rope = tr.Rope(INV_FREQ)
    later = torch.stack([tr.rotate(tr.unrotate(layer.float(), rope, 0), rope, first) for layer in keys]).half()
    blob = encode(later, values, level="high", model="tiny", profile=prof, first_position=first)
    assert not container.parse(blob).header.patched  # no sink in the stream, none given
    blob = encode(later, values, level="high", model="tiny", profile=prof, first_position=first,
                  sink_keys=keys[:, :, 0])
    layout = container.parse(blob)
    entry = patch.parse_entry(container.substream(blob, layout, layout.header.patch_id(1, True)), 2, TOKENS, 8)
    assert set(SECONDARY) | {0} <= set(entry.tokens.tolist())  # token 0 is no sink here: not raw, so eligible
    with pytest.raises(InvalidInput, match=r"sink_keys: shape \(2, 8\) != \(2, 2, 8\)"):
        encode(later, values, level="high", model="tiny", profile=prof, first_position=first,
               sink_keys=keys[:, 0, 0])
    # without a profile there is no RoPE to compare keys before: no patches
    assert not container.parse(encode(keys, values, level="high", profile=None)).header.patched


def _rewrite(blob: bytes, sid: int, payload: bytes) -> bytes:
    layout = container.parse(blob)
    parts = [bytes(container.substream(blob, layout, s)) for s in range(layout.header.n_entries)]
    parts[sid] = payload
    return container.pack(layout.header, parts)


def test_corrupt_patches_are_refused_by_name(prof, kv):
    keys, values = kv
    blob = encode(keys, values, level="high", model="tiny", profile=prof)
    layout = container.parse(blob)
    sid = layout.header.patch_id(1, True)
    good = bytes(container.substream(blob, layout, sid))
    n = struct.unpack_from("<I", good)[0]
    heads, dim = 2, 8
    steps_at = 4 + 4 * n
    bad = {
        "count 0": struct.pack("<I", 0) + good[4:],
        "exactly": good + b"\0",
        "increase strictly": good[:8] + good[4:8] + good[12:],
        "finite": good[:steps_at] + struct.pack("<f", float("nan")) + good[steps_at + 4:],
        "symbol -8": good[:steps_at + 4 * heads] + b"\x88" + good[steps_at + 4 * heads + 1:],
        "shorter than its count": b"\x01",
    }
    assert len(good) == patch.entry_bytes(n, heads, dim)
    for match, payload in bad.items():
        broken = _rewrite(blob, sid, payload)
        for run in (lambda: decode(broken, profile=prof), lambda: verify(broken, profile=prof),
                    lambda: decode(broken, profile=prof, backend="torch")):
            with pytest.raises(CorruptStream, match=f"patch entry {sid} \\(layer 1, values\\).*{match}"):
                run()
    flipped = bytearray(blob)
    flipped[layout.offsets[sid] + 10] ^= 1
    with pytest.raises(ChecksumMismatch, match=f"patch entry {sid}"):
        verify(bytes(flipped), profile=prof, full=False)


def test_lossless_streams_cannot_carry_patches(kv):
    keys, values = kv
    blob = encode(keys, values, level="lossless")
    h = container.parse(blob).header
    h.flags |= container.FLAG_PATCHED
    forged = container.pack(h, [bytes(container.substream(blob, container.parse(blob), s))
                                for s in range(h.n_substreams)] + [b""] * (2 * LAYERS))
    with pytest.raises(UnsupportedFormat, match="patches need the quantized mode"):
        decode(forged)


def test_choose_tokens_skips_raw_tokens_and_caps_the_count():
    pre = torch.randn(2, 2, 10, 4)
    sink = pre[:, :, 0]
    pre[:, :, 5] = sink
    chosen = patch.choose_tokens(pre, sink, 3, skip=1)
    assert 5 in chosen and 0 not in chosen and len(chosen) == 3 and list(chosen) == sorted(chosen)
    assert len(patch.choose_tokens(pre, sink, 50, skip=1)) == 9
