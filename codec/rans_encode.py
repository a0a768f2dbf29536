"""Coder 3 encoding on a device: a batch of substreams at once (torch or one Triton launch).

Produces the same words and escapes as the numba encoder
(:func:`kvcodec.codec.rans.encode_deltas`), byte for byte. The work splits
into three parts, two of them plain tensor operations:

1. **Symbols** (torch, vectorised): the coded channels' deltas of every
   substream, flattened in symbol order (channel, then token) and concatenated;
   each becomes its row ``class * ALPHABET + symbol`` of the frequency tables,
   and the escapes' magnitudes are selected in symbol order (that *is* the
   escape list's order).
2. **The rANS recurrence** (sequential per lane): the lanes of a substream
   walk its symbols last to first, symbol ``i`` on lane ``i % N``; coding a
   symbol emits at most one u16, recorded at the symbol's own index (``-1``
   when none). Either one Triton program per substream with the lanes in
   registers (``triton``: one launch for the batch), or a lock-step torch loop
   over the steps with the lanes as a tensor dimension (``torch``: slow, a
   reference on any device).
3. **Word order** (torch): the decoder reads the lanes' final states, then one
   word per emitting symbol in ascending symbol order. So a word's place is
   ``2 * (lanes of this and earlier substreams) + (emitting symbols before it)``,
   an exclusive prefix sum (``torch.cumsum``) over the whole batch, and one scatter.

:func:`entropy_encoder` makes :func:`rans.encode_deltas` use this path in the
current thread; ``kvcodec.codec.encode(..., backend=...)`` codes a whole group of
layers in one :func:`encode_flat_batch` call (:mod:`kvcodec.codec.device_encode`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from kvcodec.codec import rans
from kvcodec.codec.entropy import NUM_CLASSES
from kvcodec.codec.errors import InvalidInput
from kvcodec.codec.rans_torch import _lanes, device_tables

BACKENDS = ("numba", "torch", "triton")
ALPHABET = int(rans.FREQ.shape[1])
_OVERFLOW = f"delta magnitude exceeds the escape range (E + 1 + {rans.MAX_ESCAPE_MAGNITUDE})"


class _Batch:
    """Part 1 on ``device``: flat symbol rows, per-substream offsets, counts, lanes and escapes.

    ``d`` / ``cls``: int64 coded deltas and their classes in symbol order, all substreams
    concatenated (see :func:`_flatten`); ``counts``: symbols per substream.
    """

    def __init__(self, d: torch.Tensor, cls: torch.Tensor, counts: list[int], device: torch.device) -> None:
        self.device = device
        self.counts = counts
        self.lanes = [_lanes(n) if n else 0 for n in self.counts]
        starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.sym_off = torch.from_numpy(starts).to(device)
        if len(cls) and int(cls.max()) > NUM_CLASSES:
            raise ValueError(f"scale class {int(cls.max())} > {NUM_CLASSES}")
        e = device_tables(device)[3][cls]
        up, down = d > e, d < -e
        sym = torch.where(up, 2 * e + 2, torch.where(down, 2 * e + 1, d + e))
        self.fidx = cls * ALPHABET + sym
        is_esc = up | down
        mags = (d.abs() - e - 1)[is_esc]
        if len(mags) and int(mags.max()) > rans.MAX_ESCAPE_MAGNITUDE:
            raise ValueError(_OVERFLOW)
        self.escapes = mags
        self.esc_counts = _segment_sums(is_esc, self.sym_off)

    def t(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)


def _flatten(items, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Coded deltas and their classes in symbol order, all substreams concatenated; symbols per substream."""
    ds = [torch.as_tensor(d) for d, _ in items]
    cs = [torch.as_tensor(c) for _, c in items]
    for d, c in zip(ds, cs):
        if d.dim() != 2 or c.shape != d.shape[:1]:
            raise ValueError(f"deltas {tuple(d.shape)} and classes {tuple(c.shape)} do not match")
    if ds and len({tuple(d.shape) for d in ds}) == 1 and len({t.device for t in ds + cs}) == 1:
        deltas = torch.stack(ds).to(device=device, dtype=torch.int64)  # one shape: a handful of operations
        classes = torch.stack(cs).to(device=device, dtype=torch.int64)
        coded = classes != 0
        tokens = deltas.shape[2]
        return deltas[coded].reshape(-1), classes[coded].repeat_interleave(tokens), (coded.sum(1) * tokens).tolist()
    rows, classes = [torch.zeros(0, dtype=torch.int64, device=device)], [torch.zeros(0, dtype=torch.int64, device=device)]
    for d, c in zip(ds, cs):
        d, c = d.to(device=device, dtype=torch.int64), c.to(device=device, dtype=torch.int64)
        rows.append(d[c != 0].reshape(-1))
        classes.append(c[c != 0].repeat_interleave(d.shape[1]))
    return torch.cat(rows), torch.cat(classes), [len(r) for r in rows[1:]]


