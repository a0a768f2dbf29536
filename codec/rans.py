"""Stage 2 (coder 3): interleaved rANS with global static models.

FORMAT.md ("Mode 1, coder 3") is normative. Summary:

* **Models.** One table per scale class (the classes of coder 2, see
  :mod:`kvcodec.codec.entropy`), independent of the data. Class ``c`` codes
  the alphabet ``delta in [-E_c, E_c]`` plus two escape symbols ``ESC-`` and
  ``ESC+`` for ``delta < -E_c`` and ``delta > E_c``; an escaped delta's
  magnitude ``|delta| - E_c - 1`` is stored as a u16 in the substream's
  escape list. Frequencies are quantized to ``2**PROB_BITS`` with integer
  arithmetic only (built from the ``RHO_Q20`` recurrence), so every machine
  builds the same tables.
* **Coder.** rANS with 32-bit states in ``[2**16, 2**32)``, 16-bit
  renormalisation (at most one u16 word per symbol), ``N = min(32, max(1, n // 64))``
  lanes for a substream of ``n`` symbols:
  symbol ``i`` of the substream goes to lane ``i % N``. The words are stored
  as little-endian u16: first every lane's initial state (low, high), then
  the renormalisation words in the order the decoder reads them.

The encoder and decoder are numba functions compiled with ``nogil=True`` so
substreams code in parallel on Python threads; ``rans_torch`` decodes the same
words with torch (CPU or CUDA) to identical symbols. The CPU decoder (``_decode``, driven
by ``kvcodec.codec.substream._decode_direct``) dequantizes as it decodes and writes the
caller's output dtype itself, or hands a transform its symbols token-major.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import numpy as np
import torch
from numba import njit

from kvcodec.codec.entropy import NUM_CLASSES, RHO_Q20
from kvcodec.codec.errors import CorruptStream

PROB_BITS = 14
PROB_SCALE = 1 << PROB_BITS
LANES = 32
LANE_SYMBOLS = 64  # a substream of n symbols uses min(LANES, max(1, n // LANE_SYMBOLS)) lanes
STATE_LOW = 1 << 16  # states live in [STATE_LOW, 2**32)
E_MAX = 1023  # largest escape threshold of any class
ESCAPE_SLOTS = 2  # a class's alphabet stops where the tail per side weighs <= 2 slots
MAX_ESCAPE_MAGNITUDE = 0xFFFF

# set by kvcodec.codec.rans_encode.entropy_encoder: encode_deltas codes on a device instead (this thread)
DEVICE_ENCODER: ContextVar[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None] = ContextVar(
    "kvcodec_rans_device_encoder", default=None
)

# numba status codes -> messages
_ERRORS = {
    1: "rANS words run out before the last symbol",
    2: "rANS words left over after the last symbol",
    3: "a lane does not end in the initial state",
    4: "escape list shorter than the escapes decoded",
    5: "escape list longer than the escapes decoded",
    6: "fewer words than the lanes' initial states",
}


def _half_weights(rho: int, count: int) -> list[int]:
    """``f[0..count-1]`` of the RHO_Q20 recurrence (as coder 2)."""
    f = [1 << 22]
    while len(f) < count:
        f.append(max(1, (f[-1] * rho) >> 20))
    return f


def _class_table(cls: int) -> tuple[int, list[int]]:
    """Escape threshold ``E`` and the quantized frequencies of class ``cls``.

    Symbol order: ``delta + E`` for ``delta in [-E, E]``, then ``ESC-`` (``2E+1``)
    and ``ESC+`` (``2E+2``). Integer arithmetic only.
    """
    rho = RHO_Q20[cls - 1]
    denom = (1 << 20) - rho
    f = _half_weights(rho, E_MAX + 2)

    def tail(k: int) -> int:  # mass beyond k on one side: f[k+1] / (1 - rho)
        return max(1, (f[k + 1] << 20) // denom)

    whole = f[0] + 2 * tail(0)
    e = E_MAX
    for k in range(E_MAX + 1):
        # stop where the tail weighs <= ESCAPE_SLOTS slots or the next symbol < 1/2 slot
        if tail(k) * PROB_SCALE <= ESCAPE_SLOTS * whole or 2 * f[k + 1] * PROB_SCALE < whole:
            e = k
            break
    weights = [f[abs(j - e)] for j in range(2 * e + 1)] + [tail(e), tail(e)]
    total = sum(weights)
    lo, hi = 0, PROB_SCALE  # largest scale s with sum(max(1, w * s // total)) <= PROB_SCALE
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(max(1, (w * mid) // total) for w in weights) <= PROB_SCALE:
            lo = mid
        else:
            hi = mid - 1
    freqs = [max(1, (w * lo) // total) for w in weights]
    freqs[e] += PROB_SCALE - sum(freqs)
    return e, freqs


def build_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build every class's model.

    Returns:
        ``(esc, freq, cum, slot2sym)``: ``esc`` int32 ``[NUM_CLASSES + 1]`` (E per
        class), ``freq`` / ``cum`` uint32 ``[NUM_CLASSES + 1, 2 * E_MAX + 3]``,
        ``slot2sym`` uint16 ``[NUM_CLASSES + 1, PROB_SCALE]``. Row 0 (class 0,
        nothing coded) is unused.
    """
    alphabet = 2 * E_MAX + 3
    esc = np.zeros(NUM_CLASSES + 1, dtype=np.int32)
    freq = np.zeros((NUM_CLASSES + 1, alphabet), dtype=np.uint32)
    cum = np.zeros((NUM_CLASSES + 1, alphabet), dtype=np.uint32)
    slot2sym = np.zeros((NUM_CLASSES + 1, PROB_SCALE), dtype=np.uint16)
    for cls in range(1, NUM_CLASSES + 1):
        e, f = _class_table(cls)
        n = len(f)
        esc[cls] = e
        freq[cls, :n] = f
        cum[cls, 1:n] = np.cumsum(f[:-1])
        slot2sym[cls] = np.repeat(np.arange(n, dtype=np.uint16), f)
    return esc, freq, cum, slot2sym


