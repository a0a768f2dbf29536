"""Quantized streams encoded on the tensors' device: all substreams of a group of layers at once.

``encode(..., backend="torch" | "triton")`` writes the same bytes as the default
numba path (:func:`kvcodec.codec.substream.encode_quantized`, one substream at a
time, symbols through the host), but keeps the work on the device. For a group of
layers (all of them unless the stream is large, see :data:`MAX_GROUP_ELEMENTS`):

1. keys and values are stacked ``[G, 2, H, T, D]``; the raw attention-sink tokens go
   to the host as they are, the rest (the *quantized region*) to float32 and through
   the profile's ``Transform.prepare`` (keys un-rotated at their absolute positions);
2. every block's per-head statistics at once, by segment reductions over the tokens
   (``seg[t]`` = the block of token ``t``): absmax, then the exact integer sums of
   :func:`kvcodec.codec.quantize.head_rms`. Only these small arrays reach the host,
   where the stream's step rules (the same functions the numba path calls) pick each
   substream's steps;
3. symbols ``round(x / step)`` (or ``Transform.forward_scaled``) with each token's
   block's steps, then per block and channel the centre, deltas, largest and summed
   ``|delta|`` (integer operations, as :func:`kvcodec.codec.rans.channel_deltas`);
   classes on the host (:func:`kvcodec.codec.entropy.scale_classes`, ``[substreams, C]``);
4. the coded deltas of every substream in symbol order, one
   :func:`kvcodec.codec.rans_encode.encode_flat_batch` call (one Triton launch), and
   the payloads assembled field by field as ``encode_quantized`` writes them.

Why the bytes agree: every float operation on the data is elementwise IEEE arithmetic
on the same operands (division, multiply, add, round-half-even), whatever the tensor
shape; every reduction is an exact integer sum or a max (order-free); the RMS is
finished on the host from the integers with correctly rounded operations (Python's
int / int is correctly rounded; so is a float64 division of operands below 2**53).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kvcodec.codec import entropy, predict, substream
from kvcodec.codec.container import Header
from kvcodec.codec.predict import FLOOR_FACTOR, Predictor
from kvcodec.codec.quantize import block_rms, segment_sum
from kvcodec.codec.rans_encode import encode_flat_batch
from kvcodec.codec.sideprior import SidePrior, choose_side
from kvcodec.codec.transform import Transform, snap_scales

# K+V elements coded per group of layers (bounds device memory at ~40 bytes an element)
MAX_GROUP_ELEMENTS = 1 << 27
StatsRule = Callable[..., np.ndarray]  # (rms, absmax, factor) float64 [..., H] -> float32 steps [..., H]
_U32 = struct.Struct("<I")
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


@dataclass
class _Segments:
    """The blocks with quantized tokens, as segments of the quantized region ``[raw_tokens, tokens)``."""

    blocks: list[int]  # block numbers
    starts: list[int]  # first token of each, in the region
    counts: list[int]  # quantized tokens of each
    seg: torch.Tensor  # int64 [region tokens]: segment of each token

    @property
    def index(self) -> dict[int, int]:
        """Block number -> segment."""
        return {b: s for s, b in enumerate(self.blocks)}

    @classmethod
    def of(cls, h: Header, device) -> _Segments:
        blocks, starts, counts = [], [], []
        for b in range(h.blocks_per_tensor):
            lo, hi = max(b * h.token_block, h.raw_tokens), min((b + 1) * h.token_block, h.tokens)
            if hi > lo:
                blocks.append(b)
                starts.append(lo - h.raw_tokens)
                counts.append(hi - lo)
        seg = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
        return cls(blocks, starts, counts, seg.to(device))


@dataclass
class _Quantized:
    """Side information of a group's substreams ``[G, 2, segments, ...]`` on the host, words per substream."""

    steps: np.ndarray  # float32 [G, 2, S, H]
    centers: np.ndarray  # int64 [G, 2, S, C]
    classes: np.ndarray  # uint8 [G, 2, S, C]
    coded: list[tuple[np.ndarray, np.ndarray]]  # (words, escapes) per substream, in [G, 2, S] order
    last: torch.Tensor | None = None  # header flag 8: the group's last layer's symbols [2, H, Tq, D]


