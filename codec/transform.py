"""Transform coding: quantize keys before RoPE, in a calibrated decorrelating basis.

A profile may carry a *transform* (FORMAT.md, "Transform"): for every layer and
K/V a basis (the KLT of the calibration KV, stored as int16 with
``2**SCALE_BITS`` = 1.0: orthonormal, or shaped by a measured error metric with the
encoder's inverse beside it — :func:`fit_shaped_bases`) and, for keys, the model's RoPE frequencies. A stream
whose header has the transform flag was quantized in that basis:

* **Encode** (per substream, tokens at absolute positions ``p``): keys are
  un-rotated (``x1 cos + x2 sin``, ``x2 cos - x1 sin``, float32 elementwise); each
  head is snapped to integers in units of ``step_h / SUBSTEPS``; each token's
  channel vector (``group`` channels at a time) is multiplied by the integer
  basis; the result is divided by ``SUBSTEPS * 2**SCALE_BITS`` and rounded half up.
* **Decode**: ``x_h = (basis^T q)_h * step_h * 2**-SCALE_BITS`` then RoPE is
  re-applied (keys).

Exactness: every product and partial sum of both matrix products is an integer
below ``2**53`` (bounds checked by :func:`Transform.step_floor_factor` and
:data:`SUBSTEPS`), so float64 matrix products are exact in any summation order —
the symbols and the decoded tensors are identical on every device and BLAS. (The CPU
decoder multiplies in float32 when the symbols are small enough for every partial sum to
stay below ``2**24``: exact too, at half the work.) The
RoPE tables are float32 values of cos/sin correctly rounded from exact angles
(:func:`rope_tables`), and the rotations are separate IEEE multiplies and adds.

Why: on SmolLM2 (4 real texts) un-rotating keys saves ~0.4 bits per key element
at equal distortion (RoPE turns per-channel offsets into rotating phases), and
the calibrated basis saves another ~0.3 (energy compaction across channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, getcontext
from functools import lru_cache

import numpy as np
import torch
from numba import njit

from kvcodec.codec.errors import InvalidInput
from kvcodec.codec.rans import output_bits, to_bits

SCALE_BITS = 14  # basis entries are int16 with 2**14 == 1.0
SUBSTEPS = 64  # input snapping grid: step / 64 (adds 1/4096 of the quantization noise power)
MAX_GROUP = 1024  # channels per basis block: keeps every partial sum below 2**53
MAX_ANALYSIS = 1 << 20  # bound on an analysis matrix's entries (64.0): partial sums stay below 2**51


@dataclass(frozen=True)
class Rope:
    """The model's rotary embedding: ``rotate_half`` convention on the first ``2 * len(inv_freq)`` dims."""

    inv_freq: np.ndarray  # float32 [rot_dim / 2]

    @property
    def rot_dim(self) -> int:
        return 2 * len(self.inv_freq)


def _cos_sin_f32(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of float64 angles, correctly rounded to float32 on every machine.

    libm results differ in the last float64 bits between platforms; rounding to
    float32 hides that except within a few float64 ulps of a float32 rounding
    midpoint, where the value is recomputed with 40-digit decimal arithmetic.
    """
    out = []
    for fn, dfn in ((np.cos, _dcos), (np.sin, _dsin)):
        v64 = fn(angles)
        v32 = v64.astype(np.float32)
        up = np.nextafter(v32, np.float32(np.inf)).astype(np.float64)
        down = np.nextafter(v32, np.float32(-np.inf)).astype(np.float64)
        mids = np.stack([(v32.astype(np.float64) + up) / 2, (v32.astype(np.float64) + down) / 2])
        near = np.min(np.abs(mids - v64), axis=0) <= 16 * np.spacing(np.abs(v64) + 1e-300)
        for idx in zip(*np.nonzero(near)):
            v32[idx] = np.float32(float(dfn(float(angles[idx]))))
        out.append(v32)
    return out[0], out[1]


def _taylor(x: Decimal, start: int) -> Decimal:
    getcontext().prec = 40
    term = Decimal(1) if start == 0 else x
    total, n = term, start
    while True:
        term = -term * x * x / ((n + 1) * (n + 2))
        n += 2
        if abs(term) < Decimal(10) ** -38:
            return total
        total += term


def _reduce(a: float) -> Decimal:
    getcontext().prec = 40
    two_pi = 2 * Decimal("3.141592653589793238462643383279502884197")
    x = Decimal(a)  # exact value of the float64
    return x - two_pi * (x / two_pi).to_integral_value()


def _dcos(a: float) -> Decimal:
    return _taylor(_reduce(a), 0)


def _dsin(a: float) -> Decimal:
    return _taylor(_reduce(a), 1)


@lru_cache(maxsize=64)
def _tables(inv_freq: bytes, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    freq = np.frombuffer(inv_freq, dtype=np.float32).astype(np.float64)
    pos = np.arange(first, first + count, dtype=np.float64)
    angles = pos[:, None] * freq[None, :]  # exact: 24-bit mantissa times a position < 2**29
    return _cos_sin_f32(angles)


def rope_tables(rope: Rope, first: int, count: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[count, rot_dim / 2]`` cos and sin for positions ``first..first+count-1``."""
    cos, sin = _tables(rope.inv_freq.astype(np.float32).tobytes(), int(first), int(count))
    return torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device)