def _segment_sums(flags: torch.Tensor, starts: torch.Tensor) -> list[int]:
    """How many ``flags`` are set in each segment ``[starts[b], starts[b + 1])``."""
    cs = torch.cat([torch.zeros(1, dtype=torch.int64, device=flags.device), torch.cumsum(flags.long(), 0)])
    return (cs[starts[1:]] - cs[starts[:-1]]).tolist()


def _run_triton(batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Part 2 as one Triton launch; returns (word per symbol or -1, final states ``[B, LANES]``)."""
    from kvcodec.codec import rans_triton

    rans_triton.check_usable(batch.device)
    from kvcodec.codec.rans_triton_kernel import rans_encode_kernel

    _, freq, cum, _ = device_tables(batch.device, torch.int32)
    b = len(batch.counts)
    words = torch.empty(max(1, sum(batch.counts)), dtype=torch.int32, device=batch.device)
    states = torch.empty((b, rans.LANES), dtype=torch.int64, device=batch.device)
    rans_encode_kernel[(b,)](
        batch.fidx.to(torch.int32), batch.sym_off, batch.t(batch.counts), batch.t(batch.lanes), freq, cum,
        words, states, PROB_BITS=rans.PROB_BITS, LANES=rans.LANES, num_warps=rans_triton.NUM_WARPS,
    )
    return words, states


def _run_torch(batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Part 2 as a lock-step torch loop over the steps (lanes ``[B, LANES]`` as a tensor)."""
    dev = batch.device
    _, freq, cum, _ = device_tables(dev)
    n, nl = batch.t(batch.counts)[:, None], batch.t(batch.lanes)[:, None]
    lane = torch.arange(rans.LANES, device=dev)[None, :]
    off = batch.sym_off[:-1, None]
    x = torch.full((len(batch.counts), rans.LANES), rans.STATE_LOW, dtype=torch.int64, device=dev)
    words = torch.full((max(1, sum(batch.counts)),), -1, dtype=torch.int64, device=dev)
    steps = max([-(-c // nl_) for c, nl_ in zip(batch.counts, batch.lanes) if c] or [0])
    for k in range(steps - 1, -1, -1):
        i = k * nl + lane
        active = (lane < nl) & (i < n)
        at = torch.where(active, off + i, 0)
        fi = batch.fidx[at] if len(batch.fidx) else torch.zeros_like(at)
        f, c = torch.where(active, freq[fi], 1), cum[fi]
        emit = active & (x >= (f << 18))
        words[at[active]] = torch.where(emit, x & 0xFFFF, -1)[active]
        x = torch.where(emit, x >> 16, x)
        q = torch.div(x, f, rounding_mode="floor")
        x = torch.where(active, (q << rans.PROB_BITS) + (x - q * f) + c, x)
    return words, x


def _place(batch: _Batch, words: torch.Tensor, states: torch.Tensor) -> list[np.ndarray]:
    """Part 3: every substream's words (states first, then emitted words in symbol order)."""
    dev = batch.device
    total = sum(batch.counts)
    words = words[:total].long()
    emit = words >= 0
    lanes = batch.t(batch.lanes)
    before = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(emit.long(), 0)])
    emitted = before[batch.sym_off]  # emitting symbols before each substream (and the total)
    lane_sum = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(2 * lanes, 0)])
    starts = lane_sum + emitted  # where each substream's words begin (last entry: the end)
    out = torch.zeros(int(starts[-1]), dtype=torch.int64, device=dev)
    item = torch.repeat_interleave(torch.arange(len(lanes), device=dev), torch.diff(batch.sym_off))
    out[(lane_sum[1:][item] + before[:-1])[emit]] = words[emit]
    lane = torch.arange(rans.LANES, device=dev)[None, :]
    mask = lane < lanes[:, None]
    at = (starts[:-1, None] + 2 * lane)[mask]
    out[at], out[at + 1] = (states & 0xFFFF)[mask], (states >> 16)[mask]
    host = out.to(torch.int16).cpu().numpy().view(np.uint16)  # words < 2**16: the low 16 bits, half the copy
    bounds = starts.tolist()
    return [host[bounds[b] : bounds[b + 1]] for b in range(len(lanes))]


