"""Coder 3 decoding in torch: many substreams' rANS lanes in lock step (CPU or CUDA).

The numba decoder (:mod:`kvcodec.codec.rans`) walks one substream symbol by
symbol. Here a batch of ``B`` substreams is decoded at once: their lanes form
a ``[B, 32]`` tensor of states and step ``k`` decodes symbol ``k * N_b + j``
of every lane ``j`` of substream ``b``. Renormalisation words are taken in
lane order within a step (an exclusive prefix sum of the lanes that need a
word gives each its word), exactly the order the sequential decoder reads
them, so both decoders return identical symbols. Tables are looked up with
``gather`` on flat tensors. Every word read is clamped into the buffer and
flagged when it falls outside its substream, so corrupt input raises
:class:`CorruptStream` and never reads out of bounds.

This is the GPU path's entropy stage; on a GPU it keeps ``B * 32`` lanes in
flight (a whole layer or stream per batch). On the CPU it is a correctness
reference (each step is a handful of small tensor operations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcodec.codec import rans
from kvcodec.codec.errors import CorruptStream

_TABLES: dict[tuple[str, torch.dtype], tuple[torch.Tensor, ...]] = {}


def device_tables(device: torch.device, dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, ...]:
    """Flat coder-3 tables on ``device`` (cached): slot2sym, freq, cum (row stride per class), esc.

    Shared by the torch decoder (int64) and the Triton kernel (int32).
    """
    key = (str(device), dtype)
    if key not in _TABLES:
        _TABLES[key] = tuple(
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64).reshape(-1)).to(device=device, dtype=dtype)
            for a in (rans.SLOT2SYM, rans.FREQ, rans.CUM, rans.ESC)
        )
    return _TABLES[key]


@dataclass
class Substream:
    """One coder-3 substream's entropy-coded part.

    Attributes:
        words: uint16 rANS words (lane states first); escapes: uint16 escape list;
        classes: uint8 ``[channels]``; tokens: quantized tokens per channel.
    """

    words: np.ndarray
    escapes: np.ndarray
    classes: np.ndarray
    tokens: int


def _lanes(n: int) -> int:
    return min(rans.LANES, max(1, n // rans.LANE_SYMBOLS))


def _symbol_classes(subs: list[Substream], steps: int, device) -> torch.Tensor:
    """Class of every symbol slot ``[B, steps, LANES]`` (0 where a lane has no symbol)."""
    out = np.zeros((len(subs), steps * rans.LANES), dtype=np.int64)
    for b, s in enumerate(subs):
        coded = s.classes[s.classes != 0].astype(np.int64)
        per_symbol = np.repeat(coded, s.tokens)
        n = len(per_symbol)
        if n == 0:
            continue
        lanes = _lanes(n)
        idx = np.arange(n)
        out[b, (idx // lanes) * rans.LANES + idx % lanes] = per_symbol
    return torch.from_numpy(out.reshape(len(subs), steps, rans.LANES)).to(device)


def decode_symbols(subs: list[Substream], device=None) -> list[torch.Tensor]:
    """Decode a batch of substreams to their deltas.

    Args:
        subs: the substreams (classes already checked with :func:`rans.check_classes`).
        device: where to decode (CPU or CUDA).

    Returns:
        int32 ``[channels, tokens]`` deltas per substream, on ``device``.

    Raises:
        CorruptStream: a substream's words or escapes do not decode exactly
            (the message names the batch index).
    """
    device = torch.device(device or "cpu")
    counts = [int((s.classes != 0).sum()) * s.tokens for s in subs]
    lanes = torch.tensor([_lanes(n) if n else 0 for n in counts], device=device)
    steps = max([-(-n // _lanes(n)) for n in counts if n] or [0])
    syms = _run_lanes(subs, counts, lanes, steps, device) if steps else None
    return _to_deltas(subs, counts, syms, device)


def _word_buffer(subs: list[Substream], counts: list[int], device):
    """Concatenate every substream's words; returns (buffer, start of renorm words, end, init states)."""
    init = np.full((len(subs), rans.LANES), rans.STATE_LOW, dtype=np.int64)
    chunks, starts, ends, pos = [], [], [], 0
    for b, (s, n) in enumerate(zip(subs, counts)):
        w = s.words.astype(np.int64)
        lanes = _lanes(n) if n else 0
        if len(w) < 2 * lanes:
            raise CorruptStream(f"batch item {b}: entropy payload: {rans._ERRORS[6]}")
        init[b, :lanes] = w[0 : 2 * lanes : 2] | (w[1 : 2 * lanes : 2] << 16)
        chunks.append(w)
        starts.append(pos + 2 * lanes)
        pos += len(w)
        ends.append(pos)
    buf = torch.from_numpy(np.concatenate(chunks + [np.zeros(1, dtype=np.int64)])).to(device)
    t = lambda a: torch.tensor(a, dtype=torch.int64, device=device)  # noqa: E731
    return buf, t(starts), t(ends), torch.from_numpy(init).to(device)