def unrotate(x: torch.Tensor, rope: Rope, first: int) -> torch.Tensor:
    """Remove RoPE from keys ``[H, T, D]`` (float32) at positions ``first..``."""
    return _rotate(x, rope, first, -1.0)


def rotate(x: torch.Tensor, rope: Rope, first: int) -> torch.Tensor:
    """Apply RoPE to pre-rotation keys ``[H, T, D]`` (float32) at positions ``first..``."""
    return _rotate(x, rope, first, 1.0)


def _rotate(x: torch.Tensor, rope: Rope, first: int, sign: float) -> torch.Tensor:
    """``x1 cos - s x2 sin``, ``x2 cos + s x1 sin`` with ``s = sign``: separate IEEE multiplies and
    adds (a negated product is exact), written into one output tensor."""
    cos, sin = rope_tables(rope, first, x.shape[-2], x.device)  # x: [..., T, D]
    half = rope.rot_dim // 2
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.empty_like(x)
    if sign > 0:
        torch.sub(x1 * cos, x2 * sin, out=out[..., :half])
        torch.add(x2 * cos, x1 * sin, out=out[..., half : 2 * half])
    else:
        torch.add(x1 * cos, x2 * sin, out=out[..., :half])
        torch.sub(x2 * cos, x1 * sin, out=out[..., half : 2 * half])
    out[..., 2 * half :] = x[..., 2 * half :]
    return out


