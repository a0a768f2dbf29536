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

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

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


_EXACT = 2**53  # integers below this convert to float64 exactly


def head_rms(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Channel-centred RMS and absmax of each head, from exact integer statistics.

    Args:
        x: float32 ``[heads, tokens, head_dim]`` on any device.

    Returns:
        ``(rms, absmax)``, float64 ``[heads]`` each, identical on every device.
    """
    heads, tokens, dim = x.shape
    if x.device.type == "cpu" and x.dtype == torch.float32 and _fits_int64(tokens, dim):
        absmax, grid, centred = _head_stats(x.contiguous().numpy())  # the same numbers as block_rms
        denom = np.broadcast_to(np.array([tokens * tokens * dim], dtype=object), (heads,))
        return np.sqrt(exact_ratio(np.maximum(centred, 0), denom)) * grid.astype(np.float64), absmax.astype(np.float64)
    seg = torch.zeros(tokens, dtype=torch.int64, device=x.device)
    rms, absmax = block_rms(x, seg, [tokens])
    return rms[0], absmax[0]


def _fits_int64(tokens: int, dim: int) -> bool:
    """Whether ``tokens * sum(q^2)`` and ``sum_c (sum_t q)^2`` of one block fit int64 (|q| <= STAT_GRID)."""
    return tokens**2 * dim * (STAT_GRID + 1) ** 2 < 2**62


@njit(nogil=True, cache=True)
def _head_stats(x):
    """:func:`block_rms`'s integers for one block on the CPU, in one pass per head: ``(absmax
    float32 [H], grid float32 [H], tokens * sum(q^2) - sum_c (sum_t q)^2 int64 [H])`` with
    ``q = rint(x / grid)`` in float32, as torch computes them."""
    heads, tokens, dim = x.shape
    absmax = np.zeros(heads, dtype=np.float32)
    grid = np.empty(heads, dtype=np.float32)
    centred = np.empty(heads, dtype=np.int64)
    ch = np.zeros(dim, dtype=np.int64)
    for h in range(heads):
        m = np.float32(0)
        for t in range(tokens):
            for d in range(dim):
                m = max(m, abs(x[h, t, d]))
        g = m / np.float32(STAT_GRID)
        if not g > 0:
            g = np.float32(1)
        absmax[h], grid[h] = m, g
        sq = 0
        ch[:] = 0
        for t in range(tokens):
            for d in range(dim):
                q = np.int64(np.rint(x[h, t, d] / g))
                sq += q * q
                ch[d] += q
        centred[h] = tokens * sq - np.sum(ch * ch)
    return absmax, grid, centred


# Exponent bits of each float dtype, on its same-width integer view: all set = Inf or NaN.
_EXPONENT_BITS = {
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float32: (torch.int32, 0x7F800000),
}


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite; on the CPU from the bits, one pass, no temporaries
    (torch's ``isfinite`` converts each half to float: ~20x slower on this machine's CPUs)."""
    if x.device.type != "cpu" or x.dtype not in _EXPONENT_BITS:
        return bool(torch.isfinite(x).all())
    int_dtype, mask = _EXPONENT_BITS[x.dtype]
    bits = x.contiguous().view(int_dtype).numpy().reshape(-1)
    return _no_full_exponent(bits, bits.dtype.type(mask))


@njit(nogil=True, cache=True)
def _no_full_exponent(bits, mask):
    bad = np.int32(0)
    for b in bits:  # branchless, an int32 accumulator: the loop vectorises (a bool one does not: 4x slower)
        bad |= np.int32((b & mask) == mask)
    return bad == 0


