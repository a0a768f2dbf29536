"""The anchors of ANCHORS.md, reimplemented to score them on the same KV.

Each baseline returns ``(bits_per_element, keys_hat, values_hat)`` with every
byte of side information counted, so rows are comparable with our streams.
"""

from __future__ import annotations

import torch
import zstandard

from kvcodec.client.quality import per_token_baseline, per_token_bits_per_element


def _minmax(x: torch.Tensor, bits: int, dim: int, group: int) -> torch.Tensor:
    """Asymmetric min/max quantization in groups of ``group`` along ``dim``."""
    moved = x.float().movedim(dim, -1)
    n = moved.shape[-1]
    pad = (-n) % group
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    g = moved.reshape(*moved.shape[:-1], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
    q = torch.clamp(torch.round((g - lo) / scale), 0, levels) * scale + lo
    q = q.reshape(*moved.shape)[..., :n]
    return q.movedim(-1, dim).to(x.dtype)


def kivi(keys: torch.Tensor, values: torch.Tensor, bits: int, group: int = 32):
    """KIVI-style: keys per channel (groups of tokens), values per token (groups of channels)."""
    k = _minmax(keys, bits, dim=2, group=group)
    v = _minmax(values, bits, dim=3, group=group)
    return bits + 32.0 / group, k, v


def per_token(keys: torch.Tensor, values: torch.Tensor, bits: int, group: int = 64):
    """Per-token asymmetric quantization in groups of 64 channels (CacheGen's 8-bit baseline)."""
    k, v = per_token_baseline(keys, values, bits=bits, group=group)
    return per_token_bits_per_element(bits, group), k, v


def fp16_zstd(keys: torch.Tensor, values: torch.Tensor, level: int = 19):
    """Lossless fp16 + zstd over the raw bytes."""
    raw = keys.half().contiguous().numpy().tobytes() + values.half().contiguous().numpy().tobytes()
    size = len(zstandard.ZstdCompressor(level=level).compress(raw))
    return 8 * size / (keys.numel() + values.numel()), keys.half(), values.half()