def encode_deltas_batch(
    items: Sequence[tuple[object, object]], device=None, backend: str = "triton"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Entropy-code many substreams at once; each result equals :func:`rans.encode_deltas`'s.

    Args:
        items: ``(deltas int32 [channels, tokens], classes uint8 [channels])`` per
            substream, numpy arrays or tensors (channels of class 0 are not coded).
        device: where to code (a CUDA device; the CPU for ``torch``, or for
            ``triton`` under ``TRITON_INTERPRET=1``). Default: the CPU.
        backend: ``triton`` (one launch for the batch) or ``torch`` (a loop over steps).

    Returns:
        ``(words, escapes)`` uint16 arrays per substream, on the host.

    Raises:
        ValueError: an escaped magnitude does not fit 16 bits, or a class is unknown.
        InvalidInput: an unknown backend, or triton cannot run on ``device``.

    Example::

        [(words, escapes)] = encode_deltas_batch([(deltas, classes)], device="cuda")
    """
    device = torch.device(device or "cpu")
    if backend not in ("torch", "triton"):
        raise InvalidInput(f"backend: {backend!r} is not a device encoder (torch, triton)")
    return encode_flat_batch(*_flatten(items, device), device, backend)


def encode_flat_batch(
    deltas: torch.Tensor, classes: torch.Tensor, counts: list[int], device=None, backend: str = "triton"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`encode_deltas_batch` on symbols already flattened on ``device``.

    Args:
        deltas: int64 ``[sum(counts)]``: every substream's coded deltas in symbol order
            (coded channels in order, each channel's tokens in order), substreams concatenated.
        classes: int64 ``[sum(counts)]``: each symbol's scale class (never 0).
        counts: symbols per substream (0 for a substream with nothing coded).
        device, backend: as :func:`encode_deltas_batch`.

    Returns:
        ``(words, escapes)`` uint16 arrays per substream, on the host.
    """
    if backend not in ("torch", "triton"):
        raise InvalidInput(f"backend: {backend!r} is not a device encoder (torch, triton)")
    batch = _Batch(deltas, classes, counts, torch.device(device or "cpu"))
    if not batch.counts:
        return []
    words, states = (_run_triton if backend == "triton" else _run_torch)(batch)
    placed = _place(batch, words, states)
    escapes = batch.escapes.to(torch.int32).cpu().numpy().astype(np.uint16)
    bounds = np.concatenate([[0], np.cumsum(batch.esc_counts)]).astype(np.int64)
    return [(w, escapes[bounds[b] : bounds[b + 1]]) for b, w in enumerate(placed)]


_POINTER_TYPES = {"fidx_buf": "*i32", "sym_off": "*i64", "n_syms": "*i64", "lanes_of": "*i64", "freq": "*i32",
                  "cum": "*i32", "word_out": "*i32", "state_out": "*i64"}


def compile_for(capability: int = 90) -> dict[str, object]:
    """Compile the encoder kernel for a CUDA target without a GPU (as :func:`rans_triton.compile_for`).

    Raises:
        InvalidInput: triton is missing, or it was imported in interpreter mode.
    """
    from kvcodec.codec import rans_triton

    if rans_triton._interpreting():
        raise InvalidInput("compile_for: triton runs in interpreter mode (TRITON_INTERPRET=1) in this process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvcodec.codec.rans_triton_kernel import rans_encode_kernel

    constexprs = {"PROB_BITS": rans.PROB_BITS, "LANES": rans.LANES}
    signature = {**_POINTER_TYPES, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=rans_encode_kernel, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={"num_warps": rans_triton.NUM_WARPS}).asm


@contextmanager
def entropy_encoder(backend: str, device=None) -> Iterator[None]:
    """Within the block, :func:`rans.encode_deltas` codes in this thread with ``backend``.

    ``numba`` changes nothing. Worker threads started inside the block keep the
    numba encoder (the choice is a context variable), so callers code serially.

    Raises:
        InvalidInput: an unknown backend, or triton cannot run on ``device``.
    """
    if backend not in BACKENDS:
        raise InvalidInput(f"backend: unknown encoder {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "numba":
        yield
        return
    device = torch.device(device or "cpu")
    if backend == "triton":
        from kvcodec.codec import rans_triton

        rans_triton.check_usable(device)
    token = rans.DEVICE_ENCODER.set(lambda d, c: encode_deltas_batch([(d, c)], device, backend)[0])
    try:
        yield
    finally:
        rans.DEVICE_ENCODER.reset(token)


__all__ = ["BACKENDS", "compile_for", "encode_deltas_batch", "encode_flat_batch", "entropy_encoder"]
