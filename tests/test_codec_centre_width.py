"""Coder-3 side information (FORMAT.md): plain (one- or two-byte centres, old streams) and packed.

Encoders write packed side information (header flag 2): class differences and centres
entropy-coded with coder 3's own tables. Streams without the flag carry centres of one byte
when they fit in int8 and two otherwise; they must keep decoding.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kvcodec.codec import container, decode, encode, inspect, substream
from kvcodec.codec.errors import CorruptStream
from kvcodec.codec.quantize import head_steps

LEGACY = Path(__file__).parent / "golden_coder3_plain"


def _rule(x: torch.Tensor, factor: float = 1.0) -> np.ndarray:
    return head_steps(x, 0.1)


def _plain_width(x: torch.Tensor) -> int:
    payload = substream.encode_quantized(x, _rule, packed=False)
    return payload[4 * x.shape[0]]


def test_plain_centres_use_one_byte_when_they_fit_and_two_otherwise() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 8, generator=gen)
    assert _plain_width(x) == 1
    assert _plain_width(x + 200) == 2  # mean >> step
    payload = substream.encode_quantized(x + 200, _rule, packed=False)
    out = substream.decode_quantized(memoryview(payload), 2, 64, 8, torch.float32, torch.float32)
    steps = struct.unpack_from("<2f", payload, 0)
    assert (out - (x + 200)).abs().max() <= max(steps) / 2 + 1e-3


@pytest.mark.parametrize("offset", [0.0, 200.0])
def test_packed_side_information_is_smaller_and_decodes_the_same(offset: float) -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 256, 64, generator=gen) + offset
    plain = substream.encode_quantized(x, _rule, packed=False)
    packed = substream.encode_quantized(x, _rule, packed=True)
    a = substream.parse_rans(memoryview(plain), 3, 64)
    b = substream.parse_rans(memoryview(packed), 3, 64, packed=True)
    assert np.array_equal(a.centers, b.centers) and np.array_equal(a.classes, b.classes)
    assert np.array_equal(a.words, b.words) and np.array_equal(a.escapes, b.escapes)
    assert len(packed) < len(plain)


def test_streams_set_the_packed_flag_and_count_the_coded_side_symbols() -> None:
    x = torch.randn(2, 3, 300, 16)
    blob = encode(x.half(), x.half(), level="balanced")
    h = container.parse(blob).header
    assert h.packed_side and h.flags & container.FLAG_PACKED_SIDE
    side = inspect(blob).side_info_bytes
    fixed = container.parse(blob).header_bytes + container.parse(blob).index_bytes
    assert fixed + h.n_substreams * substream.quantized_side_bytes(3, 16, packed=True) < side


def _rewrite_substream(blob: bytearray, sid: int, mutate) -> bytes:
    layout = container.parse(bytes(blob))
    start, length = layout.offsets[sid], layout.lengths[sid]
    mutate(blob, start)
    payload = bytes(blob[start : start + length])
    entry = layout.header_bytes + 8 * sid
    struct.pack_into("<I", blob, entry + 4, container.crc32(payload))
    index = bytes(blob[layout.header_bytes : layout.header_bytes + 8 * layout.header.n_substreams])
    struct.pack_into("<I", blob, layout.header_bytes + len(index), container.crc32(index))
    return bytes(blob)


def test_an_unknown_centre_width_in_an_old_stream_is_refused() -> None:
    blob = bytearray((LEGACY / "small_fp16.balanced.kvc").read_bytes())
    h = container.parse(bytes(blob)).header
    assert not h.packed_side
    raw = h.kv_heads * h.block_raw_tokens(0) * h.head_dim * 2

    def set_width(b: bytearray, start: int) -> None:
        b[start + raw + 4 * h.kv_heads] = 3

    with pytest.raises(CorruptStream, match="centre width: 3"):
        decode(_rewrite_substream(blob, 0, set_width))


def test_a_lying_packed_side_count_is_refused() -> None:
    x = torch.randn(1, 2, 64, 8)
    blob = bytearray(encode(x.half(), x.half(), level="balanced", sink_tokens=0))

    def lie(b: bytearray, start: int) -> None:
        struct.pack_into("<I", b, start + 8 + 2 + 4, 0xFFFFFF)  # n_side_words

    with pytest.raises(CorruptStream, match="side information"):
        decode(_rewrite_substream(blob, 0, lie))
