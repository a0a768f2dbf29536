"""One substream: a layer's keys or values for one block of tokens.

Two payload layouts, chosen by the header's mode (FORMAT.md, "Substreams"):

* quantized (coder 2): the raw bits of the block's first ``n_raw`` tokens
  (``[H, n_raw, head_dim]``, attention sinks, see the header's raw_tokens),
  then, if tokens remain, ``steps f32[H] | centers i16[C] | kmax u16[C] |
  classes u8[C] | ANS words u32[...]`` with ``C = H * head_dim``.
* lossless (coder 1): the raw little-endian bits of the block in channel-major
  order ``[H, head_dim, tokens]``, split into byte planes (plane ``b`` holds
  byte ``b`` of every element), each plane a zstd frame preceded by its
  length (u32).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import torch
import zstandard

from kvcodec.codec import entropy
from kvcodec.codec.errors import CorruptStream
from kvcodec.codec.quantize import dequantize_block, quantize_block

ZSTD_LEVEL = 10
_U32 = struct.Struct("<I")
StepRule = Callable[[torch.Tensor], np.ndarray]
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def quantized_side_bytes(heads: int, dim: int) -> int:
    """Size of the side information of a quantized substream's quantized part."""
    channels = heads * dim
    return 4 * heads + 5 * channels


def quantized_min_bytes(heads: int, dim: int, width: int, n_raw: int, n_quant: int) -> int:
    """Smallest valid quantized substream: raw tokens plus the side information."""
    return heads * n_raw * dim * width + (quantized_side_bytes(heads, dim) if n_quant else 0)


def _raw_bytes(x: torch.Tensor) -> bytes:
    """Little-endian bits of ``x`` in row-major order."""
    ints = x.detach().contiguous().view(_INT_VIEW[x.dtype]).cpu().numpy()
    return ints.astype(ints.dtype.newbyteorder("<")).tobytes()


def _from_raw(buf: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    width = torch.empty(0, dtype=dtype).element_size()
    ints = np.frombuffer(buf, dtype=f"<i{width}").astype(f"=i{width}").reshape(shape)
    return torch.from_numpy(ints).view(dtype)


def encode_quantized(x: torch.Tensor, step_rule: StepRule, n_raw: int = 0) -> bytes:
    """Encode ``x`` (``[H, T, D]`` in its stored dtype, any device).

    The first ``n_raw`` tokens (attention sinks) are stored as raw bits; the
    rest are quantized with the steps ``step_rule`` picks and entropy-coded.
    """
    raw = _raw_bytes(x[:, :n_raw]) if n_raw else b""
    rest = x[:, n_raw:].float()
    if rest.shape[1] == 0:
        return raw
    steps = step_rule(rest)
    block = quantize_block(rest, steps)
    classes = entropy.scale_classes(block.abs_sums, block.kmax, rest.shape[1])
    words = entropy.encode_symbols(block.deltas, block.kmax, classes)
    side = (
        steps.astype("<f4").tobytes()
        + block.centers.astype("<i2").tobytes()
        + block.kmax.astype("<u2").tobytes()
        + classes.tobytes()
    )
    return raw + side + words


def decode_quantized(
    payload: memoryview,
    heads: int,
    tokens: int,
    dim: int,
    stored: torch.dtype,
    dtype: torch.dtype,
    device=None,
    n_raw: int = 0,
) -> torch.Tensor:
    """Inverse of :func:`encode_quantized`; raises :class:`CorruptStream` on bad content."""
    width = torch.empty(0, dtype=stored).element_size()
    n_quant = tokens - n_raw
    need = quantized_min_bytes(heads, dim, width, n_raw, n_quant)
    if len(payload) < need:
        raise CorruptStream(f"side information: {len(payload)} bytes, needs {need}")
    raw_len = heads * n_raw * dim * width
    parts = []
    if n_raw:
        parts.append(_from_raw(payload[:raw_len], (heads, n_raw, dim), stored).to(dtype))
    if n_quant == 0:
        if len(payload) != raw_len:
            raise CorruptStream(f"raw tokens: {len(payload) - raw_len} stray bytes at the end")
        return parts[0].to(device)
    payload = payload[raw_len:]
    channels = heads * dim
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
    deltas = entropy.decode_symbols(payload[quantized_side_bytes(heads, dim) :], kmax, classes, n_quant)
    quant = dequantize_block(steps, centers, deltas, heads, dim, dtype, device)
    if not parts:
        return quant
    return torch.cat([parts[0].to(device), quant], dim=1)


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
