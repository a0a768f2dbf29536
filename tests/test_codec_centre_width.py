"""Coder-3 centres are one byte when they fit in int8, two otherwise (FORMAT.md)."""

from __future__ import annotations

import struct

import pytest
import torch

from kvcodec.codec import container, decode, encode, inspect
from kvcodec.codec.errors import CorruptStream


def _width_bytes(blob: bytes) -> list[int]:
    layout = container.parse(blob)
    h = layout.header
    out = []
    for sid in range(h.n_substreams):
        raw = h.kv_heads * h.block_raw_tokens(sid % h.blocks_per_tensor) * h.head_dim * 2
        out.append(blob[layout.offsets[sid] + raw + 4 * h.kv_heads])
    return out


def test_small_centres_use_one_byte_and_large_ones_two() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 64, 8, generator=gen)
    small = encode(x.half(), x.half(), level="high", sink_tokens=0)
    large = encode((x + 200).half(), x.half(), level="high", sink_tokens=0)  # mean >> step
    assert set(_width_bytes(small)) == {1}
    assert _width_bytes(large)[0] == 2 and _width_bytes(large)[1] == 1
    # the two-byte centres are counted as side information
    assert inspect(large).side_info_bytes == inspect(small).side_info_bytes + 2 * 8
    kv = decode(large)
    steps = struct.unpack_from("<2f", large, container.parse(large).offsets[0])
    assert (kv.keys.float() - (x + 200).half().float()).abs().max() <= max(steps) / 2 + 0.125


def test_an_unknown_centre_width_is_refused() -> None:
    x = torch.randn(1, 1, 32, 8)
    blob = bytearray(encode(x.half(), x.half(), level="balanced", sink_tokens=0))
    layout = container.parse(bytes(blob))
    at = layout.offsets[0] + 4
    blob[at] = 3
    payload = bytes(blob[layout.offsets[0] : layout.offsets[0] + layout.lengths[0]])
    struct.pack_into("<I", blob, layout.header_bytes + 4, container.crc32(payload))
    index = bytes(blob[layout.header_bytes : layout.header_bytes + 8 * layout.header.n_substreams])
    struct.pack_into("<I", blob, layout.header_bytes + len(index), container.crc32(index))
    with pytest.raises(CorruptStream, match="centre width: 3"):
        decode(bytes(blob))
