"""Patches: a few salient tokens' values coded finer than the rest (header flag 16).

A prefix's later tokens attend heavily to a few earlier ones — the attention sink (the first
token, stored raw) and *secondary sinks*, tokens whose keys point like the sink's (a few
occurrences of `` the``, newlines, ...). An error in those tokens' values reaches every later
output, so they carry most of the loss's sensitivity to value error: on SmolLM2 the 2% of a
1,536-token prefix most similar to the sink hold 70–90% of the eval loss's squared gradient
with respect to the values (benchmarks/RESULTS.md, "Patches"). The encoder codes every token as
usual, then sends, for the chosen tokens, the error the decoder will make, quantized to 4 bits
with a step per (layer, keys/values, kv head): one more pass over ~2% of the tokens, ~0.04 bits
per element, that takes the RMS error of those tokens about 7x down (Apache-2.0 at high).

Which tokens get patched is the encoder's choice (:func:`choose_tokens`); the positions are in
the stream, so any rule decodes. A patch entry, one per (layer, keys/values) after the coded
substreams (FORMAT.md, "Mode 1: patches"), little-endian::

    u32 n                    patched tokens (an empty entry, 0 bytes, patches nothing)
    u32 token[n]             indices into the stream's tokens, strictly increasing
    f32 step[kv_heads]       finite, >= 0
    nibbles[kv_heads * n * head_dim]   4-bit two's complement symbols in -7..7, head-major,
                                       low nibble first, the last byte zero-padded

The decoder adds ``step[h] * symbol`` (float32, each product and sum rounded once, so every
device gives the same bits) to the decoded element and rounds to the output dtype.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from kvcodec.codec.errors import CorruptStream

PATCH_LIMIT = 7  # symbols in -7..7: four bits, symmetric
_U32 = struct.Struct("<I")


@dataclass
class Patch:
    """One (layer, keys/values) entry: ``tokens`` int64 ``[n]``, ``steps`` float32 ``[H]``,
    ``symbols`` int8 ``[H, n, D]``."""

    tokens: np.ndarray
    steps: np.ndarray
    symbols: np.ndarray


def entry_bytes(n: int, heads: int, dim: int) -> int:
    """The exact length of an entry patching ``n`` tokens (0 for none)."""
    return 0 if n == 0 else 4 + 4 * n + 4 * heads + (heads * n * dim + 1) // 2


def count(view: memoryview) -> int:
    """The tokens an entry says it patches (0 for an empty or too short one; unchecked)."""
    return _U32.unpack_from(view)[0] if len(view) >= 4 else 0


def side_bytes(view: memoryview, heads: int) -> int:
    """An entry's count, positions and steps (its side information; the rest is symbols)."""
    if len(view) < 4:
        return len(view)
    return min(len(view), 4 + 4 * count(view) + 4 * heads)


def choose_tokens(pre_keys: torch.Tensor, sink: torch.Tensor, count: int, skip: int) -> np.ndarray:
    """The ``count`` tokens whose keys point most like the sink's (secondary attention sinks).

    Args:
        pre_keys: keys before RoPE, ``[layers, kv_heads, tokens, head_dim]``.
        sink: the attention sink's key before RoPE, ``[layers, kv_heads, head_dim]``.
        count: tokens to choose (at most ``tokens - skip``).
        skip: leading tokens never chosen (stored raw).

    Returns:
        Sorted int64 token indices: the top ``count`` by cosine similarity to ``sink``, averaged
        over layers and heads.
    """
    score = torch.nn.functional.cosine_similarity(pre_keys.float(), sink.float()[:, :, None], dim=-1).mean((0, 1))
    score = score.cpu()
    score[:skip] = -float("inf")
    count = max(0, min(count, score.numel() - skip))
    return np.sort(torch.argsort(score, descending=True, stable=True)[:count].numpy()).astype(np.int64)