ESC, FREQ, CUM, SLOT2SYM = build_tables()
with np.errstate(divide="ignore"):
    _INV = np.where(FREQ > 0, 1.0 / np.maximum(FREQ, 1), 0.0)  # encoder: x // f by multiplication


def model_bits(cls: int) -> np.ndarray:
    """Code length (bits) of each symbol of class ``cls`` (escape payload excluded)."""
    e = int(ESC[cls])
    f = FREQ[cls, : 2 * e + 3].astype(np.float64)
    return PROB_BITS - np.log2(f)


@njit(nogil=True, cache=True)
def _encode(deltas, classes, esc, freq, cum, inv):
    """Encode a substream's deltas; returns (u16 words, u16 escapes, status 7 if an escape overflows).

    Symbols are visited backwards (channel, then token, descending), so the
    words come out in reverse reading order and escapes fill their list from the end.
    As in :func:`_decode`, lanes are walked in runs (no wrap test per symbol), indices are
    unsigned and the renormalisation is branchless: 1.74 -> 1.16 ms per 8 x 255 x 128
    substream, the same bytes.
    """
    channels, tokens = deltas.shape
    coded = 0
    for c in range(channels):
        if classes[c] != 0:
            coded += 1
    n = coded * tokens
    escapes = np.empty(n, dtype=np.uint16)
    if n == 0:
        return np.empty(0, dtype=np.uint16), escapes[:0], 0
    lanes = min(LANES, max(1, n // LANE_SYMBOLS))
    state = np.full(lanes, STATE_LOW, dtype=np.uint64)
    out = np.empty(n + 2 * lanes, dtype=np.uint16)
    top = np.uint64(n + 2 * lanes)  # words are written backwards from the end
    etop = n
    lane = (n - 1) % lanes  # symbol i goes to lane i % lanes; walk i downwards
    for c in range(channels - 1, -1, -1):
        k = classes[c]
        if k == 0:
            continue
        e = np.int64(esc[k])
        fr, cu, iv = freq[k], cum[k], inv[k]
        row = deltas[c]
        t = tokens  # symbols of this channel still to code
        while t > 0:
            run = min(lane + 1, t)  # symbols before the lane index wraps
            for r in range(run):
                j = np.uint64(lane - r)
                d = np.int64(row[np.uint64(t - 1 - r)])
                if d > e or d < -e:
                    m = (d if d > 0 else -d) - e - 1
                    if m > MAX_ESCAPE_MAGNITUDE:
                        return out[:0], escapes[:0], 7
                    etop -= 1
                    escapes[etop] = m
                    s = np.uint64(2 * e + 2 if d > 0 else 2 * e + 1)
                else:
                    s = np.uint64(d + e)
                f = np.uint64(fr[s])
                x = state[j]
                # x_max = ((L >> PROB_BITS) << 16) * f; the word is stored either way and kept
                # only if needed (a slot below top is always rewritten before the end)
                need = np.uint64(x >= (f << np.uint64(18)))
                out[top - np.uint64(1)] = x & np.uint64(0xFFFF)
                top -= need
                x >>= need << np.uint64(4)
                # x // f through a double reciprocal (x < 2**32 is exact), corrected to the exact quotient
                q = np.uint64(np.float64(x) * iv[s])
                rem = np.int64(x) - np.int64(q * f)
                if rem < 0:
                    q -= np.uint64(1)
                    rem += np.int64(f)
                elif rem >= np.int64(f):
                    q += np.uint64(1)
                    rem -= np.int64(f)
                state[j] = (q << np.uint64(PROB_BITS)) + np.uint64(rem) + np.uint64(cu[s])
            t -= run
            lane -= run
            if lane < 0:
                lane = lanes - 1
    for j in range(lanes - 1, -1, -1):
        top -= np.uint64(2)
        out[top] = state[j] & np.uint64(0xFFFF)
        out[top + np.uint64(1)] = state[j] >> np.uint64(16)
    return out[top:].copy(), escapes[etop:].copy(), 0


# output kinds of the decoder: what each dequantized float32 value is stored as
OUT_FLOAT32, OUT_FLOAT16, OUT_BFLOAT16 = 0, 1, 2


@njit(inline="always")
def to_bits(first, stop, kind, values, values_bits, scratch, scratch_bits, table):
    """``table[first:stop]`` = the bits of float32 ``values[first:stop]`` as the output stores them:
    float32 bits, or float16 / bfloat16 bits rounded to nearest even as torch converts
    (values finite and within the output dtype's range, which the decoder's clamp guarantees).

    Branch-free, so the loops vectorise (numba has no CPU float16): a normal half re-biases
    the exponent and rounds the mantissa by integer arithmetic; a subnormal half is what the
    FPU's own rounding gives when ``|x| + 0.5`` drops the bits below 2**-24 (0.5's exponent
    puts 2**-24 at its last mantissa bit), minus 0.5's bits. ``*_bits`` are uint32 views of
    the float32 arrays ``values`` and ``scratch``."""
    if kind == OUT_FLOAT32:
        for i in range(first, stop):
            table[i] = values_bits[i]
    elif kind == OUT_BFLOAT16:
        for i in range(first, stop):
            b = values_bits[i]
            table[i] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    else:
        for i in range(first, stop):
            scratch[i] = abs(values[i]) + np.float32(0.5)
        for i in range(first, stop):
            b = values_bits[i]
            a = b & np.uint32(0x7FFFFFFF)
            normal = (a - np.uint32(0x38000000) + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
            subnormal = scratch_bits[i] - np.uint32(0x3F000000)
            half = normal if a >= np.uint32(0x38800000) else subnormal  # 0x38800000: 2**-14, the least normal half
            table[i] = ((b >> np.uint32(16)) & np.uint32(0x8000)) | half


@njit(nogil=True, cache=True)
def _decode(words, escapes, classes, esc, freq, cum, slot2sym, out, start, head_stride, token_stride, tokens,
            kind, centers, steps, lo, hi):
    """Decode a substream and dequantize each symbol into ``out``; returns its status (0: good).

    Symbol ``delta`` of channel ``c`` (head ``c // dim``, dim ``c % dim``, ``dim = channels /
    len(steps)``) at token ``t`` becomes ``clamp((delta + centers[c]) * steps[head], lo, hi)``
    in float32 — the arithmetic of :func:`kvcodec.codec.quantize.dequantize_block` — stored as
    ``kind`` (:func:`_bits`) at ``out[start + head * head_stride + t * token_stride + dim]``:
    ``out`` is the flat uint32 (float32) or uint16 (float16, bfloat16) storage of any
    destination whose last axis is contiguous, e.g. a slice of the caller's output tensor.
    With unit steps and infinite bounds the values are the integers themselves, exact (below
    2**24): :func:`decode_deltas` and a transform's symbols (``substream._decode_direct``) use it so.

    Each channel's values are converted once per symbol value into a table (on average 45
    entries for 255 tokens on the 8B-shaped benchmark chunk), so the loop stores table entries
    and no float32 intermediate is written and copied. Escapes are rare: the loop only notes
    where they fall, and each channel's are written after it, which keeps the hot loop's
    registers free (13% faster than handling them inline). ``words`` must be followed by at
    least ``tokens`` padding words: a channel's symbols read at most one word each, so
    checking ``pos`` once per channel keeps every read in bounds. The lane index walks runs of
    consecutive lanes (no wrap test per symbol); unsigned indices spare numba's negative-index
    fix-ups (benchmarks/RESULTS.md, "Codec speed").
    """
    channels = classes.shape[0]
    dim = channels // steps.shape[0]
    nw = np.uint64(words.shape[0] - tokens)  # without the padding
    values = np.empty(2 * E_MAX + 3, dtype=np.float32)  # a channel's values, one per symbol, and an escape's
    scratch = np.empty_like(values)
    values_bits, scratch_bits = values.view(np.uint32), scratch.view(np.uint32)
    table = np.zeros(2 * E_MAX + 3, dtype=np.uint32)  # ... as the output stores them
    escaped_at = np.empty(tokens, dtype=np.uint64)  # a channel's escapes: where, and ESC- or ESC+
    escaped_sym = np.empty(tokens, dtype=np.uint64)
    n_escaped = np.uint64(0)
    coded = 0
    for c in range(channels):
        if classes[c] != 0:
            coded += 1
        else:  # an all-zero channel is its centre
            values[0] = min(max(np.float32(centers[c]) * steps[c // dim], lo), hi)
            to_bits(0, 1, kind, values, values_bits, scratch, scratch_bits, table)
            base = start + (c // dim) * head_stride + c % dim
            for t in range(tokens):
                out[base + t * token_stride] = table[0]
    n = coded * tokens
    if n == 0:
        return 2 if nw or escapes.shape[0] else 0
    lanes = np.uint64(min(LANES, max(1, n // LANE_SYMBOLS)))
    if nw < np.uint64(2) * lanes:
        return 6
    state = np.empty(lanes, dtype=np.uint64)
    for j in range(lanes):
        state[j] = np.uint64(words[2 * j]) | (np.uint64(words[2 * j + 1]) << np.uint64(16))
    pos = np.uint64(2) * lanes
    n_esc = escapes.shape[0]
    ei = 0
    lane = np.uint64(0)
    stride = np.uint64(token_stride)
    symbols = np.uint64(tokens)
    for c in range(channels):
        k = classes[c]
        if k == 0:
            continue
        if pos > nw:
            return 1
        e = np.int64(esc[k])
        wide = np.uint64(2 * e)  # symbols above are the escapes
        s2s, fr, cu = slot2sym[k], freq[k], cum[k]
        offset = np.int64(centers[c]) - e  # symbol s is delta s - e
        step = steps[c // dim]
        for s in range(2 * e + 1):
            values[s] = min(max(np.float32(s + offset) * step, lo), hi)
        to_bits(0, 2 * e + 1, kind, values, values_bits, scratch, scratch_bits, table)
        at = np.uint64(start + (c // dim) * head_stride + c % dim)
        t = np.uint64(0)
        while t < symbols:
            run = min(lanes - lane, symbols - t)  # symbols before the lane index wraps
            for j in range(lane, lane + run):
                x = state[j]
                slot = x & np.uint64(PROB_SCALE - 1)
                s = np.uint64(s2s[slot])
                x = np.uint64(fr[s]) * (x >> np.uint64(PROB_BITS)) + slot - np.uint64(cu[s])
                # branchless renormalisation: at most one u16 word per symbol
                need = np.uint64(x < np.uint64(STATE_LOW))
                x = (x << (need << np.uint64(4))) | (np.uint64(words[pos]) & (np.uint64(0) - need))
                pos += need
                state[j] = x
                out[at] = table[s]  # an escape's entry is a placeholder, rewritten below
                if s > wide:
                    escaped_at[n_escaped] = at
                    escaped_sym[n_escaped] = s
                    n_escaped += np.uint64(1)
                at += stride
            t += run
            lane += run
            if lane == lanes:
                lane = np.uint64(0)
        for i in range(n_escaped):  # escapes in symbol order, as the list stores their magnitudes
            if ei >= n_esc:
                return 4
            m = np.int64(escapes[ei]) + e + 1
            ei += 1
            q = (m if escaped_sym[i] == wide + np.uint64(2) else -m) + offset + e
            values[wide + 1] = min(max(np.float32(q) * step, lo), hi)  # the slot after the table
            to_bits(wide + 1, wide + 2, kind, values, values_bits, scratch, scratch_bits, table)
            out[escaped_at[i]] = table[wide + 1]
        n_escaped = np.uint64(0)
    if pos > nw:
        return 1
    if pos < nw:
        return 2
    if ei != n_esc:
        return 5
    for j in range(lanes):
        if state[j] != np.uint64(STATE_LOW):
            return 3
    return 0


@njit(nogil=True, cache=True)
def _channel_deltas(q):
    """Integer half of ``quantize_block`` for ``q`` int32 ``[H, T, D]`` (see :func:`channel_deltas`)."""
    heads, tokens, dim = q.shape
    channels = heads * dim
    sums = np.zeros(channels, dtype=np.int64)
    for h in range(heads):
        for t in range(tokens):
            for d in range(dim):
                sums[h * dim + d] += q[h, t, d]
    centers = np.empty(channels, dtype=np.int32)
    for c in range(channels):
        centers[c] = (2 * sums[c] + tokens) // (2 * tokens)  # round half up, floor division
    deltas = np.empty((channels, tokens), dtype=np.int32)
    kmax = np.zeros(channels, dtype=np.int32)
    abs_sums = np.zeros(channels, dtype=np.int64)
    for h in range(heads):
        for t in range(tokens):
            for d in range(dim):
                c = h * dim + d
                v = q[h, t, d] - centers[c]
                deltas[c, t] = v
                a = v if v >= 0 else -v
                abs_sums[c] += a
                if a > kmax[c]:
                    kmax[c] = a
    return centers, deltas, kmax, abs_sums


def channel_deltas(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Channel centres, deltas, largest and summed ``|delta|`` of quantized symbols.

    The same integers as :func:`kvcodec.codec.quantize.quantize_block` computes in
    torch (tests check it), in one pass without the GIL.

    Args:
        q: int32 ``[heads, tokens, head_dim]`` symbols ``round(x / step)``.

    Returns:
        ``(centers int32 [C], deltas int32 [C, T], kmax int32 [C], abs_sums int64 [C])``.
    """
    return _channel_deltas(np.ascontiguousarray(q, dtype=np.int32))


def encode_deltas(deltas: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entropy-code ``deltas`` (int32 ``[channels, tokens]``) with coder 3.

    Args:
        deltas: symbols minus centre, channel-major; channels of class 0 must be all zero.
        classes: uint8 ``[channels]`` scale classes (0 = nothing coded).

    Returns:
        ``(words, escapes)``: uint16 arrays (rANS words incl. the lanes' initial states,
        escape magnitudes).

    Raises:
        ValueError: an escaped magnitude does not fit 16 bits.
    """
    device_encoder = DEVICE_ENCODER.get()
    if device_encoder is not None:  # the same bytes, coded by rans_encode on a device
        return device_encoder(deltas, classes)
    return encode_deltas_host(deltas, classes)


def encode_deltas_host(deltas: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_deltas` on the host (numba) whatever device encoder is active: for tiny
    inputs such as packed side information, where a device launch costs more than it saves."""
    words, escapes, status = _encode(
        np.ascontiguousarray(deltas, dtype=np.int32), np.ascontiguousarray(classes, dtype=np.uint8), ESC, FREQ, CUM, _INV
    )
    if status:
        raise ValueError(f"delta magnitude exceeds the escape range (E + 1 + {MAX_ESCAPE_MAGNITUDE})")
    return words, escapes


NEG_INF, POS_INF = np.float32(-np.inf), np.float32(np.inf)  # no clamp: the decoder's integer outputs


def decode_deltas(words: np.ndarray, escapes: np.ndarray, classes: np.ndarray, tokens: int) -> np.ndarray:
    """Inverse of :func:`encode_deltas`.

    Raises:
        CorruptStream: classes out of range, or the words do not decode to exactly
            the expected symbols (every read is bounds-checked).
    """
    check_classes(classes)
    channels = classes.shape[0]
    out = np.empty(channels * tokens, dtype=np.uint32)  # float32 [channels, tokens]: one "head" a channel
    _check(_decode(_padded(words, tokens), escapes, classes, ESC, FREQ, CUM, SLOT2SYM, out, 0, tokens, 1, tokens,
                   OUT_FLOAT32, np.zeros(channels, np.int32), np.ones(channels, np.float32), NEG_INF, POS_INF))
    return out.view(np.float32).reshape(channels, tokens).astype(np.int32)

_KINDS = {torch.float32: (OUT_FLOAT32, torch.int32, np.uint32), torch.float16: (OUT_FLOAT16, torch.int16, np.uint16),
          torch.bfloat16: (OUT_BFLOAT16, torch.int16, np.uint16)}


def output_bits(out: torch.Tensor) -> tuple[np.ndarray, int, np.float32, np.float32]:
    """What a numba kernel needs to write ``out`` (CPU, float32/float16/bfloat16): every element
    of its storage as uint32/uint16 bits (index with ``out.storage_offset()`` and its strides),
    the output kind for :func:`to_bits`, and the dtype's finite range to clamp to (a value just
    under the dtype's max must not round to Inf)."""
    kind, int_dtype, bits = _KINDS[out.dtype]
    finfo = torch.finfo(out.dtype)
    storage = torch.as_strided(out, (out.untyped_storage().nbytes() // out.element_size(),), (1,), 0)
    return storage.view(int_dtype).numpy().view(bits), kind, np.float32(finfo.min), np.float32(finfo.max)


def _padded(words: np.ndarray, tokens: int) -> np.ndarray:
    """``words`` and ``tokens`` zero words after them, as :func:`_decode` reads."""
    padded = np.zeros(len(words) + tokens, dtype=np.uint16)
    padded[: len(words)] = words
    return padded


def _check(status: int) -> None:
    if status:
        raise CorruptStream(f"entropy payload: {_ERRORS[status]}")


def check_classes(classes: np.ndarray) -> None:
    """Every class must be a known one (0 … NUM_CLASSES)."""
    bad = np.nonzero(classes > NUM_CLASSES)[0]
    if len(bad):
        raise CorruptStream(f"channel {bad[0]}: scale class {classes[bad[0]]} > {NUM_CLASSES}")


__all__ = ["channel_deltas", "PROB_BITS", "LANES", "E_MAX", "ESC", "FREQ", "CUM", "SLOT2SYM", "encode_deltas", "decode_deltas", "output_bits", "to_bits", "check_classes", "model_bits"]
