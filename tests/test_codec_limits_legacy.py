"""Coder-2 (constriction) streams cannot be made to cost unbounded decode work.

Each distinct (class, kmax) pair costs a model table of 2*kmax+1 entries; a
crafted stream with huge kmax values in many channels used to cost ~100 µs of
CPU per input byte. The decoder now refuses table work out of proportion to
the payload size (LimitExceeded), quickly.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from kvcodec.codec import container, decode
from kvcodec.codec.errors import KVCodecError, LimitExceeded

LEGACY = Path(__file__).parent / "golden_coder2"


def _forge_kmax(blob: bytes, kmax: int) -> bytes:
    """Set every channel's kmax (and a non-zero class) in substream 0, fixing its CRC."""
    layout = container.parse(blob)
    h = layout.header
    width = container.DTYPE_BYTES[h.dtype]
    channels = h.kv_heads * h.head_dim
    start = layout.offsets[0] + h.kv_heads * h.block_raw_tokens(0) * h.head_dim * width
    kmax_at = start + 4 * h.kv_heads + 2 * channels
    out = bytearray(blob)
    for c in range(channels):
        struct.pack_into("<H", out, kmax_at + 2 * c, kmax - c)  # distinct tables
        out[kmax_at + 2 * channels + c] = 60
    payload = bytes(out[layout.offsets[0] : layout.offsets[0] + layout.lengths[0]])
    index_at = layout.header_bytes
    struct.pack_into("<I", out, index_at + 4, container.crc32(payload))
    index = bytes(out[index_at : index_at + 8 * h.n_substreams])
    struct.pack_into("<I", out, index_at + 8 * h.n_substreams, container.crc32(index))
    return bytes(out)


@pytest.mark.parametrize("name", sorted(p.name for p in LEGACY.glob("*.kvc") if "lossless" not in p.name))
def test_huge_kmax_tables_are_refused_quickly(name: str) -> None:
    blob = (LEGACY / name).read_bytes()
    forged = _forge_kmax(blob, 60000)
    start = time.perf_counter()
    with pytest.raises(LimitExceeded, match="table entries"):
        decode(forged)
    assert time.perf_counter() - start < 2.0


def test_legitimate_legacy_streams_stay_within_the_limit() -> None:
    for path in LEGACY.glob("*.kvc"):
        try:
            decode(path.read_bytes())
        except KVCodecError as exc:  # pragma: no cover - the assertion explains
            pytest.fail(f"{path.name}: {exc}")


def test_max_output_bytes_is_enforced_before_decoding() -> None:
    import torch

    from kvcodec.codec import DecodeLimits, encode

    blob = encode(torch.zeros(1, 1, 64, 8, dtype=torch.float16), torch.zeros(1, 1, 64, 8, dtype=torch.float16))
    decode(blob, limits=DecodeLimits(max_output_bytes=2 * 64 * 8 * 2))  # exactly fits
    with pytest.raises(LimitExceeded, match="output bytes"):
        decode(blob, limits=DecodeLimits(max_output_bytes=2 * 64 * 8 * 2 - 1))