def float32_matmul_is_ieee(device) -> bool:
    """Whether float32 matrix products on ``device`` are plain IEEE float32 arithmetic — exact
    for integers whose partial sums stay below ``2**24`` — rather than the TF32 or bfloat16
    shortcuts ``torch.set_float32_matmul_precision("high" | "medium")`` allows (on CUDA, and on
    CPUs with bfloat16 units). The exact-integer products use float64 otherwise."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return torch.device(device).type == "cpu" or not torch.backends.cuda.matmul.allow_tf32


class Transform:
    """One layer's K or V transform: an integer basis per channel group, RoPE for keys.

    Args:
        basis: int16 ``[groups, B, B]`` with ``groups * B == heads * head_dim``; row ``j``
            of a group is output coordinate ``j``: the decoder's synthesis, ``x = basis^T q``
            (an orthonormal matrix times ``2**14``, or a metric-shaped one, below).
        rope: the RoPE to remove before the basis (keys), or None.
        analysis: integer ``[groups, B, B]`` (``|entry| < MAX_ANALYSIS``, ``2**14`` = 1.0), what
            the encoder multiplies by: ``round(2**28 * inverse(basis^T))`` for a basis that is not
            orthonormal; None: the basis itself (its own inverse transpose).
    """

    def __init__(self, basis: np.ndarray, rope: Rope | None = None, analysis: np.ndarray | None = None):
        if basis.ndim != 3 or basis.shape[1] != basis.shape[2] or basis.shape[1] > MAX_GROUP:
            raise InvalidInput(f"transform basis: shape {basis.shape} is not [groups, B, B] with B <= {MAX_GROUP}")
        if analysis is not None and analysis.shape != basis.shape:
            raise InvalidInput(f"transform analysis: shape {analysis.shape} != the basis's {basis.shape}")
        if analysis is not None and np.abs(analysis.astype(np.int64)).max(initial=0) >= MAX_ANALYSIS:
            raise InvalidInput(f"transform analysis: entries must be below {MAX_ANALYSIS} in magnitude")
        # a block-diagonal basis (``calibrate --transform mixed`` stores per-head value bases in a
        # layer-wide group) is applied block by block: the same exact sums without the zeros
        both = basis if analysis is None else np.concatenate([basis.astype(np.int64), analysis.astype(np.int64)])
        block = block_size(both)
        self.basis = np.ascontiguousarray(split_blocks(basis, block), dtype=np.int16)
        self.analysis = (self.basis.astype(np.int64) if analysis is None
                         else np.ascontiguousarray(split_blocks(analysis, block), dtype=np.int64))
        self.rope = rope
        self._device_basis: dict[str, torch.Tensor] = {}
        # an identity basis (e.g. ``calibrate --transform rope``: only RoPE is removed) needs no
        # matrix product; the elementwise shortcuts below give the same bits
        eye = np.eye(self.basis.shape[1], dtype=np.int64) << SCALE_BITS
        self.identity = bool(np.all(self.basis.astype(np.int64) == eye) and np.all(self.analysis == eye))
        # symbols up to this magnitude keep every partial sum of the basis product an integer
        # below 2**24 (the largest L1 norm of a column bounds them), exact in float32 in any order
        self.float32_exact_below = (2**24 - 1) // max(1, int(np.abs(self.basis.astype(np.int64)).sum(axis=1).max()))

    @property
    def channels(self) -> int:
        return self.basis.shape[0] * self.basis.shape[1]

    def step_floor_factor(self) -> float:
        """Largest row L1 norm of the analysis matrix (in units of 1.0), with margin.

        ``|symbol| <= factor * max_h(absmax_h / step_h)``, so scaling each head's
        absmax by this factor before :func:`finalize_steps` keeps symbols in int16.
        """
        l1 = np.abs(self.analysis).sum(axis=2).max()
        return float(l1) / (1 << SCALE_BITS) * (1 + 2**-10) + 2.0 / 32767

    def _basis(self, device, dtype: torch.dtype = torch.float64, analysis: bool = False) -> torch.Tensor:
        key = f"{device}/{dtype}/{analysis}"
        if key not in self._device_basis:
            matrix = self.analysis if analysis else self.basis
            self._device_basis[key] = torch.from_numpy(matrix.astype(np.float64)).to(device=device, dtype=dtype)
        return self._device_basis[key]

    def prepare(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """What the basis applies to: keys un-rotated (positions ``first..``), values as they are.

        Steps are chosen on this tensor (un-rotation can grow an element by sqrt(2)).
        """
        return x if self.rope is None else unrotate(x, self.rope, first)

    def forward(self, x: torch.Tensor, steps: np.ndarray) -> torch.Tensor:
        """float32 ``[H, T, D]`` from :meth:`prepare` -> int32 symbols ``[H, T, D]``.

        Coordinate ``j`` of group ``g`` is channel ``g * B + j`` of the flattened ``H * D``.
        """
        scale = torch.from_numpy(snap_scales(steps)).to(x.device)
        return self.forward_scaled(x, scale[:, None, None])

    def forward_scaled(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the snapping scales ``snap_scales(steps)`` given per element.

        ``scale`` is float32, broadcast to ``x`` (``[H, 1, 1]`` for one block; ``[H, T, 1]``
        for several blocks of one layer at once, each token with its block's scales).
        """
        heads, tokens, dim = x.shape
        snapped = torch.round(x * scale).to(torch.float64)  # integers, |.| <= 2**21
        if self.identity:  # y = snapped * 2**14 exactly, so y / 2**20 == snapped / 64
            return torch.floor(snapped * (1.0 / SUBSTEPS) + 0.5).to(torch.int32)
        v = snapped.permute(1, 0, 2).reshape(tokens, *self.basis.shape[:2])  # [T, G, B]
        y = torch.einsum("tgi,gji->tgj", v, self._basis(x.device, analysis=True))  # exact integer sums
        q = torch.floor(y * (1.0 / (SUBSTEPS << SCALE_BITS)) + 0.5)  # exact: power-of-two scaling
        return q.reshape(tokens, heads, dim).permute(1, 0, 2).to(torch.int32)

    def inverse(self, q: torch.Tensor, steps: np.ndarray, first: int) -> torch.Tensor:
        """Symbols (any integer dtype, ``[H, T, D]``, on the output device) -> float32 ``[H, T, D]``."""
        heads, tokens, dim = q.shape
        if self.identity:
            # acc * step * 2**-14 == q * step: exact in float64 and rounded once to float32, which
            # is what one float32 multiply of the exact operands gives (|q| < 2**24)
            x = q.to(torch.float32) * torch.from_numpy(steps.astype(np.float32)).to(q.device)[:, None, None]
            return rotate(x, self.rope, first) if self.rope is not None else x
        v = q.to(torch.float64).permute(1, 0, 2).reshape(tokens, *self.basis.shape[:2])
        acc = torch.einsum("tgj,gji->tgi", v, self._basis(q.device))  # exact integer sums
        acc = acc.reshape(tokens, heads, dim).permute(1, 0, 2)
        scale = torch.from_numpy(steps.astype(np.float64) * 2.0**-SCALE_BITS).to(q.device)
        x = (acc * scale[:, None, None]).to(torch.float32)
        if self.rope is not None:
            x = rotate(x, self.rope, first)
        return x

    def inverse_into(self, v: np.ndarray, steps: np.ndarray, first: int, out: torch.Tensor) -> None:
        """:meth:`inverse` on the CPU, clamped to ``out``'s finite range and written into
        ``out`` (float32/float16/bfloat16 ``[H, T, D]``, last axis contiguous, e.g. a slice of the
        caller's output), for symbols ``v`` token-major ``[T, H * D]`` (integers in float32 or
        float64, as ``kvcodec.codec.substream._decode_direct`` gives them): the basis product in
        torch (BLAS; float32 when :attr:`float32_exact_below` bounds the symbols, else float64 —
        exact either way), then scaling, RoPE, clamp and
        rounding to the dtype in one numba pass per (head, token) row — the same IEEE operations
        in the same order as the torch path (no fused multiply-adds), so the same bits (tests).
        Not for identity bases."""
        tokens = v.shape[0]
        if np.abs(v).max(initial=0) <= self.float32_exact_below and float32_matmul_is_ieee("cpu"):  # half the work
            basis = self._basis("cpu", torch.float32)
            v = v.astype(np.float32, copy=False)
        else:
            basis = self._basis("cpu")
            v = v.astype(np.float64, copy=False)
        acc = torch.einsum("tgj,gji->tgi", torch.from_numpy(v).reshape(tokens, *self.basis.shape[:2]), basis)
        flat, kind, lo, hi = output_bits(out)
        if self.rope is not None:
            cos, sin = (table.numpy() for table in rope_tables(self.rope, first, tokens))
        else:
            cos = sin = np.ones((tokens, 0), dtype=np.float32)
        _finish(acc.reshape(tokens, -1).numpy(), steps.astype(np.float64) * 2.0**-SCALE_BITS, cos, sin, flat,
                out.storage_offset(), out.stride(0), out.stride(1), out.shape[2], kind, lo, hi)


