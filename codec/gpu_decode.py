"""Coder-3 streams decoded on the device with a fixed number of launches per group of layers.

The per-substream path (:func:`kvcodec.codec.layers._decode_batch`) parses every substream
on the host and dequantizes it with its own tensor operations: about 0.7 ms of Python per
substream, so a 4,096-token 8B-shaped chunk (1,024 substreams) took 0.76 s on an H100 machine,
almost all of it on the host (benchmarks/RESULTS.md, "GPU (H100)"; this path: 26.7 ms, 16.5 ms
with the stream in pinned memory). Here the host work of a group of layers is a fixed number
of numpy operations over all its substreams:

1. the fixed fields of every substream (steps, side-information and escape counts, word
   ranges) are read by vectorised gathers from the stream's bytes and checked as
   :func:`kvcodec.codec.substream.parse_rans` checks them;
2. the group's bytes go to the device once; the kernel reads words and escapes there;
3. one launch of :mod:`kvcodec.codec.rans_triton`'s kernel decodes every substream's packed
   side information (two rows of ``C`` symbols with coder 3's own tables); torch turns the
   rows into classes and centres (adding the prior's prediction for flag-4 streams);
4. one launch decodes every substream's deltas into ``[substream, channel, token]``;
5. dequantization runs over whole runs of blocks at once, straight into the
   ``[layers, kv_heads, tokens, head_dim]`` outputs: one Triton pass without a transform,
   batched torch operations (the exact float64 basis products) with one;
6. meanwhile host threads check every substream's CRC-32 (zlib releases the GIL); one
   device-to-host copy of the status words at the end raises what the per-substream path
   raises, naming the substream.

The tensors are bit-identical to every other decoder's: the same integer symbols, and the
same elementwise IEEE operations on the same operands (the inverse transform's sums are
exact integers in float64, whatever the batching). Streams without packed side information
(header flag 2) take the per-substream path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from kvcodec.codec import container, rans, rans_triton
from kvcodec.codec.container import Header, Layout
from kvcodec.codec.entropy import NUM_CLASSES
from kvcodec.codec.errors import CorruptStream, LimitExceeded
from kvcodec.codec.transform import SCALE_BITS, rotate

_ENDIAN = {2: "<i2", 4: "<i4"}


def supports(h: Header) -> bool:
    """Whether streams with this header take this path (quantized coder 3, packed side information;
    not yet prediction, header flag 8: those take the per-layer Triton path)."""
    return h.coder == container.CODER_RANS and h.packed_side and not h.predicted_values


def _check_crcs(data, layout: Layout, sids: np.ndarray) -> None:
    """Raise the first :class:`ChecksumMismatch` among ``sids`` (run on a pool thread)."""
    for sid in sids:
        container.substream(data, layout, int(sid))


@dataclass
class _Fields:
    """Byte positions and counts of the quantized substreams' fields (int64 ``[N]`` each)."""

    steps: np.ndarray  # float32 [N, H]
    side_classes: np.ndarray  # uint8 [N, 2]
    side_esc: np.ndarray  # first side escape
    side_esc_count: np.ndarray
    side_words: np.ndarray  # first side word
    side_word_count: np.ndarray
    esc: np.ndarray  # first escape
    esc_count: np.ndarray
    words: np.ndarray  # first word (the lane states)
    stop: np.ndarray  # end of the substream


class _Errors:
    """The first problem of every substream (in the group's ``[layer, kind, block]`` order)."""

    def __init__(self, h: Header, sids: np.ndarray) -> None:
        self.h, self.sids = h, sids
        self.found: dict[int, str] = {}

    def add(self, failed: np.ndarray, index: np.ndarray, message) -> None:
        """Record ``message(i)`` (``i``: position in ``index``) for each failed substream ``index[i]``."""
        for i in np.nonzero(failed)[0]:
            self.found.setdefault(int(index[i]), message(int(i)))

    def raise_first(self) -> None:
        if self.found:
            row = min(self.found)
            raise CorruptStream(f"{self.h.describe(int(self.sids[row]))}: {self.found[row]}")