def block_rms(x: torch.Tensor, seg: torch.Tensor, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`head_rms` of several blocks of tokens at once (the device encoder's batches).

    Args:
        x: float32 ``[..., heads, tokens, head_dim]``.
        seg: int64 ``[tokens]`` on ``x``'s device: the block of each token (``0 .. len(counts) - 1``).
        counts: tokens per block.

    Returns:
        ``(rms, absmax)`` float64 ``[..., blocks, heads]``.
    """
    n_seg, dim = len(counts), x.shape[-1]
    peak = x.abs().amax(dim=-1)  # [..., H, T]
    absmax = peak.new_zeros(*peak.shape[:-1], n_seg).scatter_reduce_(-1, seg.expand_as(peak), peak, "amax")
    grid = absmax / STAT_GRID
    grid = torch.where(grid > 0, grid, torch.ones_like(grid))
    snapped = torch.round(x / grid[..., seg, None]).to(torch.int64)
    sq = segment_sum((snapped * snapped).sum(dim=-1), seg, n_seg, -1)  # [..., H, S]
    ch = segment_sum(snapped, seg, n_seg, -2)  # [..., H, S, D]
    n = torch.tensor(counts, dtype=torch.int64, device=x.device)
    # tokens * sum(q^2) - sum_c (sum_t q)^2, exact: int64 when it cannot overflow, else Python integers
    if _fits_int64(max(counts), dim):
        centred = (n * sq - (ch * ch).sum(dim=-1)).cpu().numpy()
    else:
        sq_o, ch_o = sq.cpu().numpy().astype(object), ch.cpu().numpy().astype(object)
        centred = np.array(np.asarray(counts, dtype=object) * sq_o - (ch_o * ch_o).sum(axis=-1))
    denom = np.array([c * c * dim for c in counts], dtype=object)
    ratio = exact_ratio(np.maximum(centred, 0), np.broadcast_to(denom, centred.shape))
    rms = np.sqrt(ratio) * grid.cpu().numpy().astype(np.float64)
    return rms.swapaxes(-1, -2), absmax.cpu().numpy().astype(np.float64).swapaxes(-1, -2)


def segment_sum(x: torch.Tensor, seg: torch.Tensor, n_seg: int, dim: int) -> torch.Tensor:
    """Sums of ``x`` over the tokens of each segment (``dim``: the token dimension); exact for integers."""
    shape = list(x.shape)
    shape[dim] = n_seg
    return x.new_zeros(shape).index_add_(dim % x.dim(), seg, x)


def exact_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` correctly rounded to float64 (as Python's int / int), elementwise."""
    num_i, den_i = num.astype(object), den.astype(object)
    small = ((num_i < _EXACT) & (den_i < _EXACT)).astype(bool)
    out = np.empty(num.shape, dtype=np.float64)
    out[small] = num[small].astype(np.float64) / den_i[small].astype(np.float64)  # exact operands: one rounding
    for at in zip(*np.nonzero(~small)):
        out[at] = int(num_i[at]) / int(den_i[at])
    return out


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


def symbols(x: torch.Tensor, steps: np.ndarray) -> np.ndarray:
    """int32 ``round(x / step)`` per head (half to even) of float32 ``[heads, tokens, head_dim]``:
    :func:`quantize_block`'s float half, the same integers. On the CPU one GIL-free numba pass
    (torch's divide, round and cast are three passes with temporaries); elsewhere in torch."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return _round_div(x.contiguous().numpy(), np.asarray(steps, dtype=np.float32))
    return torch.round(x / torch.from_numpy(steps).to(x.device)[:, None, None]).to(torch.int32).cpu().numpy()


@njit(nogil=True, cache=True)
def _round_div(x, steps):
    heads, tokens, dim = x.shape
    q = np.empty((heads, tokens, dim), dtype=np.int32)
    for h in range(heads):
        step = steps[h]
        for t in range(tokens):
            for d in range(dim):
                q[h, t, d] = np.int32(np.rint(x[h, t, d] / step))  # IEEE float32 division, as torch's
    return q


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
    capture: list | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild ``[heads, tokens, head_dim]`` from the symbols and side information.

    With a :class:`~kvcodec.codec.transform.Transform` the symbols are transform
    coefficients and ``first`` the absolute position of the first token; ``capture`` and
    ``offset`` are :func:`kvcodec.codec.substream.decode_quantized`'s.
    """
    tokens = deltas.shape[1]
    d = torch.as_tensor(deltas).to(device)  # numpy from the numba decoder, a tensor from the torch one
    c = torch.as_tensor(centers).to(device)
    if transform is not None:
        q = (d.to(torch.int64) + c[:, None]).reshape(heads, dim, tokens).permute(0, 2, 1)
        if offset is not None:
            q = q + offset.to(device=q.device, dtype=torch.int64).reshape(tokens, heads, dim).permute(1, 0, 2)
        if capture is not None:
            capture.append(q.permute(1, 0, 2).reshape(tokens, heads * dim))
        out = transform.inverse(q, steps, first)
    else:
        q = (d + c[:, None]).to(torch.float32)
        q = q.reshape(heads, dim, tokens).permute(0, 2, 1)
        step_t = torch.from_numpy(steps).to(device)
        out = q * step_t[:, None, None]
    finfo = torch.finfo(dtype)  # a value just under the dtype's max must not round to Inf
    return out.clamp(finfo.min, finfo.max).to(dtype)