@njit(nogil=True, cache=True)
def _finish(acc, scale, cos, sin, out, start, head_stride, token_stride, dim, kind, lo, hi):
    """``out[h, t, :]`` = bits of ``clamp(rope(float32(acc[t, h * dim + :] * scale[h])), lo, hi)``:
    :meth:`Transform.inverse` + clamp + dtype rounding, one row at a time (``cos`` /
    ``sin`` float32 ``[T, half]``, ``half`` = 0 without RoPE)."""
    tokens = acc.shape[0]
    heads = acc.shape[1] // dim
    half = cos.shape[1]
    x = np.empty(dim, dtype=np.float32)
    y = np.empty(dim, dtype=np.float32)
    scratch = np.empty(dim, dtype=np.float32)
    row = np.empty(dim, dtype=np.uint32)
    for h in range(heads):
        s = scale[h]
        for t in range(tokens):
            for d in range(dim):
                x[d] = np.float32(acc[t, h * dim + d] * s)  # float64 product, rounded once to float32
            for d in range(half):  # x1 cos - x2 sin, x2 cos + x1 sin: separate float32 roundings
                y[d] = x[d] * cos[t, d] - x[d + half] * sin[t, d]
                y[d + half] = x[d + half] * cos[t, d] + x[d] * sin[t, d]
            for d in range(2 * half, dim):
                y[d] = x[d]
            for d in range(dim):
                y[d] = min(max(y[d], lo), hi)
            to_bits(0, dim, kind, y, y.view(np.uint32), scratch, scratch.view(np.uint32), row)
            base = start + h * head_stride + t * token_stride
            for d in range(dim):
                out[base + d] = row[d]