def _gather(buf: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """``width`` bytes at each of ``pos`` as a ``[N, width]`` uint8 array."""
    return buf[pos[:, None] + np.arange(width)]


def _u32(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_gather(buf, pos, 4)).view("<u4")[:, 0].astype(np.int64)


def _parse(buf: np.ndarray, h: Header, base: np.ndarray, stop: np.ndarray, index: np.ndarray,
           errors: _Errors) -> _Fields | None:
    """The fields of the quantized parts at ``base`` (``index``: their rows); None if any is malformed.

    The fixed part (steps, side classes and counts) fits: the callers checked minimum lengths.
    """
    heads = h.kv_heads
    size = stop - base
    steps = np.ascontiguousarray(_gather(buf, base, 4 * heads)).view("<f4").astype(np.float32)
    bad = ~np.all(np.isfinite(steps) & (steps > 0), axis=1)
    errors.add(bad, index, lambda i: f"step sizes: invalid value in {steps[i].tolist()}")
    side = base + 4 * heads
    side_classes = _gather(buf, side, 2)
    over = side_classes > NUM_CLASSES
    errors.add(over.any(axis=1), index, lambda i: "channel {0}: scale class {1} > {2}".format(
        int(np.argmax(over[i])), int(side_classes[i, np.argmax(over[i])]), NUM_CLASSES))
    n_side_esc, n_side_words = _u32(buf, side + 2), _u32(buf, side + 6)
    side_end = side + 10 + 2 * (n_side_esc + n_side_words)
    errors.add(side_end + 4 > stop, index, lambda i: f"side information: {n_side_esc[i]} escapes and "
               f"{n_side_words[i]} words do not fit the {size[i]}-byte substream")
    if errors.found:
        return None
    n_esc = _u32(buf, side_end)
    words = side_end + 4 + 2 * n_esc
    errors.add(words > stop, index,
               lambda i: f"escape list: {n_esc[i]} escapes do not fit the {size[i]}-byte substream")
    errors.add((words <= stop) & ((stop - words) % 2 == 1), index,
               lambda i: f"rANS words: {stop[i] - words[i]} bytes is not a whole number of u16 words")
    if errors.found:
        return None
    return _Fields(steps, side_classes, side + 10, n_side_esc, side + 10 + 2 * n_side_esc, n_side_words,
                   side_end + 4, n_esc, words, stop)


@dataclass
class _Run:
    """Consecutive blocks with the same raw and quantized token counts (``tokens``: quantized per block)."""

    blocks: list[int]
    n_raw: int
    tokens: int


def _runs(h: Header) -> list[_Run]:
    runs: list[_Run] = []
    for b in range(h.blocks_per_tensor):
        n_raw = h.block_raw_tokens(b)
        tq = h.block_tokens(b) - n_raw
        if tq == 0:
            continue
        last = runs[-1] if runs else None
        if last and n_raw == 0 and last.n_raw == 0 and last.tokens == tq and last.blocks[-1] == b - 1:
            last.blocks.append(b)
        else:
            runs.append(_Run([b], n_raw, tq))
    return runs


def decode_group(data, layout: Layout, layers: list[int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[len(layers), kv_heads, tokens, head_dim]`` of ``dtype`` on ``device``.

    ``layout`` has its profile attached (:func:`kvcodec.codec.api.attach_profile`) and the
    substreams of ``layers`` are at least their minimum length (``api._check_min_lengths``).

    Raises:
        ChecksumMismatch: a substream's CRC-32 does not match (checked before anything else is reported).
        CorruptStream: a substream's content is malformed (the message names it).
    """
    h = layout.header
    device = torch.device(device or "cpu")
    blocks = h.blocks_per_tensor
    sids = ((np.asarray(layers, dtype=np.int64)[:, None, None] * 2 + np.arange(2)[None, :, None]) * blocks
            + np.arange(blocks)[None, None, :]).reshape(-1)  # [layer, kind, block] order
    crcs = [container.crc_pool().submit(_check_crcs, data, layout, part)
            for part in np.array_split(sids, container.CRC_THREADS)]

    def checked_crcs() -> None:
        for f in crcs:
            f.result()

    try:
        out = _decode(data, layout, layers, sids, device, dtype)
    except CorruptStream:
        checked_crcs()  # a damaged substream is reported as such first
        raise
    checked_crcs()
    return out


def _decode(data, layout: Layout, layers, sids, device, dtype):
    h = layout.header
    n_layers, blocks, heads, dim = len(layers), h.blocks_per_tensor, h.kv_heads, h.head_dim
    channels, width = heads * dim, container.DTYPE_BYTES[h.dtype]
    buf = np.frombuffer(data, dtype=np.uint8)
    offs = np.asarray(layout.offsets, dtype=np.int64)[sids]
    stop = offs + np.asarray(layout.lengths, dtype=np.int64)[sids]
    block = sids % blocks
    n_raw = np.array([h.block_raw_tokens(b) for b in range(blocks)], dtype=np.int64)[block]
    tq = np.array([h.block_tokens(b) for b in range(blocks)], dtype=np.int64)[block] - n_raw
    base = offs + heads * n_raw * dim * width
    errors = _Errors(h, sids)
    raw_only = tq == 0
    errors.add(raw_only & (stop != base), np.arange(len(sids)),
               lambda i: f"raw tokens: {stop[i] - base[i]} stray bytes at the end")
    errors.raise_first()

    runs = _runs(h)
    layer_kind = np.arange(n_layers * 2)[:, None] * blocks
    order = np.concatenate([(layer_kind + np.array(r.blocks)[None, :]).reshape(-1) for r in runs] or
                           [np.zeros(0, np.int64)])  # quantized substreams, run by run, [layer, kind, block]
    fields = _parse(buf, h, base[order], stop[order], order, errors) if len(order) else None
    errors.raise_first()

    try:
        kv = torch.empty((2, n_layers, heads, h.tokens, dim), dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory errors
        raise LimitExceeded(f"output: cannot allocate 2 x {[n_layers, heads, h.tokens, dim]} {dtype} "
                            f"({type(exc).__name__})") from None
    _raw_tokens(buf, h, offs, block, kv, dtype, errors)
    if fields is None:
        errors.raise_first()
        return kv[0], kv[1]

    lo = int(offs.min())
    words = _upload(buf, lo, int(stop.max()), device)
    side_rows, side_status, side_n = _decode_side(words, fields, lo, channels, device)
    classes, centres, flags = _side_values(layout, layers, order, fields, side_rows, device)
    deltas, main_status, n = _decode_deltas(words, fields, lo, classes, tq[order], channels, device)
    report = torch.cat([side_status, side_n[:, None], main_status, flags[:, None], n[:, None]], dim=1).cpu().numpy()
    _report(report, fields, lo, order, errors)
    errors.raise_first()
    _dequantize(layout, layers, runs, fields.steps, centres, deltas, kv, dtype)
    return kv[0], kv[1]


def _upload(buf: np.ndarray, lo: int, hi: int, device) -> torch.Tensor:
    """Bytes ``[lo, hi)`` of the stream on ``device`` as u16 words (int16 storage; ``lo`` is word 0)."""
    part = buf[lo:hi]
    if len(part) % 2:
        part = np.concatenate([part, np.zeros(1, np.uint8)])
    if device.type == "cpu":
        part = part.copy()  # writable and aligned (the kernel runs in Triton's interpreter)
    with warnings.catch_warnings():  # read-only source: the device copy is what the kernel reads
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(part)
    return t.to(device).view(torch.int16)


# the exponent bits: a float is Inf or NaN when they are all set
_EXPONENT = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000}


def _raw_tokens(buf, h: Header, offs, block, kv: torch.Tensor, dtype, errors: _Errors) -> None:
    """The raw (attention-sink) tokens of every block that has some, straight into ``kv``.

    Checked and moved as integers on the host (a torch operation on the CPU would wake its
    thread pool, which then competes with the CRC threads); converted on the device.
    """
    from kvcodec.codec.api import _TORCH_DTYPES  # api imports this module

    width = container.DTYPE_BYTES[h.dtype]
    stored = _TORCH_DTYPES[h.dtype]
    n_layers = kv.shape[1]
    exponent = _EXPONENT[h.dtype]
    for b in range(h.blocks_per_tensor):
        n_raw = h.block_raw_tokens(b)
        if not n_raw:
            continue
        rows = np.nonzero(block == b)[0]  # [layer, kind] order
        size = h.kv_heads * n_raw * h.head_dim * width
        ints = np.ascontiguousarray(_gather(buf, offs[rows], size)).view(_ENDIAN[width]).astype(f"=i{width}")
        finite = ((ints & exponent) != exponent).all(axis=1)
        errors.add(~finite, rows, lambda i: "raw tokens: non-finite value in a quantized stream")
        raw = torch.from_numpy(ints).to(kv.device).view(stored).reshape(n_layers, 2, h.kv_heads, n_raw, h.head_dim)
        start = b * h.token_block
        kv[:, :, :, start : start + n_raw] = raw.transpose(0, 1).to(dtype)


def _decode_side(words: torch.Tensor, f: _Fields, lo: int, channels: int, device):
    """One launch: every substream's two side rows, int32 ``[N, 2, C]``; status; symbols."""
    size = len(f.steps)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in (
        ("begin", (f.side_words - lo) // 2), ("count", f.side_word_count), ("esc", (f.side_esc - lo) // 2),
        ("esc_count", f.side_esc_count), ("classes", f.side_classes.astype(np.int64)))}
    cls, row, coded = rans_triton.coded_rows(t["classes"])
    n = coded * channels
    tokens = torch.full((size,), channels, dtype=torch.int64, device=device)
    step = torch.arange(size, dtype=torch.int64, device=device)
    batch = rans_triton.Batch(words, t["begin"], t["begin"] + t["count"], t["esc"], t["esc_count"], n,
                              rans_triton.lanes_of(n), tokens, cls.reshape(-1), row.reshape(-1), 2 * step,
                              2 * channels * step)
    rows = torch.zeros(size * 2 * channels + 1, dtype=torch.int32, device=device)
    return rows[:-1].reshape(size, 2, channels), rans_triton.launch(batch, rows), n


def _side_values(layout: Layout, layers, order, f: _Fields, rows: torch.Tensor, device):
    """Classes (int64) and centres (int32) ``[N, C]`` from the side rows, and a flag per substream
    (1: a class outside 0..NUM_CLASSES, 2: a centre outside int16)."""
    h = layout.header
    if h.predicted_side:
        from kvcodec.codec.api import block_prior

        blocks = h.blocks_per_tensor
        sids = np.asarray(layers, dtype=np.int64)[order // (2 * blocks)] * 2 * blocks + order % (2 * blocks)
        preds = [block_prior(layout, int(sid)).predict(steps) for sid, steps in zip(sids, f.steps)]
        pred_classes = torch.from_numpy(np.stack([p[0] for p in preds])).to(device)
        pred_centres = torch.from_numpy(np.stack([p[1] for p in preds])).to(device)
        classes = rows[:, 0].to(torch.int64) + pred_classes
        centres = rows[:, 1].to(torch.int64) + pred_centres
    else:
        classes = torch.cumsum(rows[:, 0].to(torch.int64), dim=1)
        centres = rows[:, 1].to(torch.int64)
    bad_class = ((classes < 0) | (classes > NUM_CLASSES)).any(dim=1)
    bad_centre = ((centres < -32768) | (centres > 32767)).any(dim=1)
    flags = torch.where(bad_class, 1, torch.where(bad_centre, 2, 0)).to(torch.int64)
    return classes.clamp(0, NUM_CLASSES), centres.clamp(-32768, 32767).to(torch.int32), flags


def _decode_deltas(words, f: _Fields, lo: int, classes: torch.Tensor, tq: np.ndarray, channels: int, device):
    """One launch: every substream's deltas ``[channel, token]``, flat in substream order; status; symbols."""
    size = len(tq)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in (
        ("begin", (f.words - lo) // 2), ("end", (f.stop - lo) // 2), ("esc", (f.esc - lo) // 2),
        ("esc_count", f.esc_count), ("tokens", tq), ("out_off", np.concatenate([[0], np.cumsum(channels * tq)])))}
    cls, row, coded = rans_triton.coded_rows(classes)
    n = coded * t["tokens"]
    step = torch.arange(size, dtype=torch.int64, device=device)
    batch = rans_triton.Batch(words, t["begin"], t["end"], t["esc"], t["esc_count"], n, rans_triton.lanes_of(n),
                              t["tokens"], cls.reshape(-1), row.reshape(-1), channels * step,
                              t["out_off"][:-1].contiguous())
    out = torch.zeros(int(channels * tq.sum()) + 1, dtype=torch.int32, device=device)
    return out, rans_triton.launch(batch, out), n


def _report(report: np.ndarray, f: _Fields, lo: int, order, errors: _Errors) -> None:
    """Turn the status words of both launches and the side-value flags into error messages."""
    s = rans_triton.STATUS
    side, side_n = report[:, :s], report[:, s]
    main, flags, n = report[:, s + 1 : 2 * s + 1], report[:, 2 * s + 1], report[:, 2 * s + 2]
    side_code = rans_triton.status_codes(side, (f.side_words - lo) // 2 + f.side_word_count, f.side_esc_count,
                                         side_n, f.side_word_count + f.side_esc_count)
    errors.add(side_code > 0, order,
               lambda i: f"side information: entropy payload: {rans._ERRORS[int(side_code[i])]}")
    errors.add(flags == 1, order, lambda i: f"classes: decoded class outside 0..{NUM_CLASSES}")
    errors.add(flags == 2, order, lambda i: "centres: decoded centre outside int16")
    code = rans_triton.status_codes(main, (f.stop - lo) // 2, f.esc_count, n, (f.stop - f.words) // 2 + f.esc_count)
    errors.add(code > 0, order, lambda i: f"entropy payload: {rans._ERRORS[int(code[i])]}")


def _dequantize(layout: Layout, layers, runs: list[_Run], steps: np.ndarray, centres: torch.Tensor,
                deltas: torch.Tensor, kv: torch.Tensor, dtype) -> None:
    """Symbols -> values of every run of blocks, written into ``kv`` ``[2, L, H, T, D]``."""
    h = layout.header
    n_layers, heads, dim = len(layers), h.kv_heads, h.head_dim
    channels = heads * dim
    row = pos = 0
    for run in runs:
        nb, tq = len(run.blocks), run.tokens
        count = n_layers * 2 * nb
        d = deltas[pos : pos + count * channels * tq].view(n_layers, 2, nb, channels, tq)
        c = centres[row : row + count]  # [L * 2 * nb, C]
        st = steps[row : row + count].reshape(n_layers, 2, nb, heads)
        start = run.blocks[0] * h.token_block + run.n_raw
        if h.transformed:
            _transform_run(layout, layers, run, d, c.view(n_layers, 2, nb, channels, 1), st, kv, start, dtype)
        else:  # one fused pass straight into kv
            _fused_dequantize(d, c, st, kv, start, torch.finfo(dtype))
        row += count
        pos += count * channels * tq


def _transform_run(layout: Layout, layers, run: _Run, d, c, st: np.ndarray, kv: torch.Tensor, start: int,
                   dtype) -> None:
    """The inverse transform of one run (``d`` ``[L, 2, nb, C, tq]``), written into ``kv``."""
    h = layout.header
    n_layers, heads, dim = len(layers), h.kv_heads, h.head_dim
    nb, tq = len(run.blocks), run.tokens
    finfo = torch.finfo(dtype)  # a value just under the dtype's max must not round to Inf
    target = kv[:, :, :, start : start + nb * tq]
    first = h.block_quantized_position(run.blocks[0])
    for kind in (0, 1):
        q = d[:, kind] + c[:, kind]  # int32 [L, nb, C, tq]
        q = q.view(n_layers, nb, heads, dim, tq).permute(0, 2, 1, 4, 3).reshape(n_layers, heads, nb * tq, dim)
        step = torch.from_numpy(np.ascontiguousarray(st[:, kind].transpose(0, 2, 1))).to(kv.device)  # [L, H, nb]
        step = step[:, :, :, None].expand(n_layers, heads, nb, tq).reshape(n_layers, heads, nb * tq, 1)
        x = _values(layout, layers, kind, q, step, first)
        target[kind].copy_(x.clamp(finfo.min, finfo.max).to(dtype))


def _fused_dequantize(d: torch.Tensor, centres: torch.Tensor, steps: np.ndarray, kv: torch.Tensor, start: int,
                      finfo) -> None:
    """:func:`rans_triton_kernel.dequant_kernel` over one run (``d`` ``[L, 2, nb, C, tq]``)."""
    import triton

    from kvcodec.codec.rans_triton_kernel import dequant_kernel

    n_layers, _, nb, channels, tq = d.shape
    heads, dim = kv.shape[2], kv.shape[4]
    block_t = 64
    step = torch.from_numpy(np.ascontiguousarray(steps.reshape(-1, heads), dtype=np.float32)).to(kv.device)
    grid = (n_layers * 2 * nb * heads, triton.cdiv(tq, block_t))
    bf16 = kv.dtype == torch.bfloat16
    dequant_kernel[grid](d, centres, step, kv.view(torch.int16) if bf16 else kv, n_layers, nb, heads, tq, kv.shape[3],
                         start, finfo.min, finfo.max, DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_T=block_t,
                         BF16=bf16)


def _values(layout: Layout, layers, kind: int, q: torch.Tensor, step: torch.Tensor, first: int) -> torch.Tensor:
    """float32 ``[L, H, T, D]`` of the symbols ``q`` (int32) with per-token steps ``step`` ``[L, H, T, 1]``:
    the elementwise product of :func:`kvcodec.codec.quantize.dequantize_block`, or the inverse
    transform of :meth:`kvcodec.codec.transform.Transform.inverse`."""
    h = layout.header
    if not h.transformed:
        return q.to(torch.float32) * step
    transforms = [layout.profile.transform(layer, bool(kind)) for layer in layers]
    rope = transforms[0].rope
    tables = {None if t.rope is None else t.rope.inv_freq.tobytes() for t in transforms}
    if len(tables) > 1:  # per-layer RoPE bases (Gemma 3): one layer at a time
        return torch.cat([_values(layout, [layer], kind, q[i : i + 1], step[i : i + 1], first)
                          for i, layer in enumerate(layers)])
    if all(t.identity for t in transforms):
        x = q.to(torch.float32) * step
    elif len({t.basis.shape for t in transforms}) == 1 and not any(t.identity for t in transforms):
        x = _inverse(q, torch.stack([t._basis(q.device) for t in transforms]), step)
    else:  # mixed kinds of basis across layers: one layer at a time
        return torch.cat([_values(layout, [layer], kind, q[i : i + 1], step[i : i + 1], first)
                          for i, layer in enumerate(layers)])
    return rotate(x, rope, first) if rope is not None else x


def _inverse(q: torch.Tensor, bases: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """:meth:`Transform.inverse` of ``L`` layers at once (``bases`` float64 ``[L, G, B, B]``)."""
    n, heads, tokens, dim = q.shape
    groups, size = bases.shape[1], bases.shape[2]
    v = q.to(torch.float64).permute(0, 2, 1, 3).reshape(n, tokens, groups, size)
    acc = torch.einsum("ntgj,ngji->ntgi", v, bases)  # exact integer sums
    acc = acc.reshape(n, tokens, heads, dim).permute(0, 2, 1, 3)
    scale = step.to(torch.float64) * 2.0**-SCALE_BITS
    return (acc * scale).to(torch.float32)


__all__ = ["decode_group", "supports"]