def encode_payloads(
    keys: torch.Tensor,
    values: torch.Tensor,
    header: Header,
    step_rules: Callable[[int, bool], StatsRule],
    transforms: Callable[[int, bool], Transform | None],
    backend: str,
    progress: Callable[[int, int], None] | None = None,
    max_elements: int | None = None,
    priors: Callable[[int, bool], SidePrior | None] | None = None,
    predictors: Callable[[int, bool], Predictor | None] | None = None,
) -> list[bytes]:
    """Every substream payload of a quantized (coder 3) stream, in substream order.

    Args:
        keys, values: ``[layers, H, T, D]`` in the stream's dtype, on the coding device.
        header: the stream's header (raw tokens, blocks, first position).
        step_rules: ``(layer, is_value) -> rule``; ``rule(rms, absmax, factor)`` gives the steps.
        transforms: ``(layer, is_value) -> Transform`` or None.
        backend: the entropy coder, ``torch`` or ``triton``.
        progress: optional ``callback(done, total)``, called per substream.
        max_elements: K+V elements per group of layers, one entropy batch per group
            (default :data:`MAX_GROUP_ELEMENTS`).
        priors: ``(layer, is_value) -> SidePrior`` or None (streams with header flag 4).
        predictors: ``(layer, is_value) -> Predictor`` (None for a substream without one), or
            None (streams without header flag 8): predicted substreams' step floor is raised and
            their symbols coded as differences from the prediction, as ``api.encode`` does.

    Returns:
        The payloads, byte-identical to :func:`kvcodec.codec.substream.encode_quantized`'s.

    Raises:
        ValueError: an escaped magnitude does not fit 16 bits (as the numba coder).
    """
    layers, heads, tokens, dim = keys.shape
    group = max(1, (max_elements or MAX_GROUP_ELEMENTS) // (2 * heads * tokens * dim))
    segments = _Segments.of(header, keys.device)
    payloads: list[bytes] = []
    previous = None  # header flag 8: the symbols of the layer before the group
    for first in range(0, layers, group):
        ids = list(range(first, min(layers, first + group)))
        x = torch.stack([keys[ids[0] : ids[-1] + 1], values[ids[0] : ids[-1] + 1]], dim=1)  # [G, 2, H, T, D]
        raw = _host_ints(x[..., : header.raw_tokens, :]) if header.raw_tokens else None
        quant = None
        if segments.blocks:
            quant = _quantize(x[..., header.raw_tokens :, :].float(), ids, header, segments, step_rules, transforms,
                              backend, priors, predictors, previous)
            previous = quant.last
        sides = _sides(header, quant, ids, priors) if quant is not None else None
        for g in range(len(ids)):
            for kind in (0, 1):
                for b in range(header.blocks_per_tensor):
                    payloads.append(_payload(header, segments, raw, quant, sides, g, kind, b))
                    if progress:
                        progress(len(payloads), header.n_substreams)
    return payloads


def _sides(h: Header, quant: _Quantized, ids: list[int], priors) -> np.ndarray:
    """The packed side information of every quantized substream of the group, ``[G, 2, S]`` bytes objects."""
    g, kinds, segs, heads = quant.steps.shape
    channels = quant.centers.shape[-1]
    prs = None
    if priors:
        prs = [priors(ids[i], bool(k)) for i in range(g) for k in range(kinds) for _ in range(segs)]
    steps, centers = quant.steps.reshape(-1, heads), quant.centers.reshape(-1, channels)
    classes = np.ascontiguousarray(quant.classes.reshape(-1, channels))
    if h.packed_side:
        packed = substream.pack_sides(steps, centers, classes, prs)
    else:  # the plain layout (no header flag 2)
        packed = [substream.pack_side(st, cen, cls, False) for st, cen, cls in zip(steps, centers, classes)]
    out = np.empty(g * kinds * segs, dtype=object)
    out[:] = packed
    return out.reshape(g, kinds, segs)


def _host_ints(x: torch.Tensor) -> np.ndarray:
    """The bits of ``x`` as host integers (little-endian when written with ``astype('<iN')``)."""
    return x.contiguous().view(_INT_VIEW[x.dtype]).cpu().numpy()


def _quantize(
    xq, ids, header, segments, step_rules, transforms, backend, priors=None, predictors=None, previous=None
) -> _Quantized:
    """Steps, symbols, centres, classes and the entropy-coded words of a group's quantized region
    (``previous``: header flag 8, the symbols ``[2, H, Tq, D]`` of the layer before ``ids[0]``)."""
    trs = [[transforms(layer, bool(kind)) for kind in (0, 1)] for layer in ids]
    first = header.first_position + header.raw_tokens
    if any(t is not None for row in trs for t in row):
        xq = torch.stack([torch.stack([xq[g, k] if t is None else t.prepare(xq[g, k], first)
                                       for k, t in enumerate(row)]) for g, row in enumerate(trs)])
    rms, absmax = block_rms(xq, segments.seg, segments.counts)  # [G, 2, S, H], as head_rms per block
    steps = np.empty(rms.shape, dtype=np.float32)  # [G, 2, S, H]
    for g, layer in enumerate(ids):
        for k in (0, 1):
            factor = trs[g][k].step_floor_factor() if trs[g][k] is not None else 1.0
            if predictors is not None and predictors(layer, bool(k)) is not None:
                factor *= FLOOR_FACTOR
            steps[g, k] = step_rules(layer, bool(k))(rms[g, k], absmax[g, k], factor)
    q = _symbols(xq, steps, trs, segments)
    last = None
    if predictors is not None:  # the prediction is per token: every block of a layer at once
        def exact(lay: int, kind: bool) -> torch.Tensor:  # a source's symbols (before any is replaced)
            return previous[int(kind)] if lay < ids[0] else q[lay - ids[0], int(kind)]

        offsets = {}
        for g, layer in enumerate(ids):
            for k in (0, 1):
                predictor = predictors(layer, bool(k))
                if predictor is not None:
                    offsets[g, k] = predictor.offsets_hdt([exact(*src) for src in predict.sources(layer, bool(k))])
        last = q[-1].clone()
        for (g, k), offset in offsets.items():
            q[g, k] -= offset
    centers, deltas, kmax, abs_sums = segment_channel_deltas(q, segments)
    n = np.array(segments.counts, dtype=np.int64)
    classes = entropy.scale_classes(abs_sums, kmax, n[None, None, :, None])
    if priors is not None and header.packed_side:
        centers, classes = _choose_sides(deltas, centers, classes, steps, ids, priors, segments)
    coded = _entropy_code(deltas, classes, segments, backend)
    return _Quantized(steps, centers, classes, coded, last)


def _choose_sides(deltas: torch.Tensor, centers, classes, steps, ids, priors, segments: _Segments):
    """:func:`kvcodec.codec.sideprior.choose_side` for every substream with a prior, as
    ``encode_quantized`` makes it; shifts the device ``deltas`` to the chosen centres in place.
    Returns the chosen ``(centers, classes)``."""
    g, kinds, heads, tq, dim = deltas.shape
    centers, classes = centers.copy(), classes.copy()
    shifts = np.zeros(centers.shape, dtype=np.int64)  # [G, 2, S, C]
    for i, layer in enumerate(ids):
        for k in (0, 1):
            prior = priors(layer, bool(k))
            if prior is None:
                continue
            rows = deltas[i, k].permute(0, 2, 1).reshape(heads * dim, tq).cpu().numpy()  # channel h * D + d
            for s, (start, n) in enumerate(zip(segments.starts, segments.counts)):
                centers[i, k, s], classes[i, k, s], shifts[i, k, s] = choose_side(
                    rows[:, start : start + n], centers[i, k, s], classes[i, k, s], prior.predict(steps[i, k, s]))
    if shifts.any():
        by_token = torch.from_numpy(shifts).to(deltas.device).reshape(g, kinds, -1, heads, dim)[:, :, segments.seg]
        deltas -= by_token.permute(0, 1, 3, 2, 4)  # [G, 2, Tq, H, D] -> [G, 2, H, Tq, D]
    return centers, classes


def _symbols(xq: torch.Tensor, steps: np.ndarray, trs, segments: _Segments) -> torch.Tensor:
    """int32 symbols ``[G, 2, H, Tq, D]``: each token quantized with its block's steps."""
    seg = segments.seg
    if all(t is None for row in trs for t in row):
        step = torch.from_numpy(steps).to(xq.device).transpose(-1, -2)[..., seg, None]  # [G, 2, H, Tq, 1]
        return torch.round(xq / step).to(torch.int32)
    out = []
    for g, row in enumerate(trs):
        for k, t in enumerate(row):
            if t is None:
                step = torch.from_numpy(steps[g, k]).to(xq.device).T[:, seg, None]
                out.append(torch.round(xq[g, k] / step).to(torch.int32))
            else:
                scale = torch.from_numpy(snap_scales(steps[g, k])).to(xq.device).T[:, seg, None]
                out.append(t.forward_scaled(xq[g, k], scale))
    return torch.stack(out).reshape(xq.shape)


def segment_channel_deltas(q: torch.Tensor, segments: _Segments):
    """:func:`kvcodec.codec.rans.channel_deltas` of every block at once.

    Args:
        q: int32 symbols ``[G, 2, H, Tq, D]``.

    Returns:
        ``(centers, deltas, kmax, abs_sums)``: host int64 ``[G, 2, S, C]`` centres, the deltas
        on the device (int64 ``[G, 2, H, Tq, D]``), host int64 ``[G, 2, S, C]`` largest and
        summed ``|delta|`` (``C = H * D``, channel ``h * D + d``).
    """
    seg, n_seg = segments.seg, len(segments.counts)
    q = q.to(torch.int64)
    n = torch.tensor(segments.counts, dtype=torch.int64, device=q.device)[:, None]  # [S, 1]
    sums = segment_sum(q, seg, n_seg, -2)  # [G, 2, H, S, D]
    centers = torch.div(2 * sums + n, 2 * n, rounding_mode="floor")  # round half up, floor division
    deltas = q - centers[..., seg, :]
    absd = deltas.abs()
    index = seg[:, None].expand(absd.shape[-2:]).expand_as(absd)
    kmax = absd.new_zeros(sums.shape).scatter_reduce_(-2, index, absd, "amax")
    abs_sums = segment_sum(absd, seg, n_seg, -2)
    return _per_substream(centers), deltas, _per_substream(kmax), _per_substream(abs_sums)


def _per_substream(t: torch.Tensor) -> np.ndarray:
    """``[G, 2, H, S, D]`` on the device -> host ``[G, 2, S, H * D]``."""
    g, kinds, heads, s, dim = t.shape
    return t.permute(0, 1, 3, 2, 4).reshape(g, kinds, s, heads * dim).cpu().numpy()


def _entropy_code(deltas: torch.Tensor, classes: np.ndarray, segments: _Segments, backend: str):
    """One entropy batch: every substream's coded deltas in symbol order (channel, then token)."""
    g, kinds, heads, tq, dim = deltas.shape
    channels, dev = heads * dim, deltas.device
    rows = deltas.permute(0, 1, 2, 4, 3).reshape(g * kinds, channels * tq)  # (channel, token) per (layer, kind)
    # position of (channel c, token t) in the (segment, channel, token) order: start*C + c*n + (t - start)
    seg = segments.seg
    start = torch.tensor(segments.starts, dtype=torch.int64, device=dev)[seg]
    n = torch.tensor(segments.counts, dtype=torch.int64, device=dev)[seg]
    c = torch.arange(channels, device=dev)[:, None]
    t = torch.arange(tq, device=dev)[None, :]
    pos = (start * channels + c * n + (t - start)).reshape(-1)
    perm = torch.empty_like(pos)
    perm[pos] = torch.arange(len(pos), device=dev)
    cls_of = torch.empty_like(pos)
    cls_of[pos] = (seg[None, :] * channels + c).expand(channels, tq).reshape(-1)  # (segment, channel) of each slot
    cls = torch.from_numpy(classes.astype(np.int64)).to(dev).reshape(g * kinds, -1)[:, cls_of]
    ordered = rows[:, perm]
    coded = cls != 0
    counts = ((classes != 0).sum(axis=-1) * np.array(segments.counts)).reshape(-1).tolist()
    return encode_flat_batch(ordered[coded], cls[coded], counts, dev, backend)


def _payload(h: Header, segments: _Segments, raw, quant: _Quantized | None, sides, g: int, kind: int, b: int) -> bytes:
    """Substream ``(layer g of the group, kind, block b)``: raw tokens, then the quantized part's fields."""
    n_raw = h.block_raw_tokens(b)
    start = b * h.token_block
    out = [raw[g, kind, :, start : start + n_raw].astype(raw.dtype.newbyteorder("<")).tobytes()] if n_raw else []
    s = segments.index.get(b)
    if s is not None:
        words, escapes = quant.coded[(g * 2 + kind) * len(segments.blocks) + s]
        out += [sides[g, kind, s], _U32.pack(len(escapes)), escapes.astype("<u2").tobytes(),
                words.astype("<u2").tobytes()]
    return b"".join(out)


__all__ = ["MAX_GROUP_ELEMENTS", "encode_payloads", "segment_channel_deltas"]