def block_size(basis: np.ndarray) -> int:
    """The smallest ``b`` (dividing ``B``) in whose blocks every ``[B, B]`` matrix of ``basis``
    (``[G, B, B]``) is block-diagonal; ``B`` when there is none."""
    groups, size = basis.shape[:2]
    for b in range(1, size):
        if size % b:
            continue
        n = size // b
        blocks = basis.reshape(groups, n, b, n, b)
        rebuilt = np.zeros_like(blocks)
        rebuilt[:, np.arange(n), :, np.arange(n), :] = blocks[:, np.arange(n), :, np.arange(n), :]
        if np.array_equal(rebuilt, blocks):
            return b
    return size


def split_blocks(basis: np.ndarray, b: int) -> np.ndarray:
    """``[G, B, B]`` block-diagonal in ``b × b`` blocks -> ``[G * B / b, b, b]``: those blocks."""
    groups, size = basis.shape[:2]
    n = size // b
    diagonal = basis.reshape(groups, n, b, n, b)[:, np.arange(n), :, np.arange(n), :]  # [n, G, b, b]
    return diagonal.transpose(1, 0, 2, 3).reshape(groups * n, b, b)


def split_block_diagonal(basis: np.ndarray) -> np.ndarray:
    """``[G, B, B]`` -> ``[G * B / b, b, b]`` for the smallest ``b`` (dividing ``B``) in whose
    blocks every matrix is block-diagonal; the basis itself when there is none."""
    return split_blocks(basis, block_size(basis))