def _run_lanes(subs, counts, lanes, steps: int, device) -> torch.Tensor:
    """The lock-step rANS loop; returns symbols ``[B, steps, LANES]``."""
    slot2sym, freq, cum, _ = device_tables(device)
    buf, ptr, end, x = _word_buffer(subs, counts, device)
    cls = _symbol_classes(subs, steps, device)
    base_m = cls * rans.PROB_SCALE
    base_a = cls * rans.FREQ.shape[1]
    lane_ids = torch.arange(rans.LANES, device=device)
    n_t = torch.tensor(counts, device=device)
    out = torch.zeros((len(subs), steps, rans.LANES), dtype=torch.int64, device=device)
    bad = torch.zeros(len(subs), dtype=torch.bool, device=device)
    last = buf.numel() - 1
    for k in range(steps):
        active = (lane_ids[None, :] < lanes[:, None]) & (k * lanes[:, None] + lane_ids[None, :] < n_t[:, None])
        slot = x & (rans.PROB_SCALE - 1)
        s = slot2sym[base_m[:, k] + slot]
        fi = base_a[:, k] + s
        nx = freq[fi] * (x >> rans.PROB_BITS) + slot - cum[fi]
        need = active & (nx < rans.STATE_LOW)
        pos = ptr[:, None] + torch.cumsum(need, dim=1) - need.long()
        bad |= (need & (pos >= end[:, None])).any(dim=1)
        w = buf[pos.clamp(max=last)]
        nx = torch.where(need, (nx << 16) | w, nx)
        x = torch.where(active, nx, x)
        ptr = ptr + need.sum(dim=1)
        out[:, k] = s
    bad |= ptr != end
    bad |= ((x != rans.STATE_LOW) & (lane_ids[None, :] < lanes[:, None])).any(dim=1)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise CorruptStream(f"batch item {b}: entropy payload: rANS words do not decode to exactly its symbols")
    return out


def _to_deltas(subs, counts, syms, device) -> list[torch.Tensor]:
    """Symbols -> deltas (escapes resolved in symbol order) scattered into ``[channels, tokens]``."""
    _, _, _, esc = device_tables(device)
    result = []
    for b, (s, n) in enumerate(zip(subs, counts)):
        out = torch.zeros((len(s.classes), s.tokens), dtype=torch.int32, device=device)
        if n == 0:
            if len(s.words) or len(s.escapes):
                raise CorruptStream(f"batch item {b}: entropy payload: {rans._ERRORS[2]}")
            result.append(out)
            continue
        lanes = _lanes(n)
        idx = torch.arange(n, device=device)
        sym = syms[b].reshape(-1)[(idx // lanes) * rans.LANES + idx % lanes]
        coded = torch.from_numpy(np.nonzero(s.classes)[0]).to(device)
        e = esc[torch.from_numpy(s.classes[s.classes != 0].astype(np.int64)).to(device)]
        e = e.repeat_interleave(s.tokens)
        d = sym - e
        is_esc = d > e
        n_esc = int(is_esc.sum())
        if n_esc != len(s.escapes):
            raise CorruptStream(f"batch item {b}: entropy payload: {n_esc} escapes decoded, {len(s.escapes)} stored")
        if n_esc:
            mags = torch.from_numpy(s.escapes.astype(np.int64)).to(device) + e[is_esc] + 1
            d[is_esc] = torch.where(d[is_esc] == e[is_esc] + 2, mags, -mags)
        out[coded] = d.to(torch.int32).reshape(len(coded), s.tokens)
        result.append(out)
    return result


__all__ = ["Substream", "decode_symbols"]