def encode_entry(exact: torch.Tensor, decoded: torch.Tensor, tokens: np.ndarray) -> bytes:
    """The entry that moves ``decoded`` towards ``exact`` (both ``[H, n, D]``: the stream's
    ``tokens`` only)."""
    if len(tokens) == 0:
        return b""
    err = exact.float().cpu() - decoded.float().cpu()  # [H, n, D]
    heads = err.shape[0]
    steps = (err.abs().amax(dim=(1, 2)) / PATCH_LIMIT).to(torch.float32)
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))
    sym = torch.round(err / safe[:, None, None]).clamp(-PATCH_LIMIT, PATCH_LIMIT).to(torch.int8).numpy()
    nib = (sym.reshape(-1).astype(np.uint8) & 0x0F)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    return b"".join([_U32.pack(len(tokens)), tokens.astype("<u4").tobytes(),
                     steps.numpy().astype("<f4").tobytes()[: 4 * heads], packed.tobytes()])


def parse_entry(view: memoryview, heads: int, tokens: int, dim: int) -> Patch | None:
    """Parse and check an entry (None for an empty one).

    Raises:
        CorruptStream: a count, position, step or length that a valid entry cannot have.
    """
    if len(view) == 0:
        return None
    if len(view) < 4:
        raise CorruptStream(f"patch: {len(view)} bytes, shorter than its count")
    n = _U32.unpack_from(view)[0]
    if not 1 <= n <= tokens:
        raise CorruptStream(f"patch: count {n} is outside 1..{tokens}")
    need = entry_bytes(n, heads, dim)
    if len(view) != need:
        raise CorruptStream(f"patch: {len(view)} bytes, {n} tokens need exactly {need}")
    pos = np.frombuffer(view, dtype="<u4", count=n, offset=4).astype(np.int64)
    if pos[-1] >= tokens or (n > 1 and np.any(np.diff(pos) <= 0)):
        raise CorruptStream(f"patch: token indices must increase strictly and stay below {tokens}")
    steps = np.frombuffer(view, dtype="<f4", count=heads, offset=4 + 4 * n).astype(np.float32)
    if not np.all(np.isfinite(steps)) or np.any(steps < 0):
        raise CorruptStream("patch: steps must be finite and >= 0")
    packed = np.frombuffer(view, dtype=np.uint8, offset=4 + 4 * n + 4 * heads)
    nib = np.empty(packed.size * 2, dtype=np.uint8)
    nib[0::2], nib[1::2] = packed & 0x0F, packed >> 4
    sym = nib[: heads * n * dim].astype(np.int8)
    sym = np.where(sym > 7, sym - 16, sym).astype(np.int8)
    if np.any(sym < -PATCH_LIMIT):
        raise CorruptStream(f"patch: symbol -8 is outside -{PATCH_LIMIT}..{PATCH_LIMIT}")
    if (heads * n * dim) % 2 and nib[-1]:
        raise CorruptStream("patch: the padding nibble is not zero")
    return Patch(pos, steps, sym.reshape(heads, n, dim))


def apply(out: torch.Tensor, patch: Patch, stored: torch.dtype) -> None:
    """Add a patch to ``out`` (``[H, T, D]``, any device and float dtype) in place: the decoded
    element rounded to the stream's dtype ``stored`` (as the encoder measured the error), plus
    ``step * symbol`` in float32, clamped to the output dtype's finite range and rounded to it —
    so decoding into float32 and rounding to ``stored`` gives the stored-dtype decode's bits."""
    device = out.device
    idx = torch.from_numpy(patch.tokens).to(device)
    corr = torch.from_numpy(patch.symbols).to(device).float() * torch.from_numpy(patch.steps).to(device)[:, None, None]
    fixed = out[:, idx].to(stored).float() + corr
    info = torch.finfo(out.dtype)
    out[:, idx] = fixed.clamp(info.min, info.max).to(out.dtype)