def block_diagonal(bases: np.ndarray, group: int) -> np.ndarray:
    """``[..., C / b, b, b]`` bases as block-diagonal ``[..., C / group, group, group]``."""
    *lead, count, b, _ = bases.shape
    n = group // b
    out = np.zeros((*lead, count // n, group, group), dtype=bases.dtype)
    for i in range(count):
        j = i % n
        out[..., i // n, j * b : (j + 1) * b, j * b : (j + 1) * b] = bases[..., i, :, :]
    return out


def snap_scales(steps: np.ndarray) -> np.ndarray:
    """float32 ``SUBSTEPS / step`` (any shape): the transform's input snapping scale."""
    return (np.float32(SUBSTEPS) / steps).astype(np.float32)


def identity_bases(layers: int, channels: int, group: int) -> np.ndarray:
    """int16 ``[layers, 2, channels / group, group, group]`` identity bases (only RoPE is removed)."""
    eye = (np.eye(group, dtype=np.int64) << SCALE_BITS).astype(np.int16)
    return np.broadcast_to(eye, (layers, 2, channels // group, group, group)).copy()


def orthonormal_to_int(w: np.ndarray) -> np.ndarray:
    """Round orthonormal matrices (rows = output coordinates) to the int16 basis format."""
    return np.clip(np.rint(np.asarray(w, dtype=np.float64) * (1 << SCALE_BITS)), -32767, 32767).astype(np.int16)


def klt(cov: np.ndarray) -> np.ndarray:
    """Rows: eigenvectors of ``cov`` by decreasing eigenvalue (sign fixed: largest entry positive)."""
    vals, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, np.argsort(vals)[::-1]].T
    signs = np.sign(vecs[np.arange(len(vecs)), np.abs(vecs).argmax(axis=1)])
    return vecs * signs[:, None]


def _weighted_covariance(kvs, weights: np.ndarray, layer: int, kind: int, rope, skip: int,
                         chunk: int) -> np.ndarray:
    """``[C, C]`` scatter of one (layer, K/V)'s token vectors in the weighted domain
    ``x_h * sqrt(w_h)`` (keys un-rotated), each chunk centred as the codec centres each substream."""
    heads, dim = kvs[0][0].shape[1], kvs[0][0].shape[3]
    channels = heads * dim
    scale = np.repeat(np.sqrt(np.maximum(weights[layer, kind], 1e-30)), dim)
    cov = np.zeros((channels, channels))
    for keys, values in kvs:
        x = (keys, values)[kind][layer, :, skip:].float()
        if kind == 0 and layer_rope(rope, layer) is not None:
            x = unrotate(x, layer_rope(rope, layer), skip)
        v = x.permute(1, 0, 2).reshape(x.shape[1], channels).double().numpy() * scale
        for start in range(0, len(v), chunk):
            c = v[start : start + chunk]
            c = c - c.mean(axis=0)
            cov += c.T @ c
    return cov


def fit_bases(
    kvs: list[tuple[torch.Tensor, torch.Tensor]],
    weights: np.ndarray,
    group: int,
    rope: Rope | Sequence[Rope | None] | None,
    *,
    skip: int = 1,
    chunk: int = 256,
) -> np.ndarray:
    """Calibrate the int16 bases: the KLT of each (layer, K/V)'s token vectors.

    Args:
        kvs: ``(keys, values)`` of calibration prefixes, ``[layers, H, T, D]`` at positions ``0..T-1``.
        weights: ``[layers, 2, H]`` per-head sensitivities (a group spanning heads is
            decorrelated in the weighted domain ``x_h * sqrt(w_h)``, where the codec's
            steps are uniform).
        group: channels per basis (``head_dim``: one basis per head; ``H * head_dim``: one per layer).
        rope: the model's RoPE, removed from keys first (None: keys as they are); one for
            every layer or a list with each layer's (:func:`model_ropes`).
        skip: leading tokens left out (attention sinks, stored raw).
        chunk: tokens per chunk; each chunk is centred, as the codec centres each channel per substream.

    Returns:
        int16 ``[layers, 2, H * D / group, group, group]``.
    """
    layers, heads, _, dim = kvs[0][0].shape
    channels = heads * dim
    if channels % group:
        raise InvalidInput(f"transform group: {group} does not divide {channels} channels")
    out = np.zeros((layers, 2, channels // group, group, group), dtype=np.int16)
    for layer in range(layers):
        for kind in (0, 1):
            cov = _weighted_covariance(kvs, weights, layer, kind, rope, skip, chunk)
            for g in range(channels // group):
                sl = slice(g * group, (g + 1) * group)
                out[layer, kind, g] = orthonormal_to_int(klt(cov[sl, sl]))
    return out


SHAPE_RIDGE = 0.1  # added to the trace-normalised metric's eigenvalues before shaping


def fit_shaped_bases(
    kvs: list[tuple[torch.Tensor, torch.Tensor]],
    weights: np.ndarray,
    metric: np.ndarray,
    kind: int,
    rope: Rope | Sequence[Rope | None] | None,
    *,
    ridge: float = SHAPE_RIDGE,
    skip: int = 1,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Bases that shape the quantization error by a measured metric (one group per layer).

    The harm an error ``e`` of one (layer, K/V) does is about ``e^T M e``, with ``M`` the
    outer products of the eval loss's gradients (``metric``, measured by calibration). For
    keys ``M`` is far from a multiple of the identity — what matters is the queries' view
    of the keys — and stable across texts, so error spread evenly over the channels
    (orthonormal bases) wastes bits: with ``Q`` the metric in the weighted domain
    (trace-normalised, ``ridge`` added for robustness, determinant 1), the encoder quantizes
    the KLT of ``Q^(1/2) x`` and the decoder's synthesis ``U Q^(-1/2)`` puts error where
    ``M`` is small, at the same rate to first order.

    Args:
        kvs, weights, rope, skip, chunk: as :func:`fit_bases`.
        metric: float64 ``[layers, H * D, H * D]``, the metric of ``kind`` in the channel
            domain (keys before RoPE).
        kind: 0 keys, 1 values.
        ridge: regularisation (a metric fitted on a few texts over-trusts its small eigenvalues).

    Returns:
        ``(bases, analysis)``: int16 synthesis ``[layers, 1, C, C]`` (``x = basis^T q``, entries
        within ±1.99) and the encoder's int32 ``round(2**28 * inverse(basis^T))`` (see
        :class:`Transform`).
    """
    layers, heads, _, dim = kvs[0][0].shape
    channels = heads * dim
    if metric.shape != (layers, channels, channels) or not np.all(np.isfinite(metric)):
        raise InvalidInput(f"transform metric: shape {metric.shape} is not ({layers}, {channels}, {channels}) "
                           "or not finite")
    bases = np.zeros((layers, 1, channels, channels), dtype=np.int16)
    analysis = np.zeros((layers, 1, channels, channels), dtype=np.int32)
    one = float(1 << SCALE_BITS)
    for layer in range(layers):
        cov = _weighted_covariance(kvs, weights, layer, kind, rope, skip, chunk)
        scale = np.repeat(np.sqrt(np.maximum(weights[layer, kind], 1e-30)), dim)
        q = metric[layer] / np.outer(scale, scale)
        q = (q + q.T) / 2
        q = q / max(np.trace(q) / channels, 1e-300) + ridge * np.eye(channels)
        vals, vecs = np.linalg.eigh(q)
        vals = np.maximum(vals, ridge) / np.exp(np.mean(np.log(np.maximum(vals, ridge))))
        root, inv_root = (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T
        synth = klt(root @ cov @ root) @ inv_root
        # int16 with 2**14 == 1.0: a smaller scale makes the effective step finer, which the
        # calibration's measured rate-distortion curves (taken with these bases) account for
        synth *= min(1.0, 1.99 / np.abs(synth).max())
        basis = np.round(synth * one).astype(np.int16)
        inverse = np.round(one * np.linalg.inv(basis.T.astype(np.float64) / one))
        if np.abs(inverse).max() >= MAX_ANALYSIS:
            raise InvalidInput(f"transform metric: layer {layer}'s shaped basis is too ill-conditioned "
                               f"(raise the ridge above {ridge})")
        bases[layer, 0], analysis[layer, 0] = basis, inverse.astype(np.int32)
    return bases, analysis


def model_rope(rotary_emb, layer_type: str | None = None) -> Rope | None:
    """The RoPE of a transformers rotary module if it is a pure rotation, else None.

    Scalings whose tables depend on the context length (dynamic NTK) or scale the
    vectors (YaRN's attention factor) cannot be removed exactly; keys are then
    coded as they are.

    Args:
        rotary_emb: the model's rotary module (``model.model.rotary_emb``).
        layer_type: for a module with a table per layer type (Gemma 3:
            ``"sliding_attention"``, ``"full_attention"``), which one; None for a module with one.

    Returns:
        The :class:`Rope`, or None (not removable exactly, or no such layer type).
    """
    prefix = "" if layer_type is None else f"{layer_type}_"
    rope_type = getattr(rotary_emb, "rope_type", "default")
    if isinstance(rope_type, dict):  # one per layer type
        rope_type = rope_type.get(layer_type)
    scaling = float(getattr(rotary_emb, f"{prefix}attention_scaling", 1.0))
    inv = getattr(rotary_emb, f"{prefix}inv_freq", None)
    if inv is None or scaling != 1.0 or rope_type not in ("default", "linear", "llama3"):
        return None
    return Rope(inv.detach().float().cpu().numpy().astype(np.float32))


def model_ropes(rotary_emb, num_layers: int) -> list[Rope] | None:
    """Each layer's RoPE (:func:`model_rope`; per layer type where the module keeps several, as
    Gemma 3's does: base 10k on its sliding-window layers, 1M on its global ones), or None if
    any layer's cannot be removed exactly.

    Args:
        rotary_emb: the model's rotary module.
        num_layers: the model's layer count.

    Returns:
        ``num_layers`` ropes, or None.
    """
    kinds = getattr(rotary_emb, "layer_types", None)
    if not kinds:
        rope = model_rope(rotary_emb)
        return None if rope is None else [rope] * num_layers
    per_layer = list(getattr(rotary_emb.config, "layer_types", None) or [])[:num_layers]
    ropes = {kind: model_rope(rotary_emb, kind) for kind in set(per_layer)}
    if len(per_layer) != num_layers or any(r is None for r in ropes.values()):
        return None
    return [ropes[kind] for kind in per_layer]


def layer_rope(rope: Rope | Sequence[Rope | None] | None, layer: int) -> Rope | None:
    """The RoPE of ``layer`` from one shared by every layer or a list of them (None: none)."""
    if rope is None or isinstance(rope, Rope):
        return rope
    return rope[layer]
