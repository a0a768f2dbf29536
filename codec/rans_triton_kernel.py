"""The Triton kernel of :mod:`kvcodec.codec.rans_triton` (imports triton: load it lazily).

One program decodes one coder-3 substream; see :mod:`kvcodec.codec.rans_triton`
for the design and FORMAT.md ("Mode 1, coder 3") for the word order it follows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _u16(buf, pos, mask):
    """u16 values at ``pos`` of the word buffer (int16 or int32 storage), 0 where masked."""
    return tl.load(buf + pos, mask=mask, other=0).to(tl.int64) & 0xFFFF


@triton.jit
def _rans_step(x, cls, active, ptr, end, buf, slot_info, lane, PROB_BITS: tl.constexpr):
    """One lock-step step of every lane: (new states, symbols, new word position, overrun flag).

    ``slot_info[cls, slot]`` packs the slot's symbol (bits 0-11), its frequency (12-26) and
    ``slot - cum`` (27-40): one table read per symbol instead of three dependent ones. The
    next ``LANES`` words are read at the start of the step, alongside the table read, and each
    lane that needs one takes its own from them: the two memory reads overlap instead of
    following each other.
    """
    window = _u16(buf, ptr + lane, ptr + lane < end)
    slot = x & ((1 << PROB_BITS) - 1)
    info = tl.load(slot_info + cls * (1 << PROB_BITS) + slot, mask=active, other=1 << 12)
    s = info & 0xFFF
    nx = ((info >> 12) & 0x7FFF) * (x >> PROB_BITS) + (info >> 27)
    # lanes that need a word take them in lane order: word ptr + exclusive prefix sum
    need = active & (nx < 65536)
    need_i = need.to(tl.int32)
    rel = tl.cumsum(need_i, axis=0) - need_i  # < LANES
    w = tl.gather(window, rel, axis=0)
    overrun = tl.max((need & (ptr + rel >= end)).to(tl.int64), axis=0)
    nx = tl.where(need, (nx << 16) | w, nx)
    return tl.where(active, nx, x), s, ptr + tl.sum(need_i, axis=0), overrun


@triton.jit
def _deltas(s, cls, active, ei, esc_e, buf, e_off, e_cnt):
    """Symbols -> deltas; escaped symbols take escape-list entries in symbol order. Returns (deltas, escapes seen)."""
    e = tl.load(esc_e + cls, mask=active, other=0).to(tl.int64)
    d = s - e
    is_esc = active & (d > e)
    esc_i = is_esc.to(tl.int64)
    gi = ei + tl.cumsum(esc_i, axis=0) - esc_i
    m = _u16(buf, e_off + gi, is_esc & (gi < e_cnt)) + e + 1
    d = tl.where(is_esc, tl.where(d == e + 2, m, -m), d)
    return d, ei + tl.sum(esc_i, axis=0)


@triton.jit
def rans_decode_kernel(
    buf, word_begin, word_end, n_syms, lanes_of, tokens_of, cls_buf, row_buf, cls_off,
    esc_begin, esc_count, slot_info, esc_e, out, out_off, status,
    PROB_BITS: tl.constexpr, LANES: tl.constexpr, STATE_LOW: tl.constexpr,
    STATUS: tl.constexpr,
):
    """Program ``b`` decodes substream ``b``; writes its deltas and ``status[b] = (ptr, overrun, escapes, bad states,
    too few words for the lane states)``.

    ``buf`` holds the u16 words and escapes (``word_begin[b]..word_end[b]``: the lane
    states, then the renormalisation words; ``esc_begin[b]``: ``esc_count[b]`` escapes).
    Coded row ``r`` of the substream has class ``cls_buf[cls_off[b] + r]`` and is channel
    ``row_buf[cls_off[b] + r]``; its deltas go to ``out[out_off[b] + channel * tokens + t]``.
    """
    b = tl.program_id(0)
    lane = tl.arange(0, LANES)
    n = tl.load(n_syms + b)
    nl = tl.load(lanes_of + b)
    tokens = tl.load(tokens_of + b)
    c_off = tl.load(cls_off + b)
    o_off = tl.load(out_off + b)
    e_off = tl.load(esc_begin + b)
    e_cnt = tl.load(esc_count + b)
    end = tl.load(word_end + b)
    start = tl.load(word_begin + b)
    has = (lane < nl) & (start + 2 * lane + 1 < end)
    x0 = _u16(buf, start + 2 * lane, has) | (_u16(buf, start + 2 * lane + 1, has) << 16)
    x = tl.where(lane < nl, x0, STATE_LOW)
    ptr = start + 2 * nl
    overrun = tl.zeros((), dtype=tl.int64)
    ei = tl.zeros((), dtype=tl.int64)
    steps = (n + nl - 1) // tl.maximum(nl, 1)
    for k in range(steps):
        i = k * nl + lane  # symbol i of the substream is on lane i % nl
        active = (lane < nl) & (i < n)
        r = i // tokens
        cls = tl.load(cls_buf + c_off + r, mask=active, other=1).to(tl.int64)
        row = tl.load(row_buf + c_off + r, mask=active, other=0).to(tl.int64)
        x, s, ptr, over = _rans_step(x, cls, active, ptr, end, buf, slot_info, lane, PROB_BITS)
        overrun = overrun | over
        d, ei = _deltas(s, cls, active, ei, esc_e, buf, e_off, e_cnt)
        tl.store(out + o_off + row * tokens + (i - r * tokens), d.to(tl.int32), mask=active)
    bad_states = tl.max(((lane < nl) & (x != STATE_LOW)).to(tl.int64), axis=0)
    tl.store(status + b * STATUS + 0, ptr)
    tl.store(status + b * STATUS + 1, overrun)
    tl.store(status + b * STATUS + 2, ei)
    tl.store(status + b * STATUS + 3, bad_states)
    tl.store(status + b * STATUS + 4, (end - start < 2 * nl).to(tl.int64))


@triton.jit
def rans_encode_kernel(
    fidx_buf, sym_off, n_syms, lanes_of, freq, cum, word_out, state_out,
    PROB_BITS: tl.constexpr, LANES: tl.constexpr,
):
    """Program ``b`` encodes substream ``b`` (see :mod:`kvcodec.codec.rans_encode`).

    Walks the steps backwards; ``word_out[i]`` gets the u16 that coding symbol
    ``i`` emitted, or -1; ``state_out[b, lane]`` the lanes' final states.
    ``fidx_buf[i]`` is ``class * ALPHABET + symbol`` (its row in ``freq``/``cum``).
    """
    b = tl.program_id(0)
    lane = tl.arange(0, LANES)
    n = tl.load(n_syms + b)
    nl = tl.load(lanes_of + b)
    off = tl.load(sym_off + b)
    x = tl.full((LANES,), 65536, dtype=tl.int64)
    steps = (n + nl - 1) // tl.maximum(nl, 1)
    for j in range(steps):
        i = (steps - 1 - j) * nl + lane  # symbol i is on lane i % nl; symbols are coded last to first
        active = (lane < nl) & (i < n)
        fi = tl.load(fidx_buf + off + i, mask=active, other=0)
        f = tl.load(freq + fi, mask=active, other=1).to(tl.int64)
        c = tl.load(cum + fi, mask=active, other=0).to(tl.int64)
        emit = active & (x >= (f << 18))  # x_max = ((2**16 >> PROB_BITS) << 16) * f
        tl.store(word_out + off + i, tl.where(emit, x & 0xFFFF, -1).to(tl.int32), mask=active)
        x = tl.where(emit, x >> 16, x)
        q = (x.to(tl.uint32) // f.to(tl.uint32)).to(tl.int64)  # x < 2**32 here: a 32-bit division
        x = tl.where(active, (q << PROB_BITS) + (x - q * f) + c, x)
    tl.store(state_out + b * LANES + lane, x)


@triton.jit
def dequant_kernel(
    deltas, centres, steps, out, n_layers, n_blocks, heads, tokens_q, tokens, start, lo, hi,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BF16: tl.constexpr,
):
    """Symbols of a run of blocks -> values in the model's layout (streams without a transform).

    Program ``(p, j)``: head ``h`` of substream ``s = p // heads`` (``[layer, kind, block]``
    order), tokens ``j * BLOCK_T ..``. ``deltas`` int32 ``[S, C, tokens_q]``, ``centres`` int32
    ``[S, C]``, ``steps`` float32 ``[S, heads]``; ``out`` ``[2, n_layers, heads, tokens, DIM]``
    gets ``clamp(float32(delta + centre) * step, lo, hi)`` at token ``start + block * tokens_q + t``:
    the operations of :func:`kvcodec.codec.quantize.dequantize_block`, in one pass. With ``BF16``
    ``out`` is the int16 view of a bfloat16 tensor and the value is rounded to nearest-even here,
    as torch rounds (the interpreter's own float32 -> bfloat16 cast truncates).
    """
    p = tl.program_id(0)
    j = tl.program_id(1)
    h = p % heads
    s = p // heads
    block = s % n_blocks
    kind = (s // n_blocks) % 2
    layer = s // (2 * n_blocks)
    dd = tl.arange(0, BLOCK_D)
    tt = j * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (dd[:, None] < DIM) & (tt[None, :] < tokens_q)
    channel = (s * heads + h) * DIM + dd  # row of [S * C, tokens_q]
    d = tl.load(deltas + channel[:, None].to(tl.int64) * tokens_q + tt[None, :], mask=mask, other=0)
    c = tl.load(centres + channel, mask=dd < DIM, other=0)
    step = tl.load(steps + s * heads + h)
    x = (d + c[:, None]).to(tl.float32) * step
    x = tl.minimum(tl.maximum(x, lo), hi)
    row = ((kind * n_layers + layer) * heads + h).to(tl.int64) * tokens + start + block * tokens_q
    at = out + (row + tt[None, :]) * DIM + dd[:, None]
    if BF16:  # finite after the clamp: the carry never reaches the sign bit
        bits = x.to(tl.int32, bitcast=True)
        tl.store(at, ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(at, x.to(out.dtype.element_ty), mask=mask)
