"""One substream: a layer's keys or values for one block of tokens.

Two payload layouts, chosen by the header's mode (FORMAT.md, "Substreams"):

* quantized (coder 2): ``steps f32[H] | centers i16[C] | kmax u16[C] |
  classes u8[C] | ANS words u32[...]`` with ``C = H * head_dim``.
* lossless (coder 1): the raw little-endian bits of the block in channel-major
  order ``[H, head_dim, tokens]``, split into byte planes (plane ``b`` holds
  byte ``b`` of every element), each plane a zstd frame preceded by its
  length (u32).
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import zstandard

from kvcodec.codec import entropy
from kvcodec.codec.errors import CorruptStream
from kvcodec.codec.quantize import dequantize_block, head_steps, quantize_block

ZSTD_LEVEL = 10
_U32 = struct.Struct("<I")
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def quantized_side_bytes(heads: int, dim: int) -> int:
    """Size of a quantized substream's side information."""
    channels = heads * dim
    return 4 * heads + 5 * channels


def encode_quantized(x: torch.Tensor, fraction: float) -> bytes:
    """Quantize and entropy-code ``x`` (``[H, T, D]``, float32, any device)."""
    heads, _, dim = x.shape
    steps = head_steps(x, fraction)
    block = quantize_block(x, steps)
    classes = entropy.scale_classes(block.abs_sums, block.kmax, x.shape[1])
    words = entropy.encode_symbols(block.deltas, block.kmax, classes)
    side = (
        steps.astype("<f4").tobytes()
        + block.centers.astype("<i2").tobytes()
        + block.kmax.astype("<u2").tobytes()
        + classes.tobytes()
    )
    return side + words


def decode_quantized(
    payload: memoryview, heads: int, tokens: int, dim: int, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """Inverse of :func:`encode_quantized`; raises :class:`CorruptStream` on bad content."""
    channels = heads * dim
    side = quantized_side_bytes(heads, dim)
    if len(payload) < side:
        raise CorruptStream(f"side information: {len(payload)} bytes, needs {side}")
    pos = 4 * heads
    steps = np.frombuffer(payload[:pos], dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(steps)) or np.any(steps <= 0):
        raise CorruptStream(f"step sizes: invalid value in {steps.tolist()}")
    centers = np.frombuffer(payload[pos : pos + 2 * channels], dtype="<i2").astype(np.int32)
    pos += 2 * channels
    kmax = np.frombuffer(payload[pos : pos + 2 * channels], dtype="<u2").astype(np.int32)
    pos += 2 * channels
    classes = np.frombuffer(payload[pos : pos + channels], dtype=np.uint8)
    entropy.check_classes(classes, kmax)
    deltas = entropy.decode_symbols(payload[side:], kmax, classes, tokens)
    return dequantize_block(steps, centers, deltas, heads, dim, dtype, device)


def encode_lossless(x: torch.Tensor) -> bytes:
    """Byte-plane split + zstd of ``x`` (``[H, T, D]`` in its own dtype)."""
    width = x.element_size()
    ints = x.detach().permute(0, 2, 1).contiguous().view(_INT_VIEW[x.dtype]).cpu().numpy()
    planes = ints.astype(ints.dtype.newbyteorder("<")).view(np.uint8).reshape(-1, width).T
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    out = []
    for plane in planes:
        frame = cctx.compress(np.ascontiguousarray(plane).tobytes())
        out.append(_U32.pack(len(frame)) + frame)
    return b"".join(out)


def decode_lossless(
    payload: memoryview, heads: int, tokens: int, dim: int, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """Inverse of :func:`encode_lossless`."""
    width = torch.empty(0, dtype=dtype).element_size()
    count = heads * tokens * dim
    dctx = zstandard.ZstdDecompressor()
    planes = np.empty((width, count), dtype=np.uint8)
    pos = 0
    for b in range(width):
        if pos + 4 > len(payload):
            raise CorruptStream(f"byte plane {b}: length field past the end of the substream")
        n = _U32.unpack_from(payload, pos)[0]
        pos += 4
        if pos + n > len(payload):
            raise CorruptStream(f"byte plane {b}: {n} bytes past the end of the substream")
        try:
            raw = dctx.decompress(bytes(payload[pos : pos + n]), max_output_size=count)
        except zstandard.ZstdError as exc:
            raise CorruptStream(f"byte plane {b}: {exc}") from None
        if len(raw) != count:
            raise CorruptStream(f"byte plane {b}: {len(raw)} bytes, expected {count}")
        planes[b] = np.frombuffer(raw, dtype=np.uint8)
        pos += n
    if pos != len(payload):
        raise CorruptStream(f"lossless substream: {len(payload) - pos} stray bytes at the end")
    ints = np.ascontiguousarray(planes.T).view(f"<i{width}").reshape(heads, dim, tokens)
    t = torch.from_numpy(ints.astype(f"=i{width}")).view(dtype)
    return t.permute(0, 2, 1).contiguous().to(device)
