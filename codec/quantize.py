"""Stage 1: uniform scalar quantization of one substream, on any torch device.

A substream holds one layer's keys or values for one block of tokens, shaped
``[kv_heads, tokens, head_dim]``. Each head gets one step size, the same for
all its channels: for an entropy-coded uniform quantizer, an equal step is the
MSE-optimal allocation across components, and channels with outliers (keys
have them) automatically receive more bits. Each channel gets an integer
centre (the rounded mean of its symbols) so the entropy model is centred.

Every operation here is either elementwise IEEE arithmetic (``x / step``,
round-half-even) or an integer reduction, so the symbols are bit-identical on
the CPU and on a GPU whatever the reduction order. The step itself is derived
from exact integer statistics: values are first snapped to a grid of
``absmax / 4096`` (absmax is order-independent), their squares summed as
int64, and the RMS computed on the host from those integers.

Error bound: every reconstructed element is within ``step / 2`` of the input
(before rounding to the output dtype), where ``step`` is the head's step
recorded in the stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Grid resolution used to estimate the RMS exactly (see module docstring).
STAT_GRID = 4096
# The step never falls below absmax / 32767, so |symbol| <= 32767 and the
# per-channel centres fit the stream's int16 field.
MAX_ABS_SYMBOL = 32767
MIN_STEP_FRACTION_OF_ABSMAX = 1.0 / MAX_ABS_SYMBOL
MAX_SYMBOL = 2**16


@dataclass
class QuantizedBlock:
    """The symbols and side information of one quantized substream.

    Attributes:
        steps: float32 ``[heads]`` step sizes.
        centers: int32 ``[heads * head_dim]`` per-channel centres.
        deltas: int32 ``[heads * head_dim, tokens]`` symbols minus centre, channel-major.
        kmax: int32 ``[heads * head_dim]`` largest ``|delta|`` per channel.
        abs_sums: int64 ``[heads * head_dim]`` sum of ``|delta|`` per channel.
    """

    steps: np.ndarray
    centers: np.ndarray
    deltas: np.ndarray
    kmax: np.ndarray
    abs_sums: np.ndarray


def head_rms(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Channel-centred RMS and absmax of each head, from exact integer statistics.

    Args:
        x: float32 ``[heads, tokens, head_dim]`` on any device.

    Returns:
        ``(rms, absmax)``, float64 ``[heads]`` each, identical on every device.
    """
    heads, tokens, dim = x.shape
    absmax = x.abs().amax(dim=(1, 2))
    grid = absmax / STAT_GRID
    grid = torch.where(grid > 0, grid, torch.ones_like(grid))
    snapped = torch.round(x / grid[:, None, None]).to(torch.int64)
    sq = (snapped * snapped).sum(dim=(1, 2)).cpu().numpy()
    ch = snapped.sum(dim=1).cpu().numpy()  # [heads, dim]
    grid_h = grid.cpu().numpy().astype(np.float64)
    rms = np.empty(heads, dtype=np.float64)
    for h in range(heads):
        # tokens * sum(q^2) - sum_c (sum_t q)^2, exact in Python integers
        centred = tokens * int(sq[h]) - sum(int(v) * int(v) for v in ch[h])
        rms[h] = math.sqrt(max(centred, 0) / (tokens * tokens * dim)) * grid_h[h]
    return rms, absmax.cpu().numpy().astype(np.float64)


def finalize_steps(target: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """Clamp target steps to the allowed range and round them to float32.

    The floor ``absmax / 32767`` keeps every symbol (and centre) within int16; a floor
    that float32 rounds down (subnormals) or to zero is nudged up until it holds.
    """
    steps = np.maximum(target, absmax * MIN_STEP_FRACTION_OF_ABSMAX).astype(np.float32)
    steps = np.where(steps > 0, steps, np.float32(1.0)).astype(np.float32)
    amax = absmax.astype(np.float32)
    while np.any(over := amax / steps > MAX_ABS_SYMBOL):
        steps = np.where(over, np.nextafter(steps, np.float32(np.inf)), steps).astype(np.float32)
    return steps


def head_steps(x: torch.Tensor, fraction: float) -> np.ndarray:
    """Each head's step as ``fraction`` times its channel-centred RMS (no profile)."""
    rms, absmax = head_rms(x)
    return finalize_steps(rms * fraction, absmax)


def quantize_block(x: torch.Tensor, steps: np.ndarray) -> QuantizedBlock:
    """Quantize ``x`` (float32 ``[heads, tokens, head_dim]``) with per-head steps."""
    heads, tokens, dim = x.shape
    step_t = torch.from_numpy(steps).to(x.device)
    q = torch.round(x / step_t[:, None, None]).to(torch.int64)
    q = q.permute(0, 2, 1).reshape(heads * dim, tokens)  # channel-major
    sums = q.sum(dim=1)
    # round-half-up of sums / tokens in exact integer arithmetic
    centers = torch.div(2 * sums + tokens, 2 * tokens, rounding_mode="floor")
    deltas = q - centers[:, None]
    absd = deltas.abs()
    return QuantizedBlock(
        steps=steps,
        centers=centers.to(torch.int32).cpu().numpy(),
        deltas=deltas.to(torch.int32).cpu().numpy(),
        kmax=absd.amax(dim=1).to(torch.int32).cpu().numpy(),
        abs_sums=absd.sum(dim=1).cpu().numpy(),
    )


def dequantize_block(
    steps: np.ndarray,
    centers: np.ndarray,
    deltas: np.ndarray,
    heads: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    transform=None,
    first: int = 0,
) -> torch.Tensor:
    """Rebuild ``[heads, tokens, head_dim]`` from the symbols and side information.

    With a :class:`~kvcodec.codec.transform.Transform` the symbols are transform
    coefficients and ``first`` the absolute position of the first token.
    """
    tokens = deltas.shape[1]
    d = torch.as_tensor(deltas).to(device)  # numpy from the numba decoder, a tensor from the torch one
    c = torch.as_tensor(centers).to(device)
    if transform is not None:
        q = (d.to(torch.int64) + c[:, None]).reshape(heads, dim, tokens).permute(0, 2, 1)
        out = transform.inverse(q, steps, first)
    else:
        q = (d + c[:, None]).to(torch.float32)
        q = q.reshape(heads, dim, tokens).permute(0, 2, 1)
        step_t = torch.from_numpy(steps).to(device)
        out = q * step_t[:, None, None]
    finfo = torch.finfo(dtype)  # a value just under the dtype's max must not round to Inf
    return out.clamp(finfo.min, finfo.max).to(dtype)
