"""Coder 3's quantized fields, parsed without the GIL.

A coder-3 substream's quantized part (FORMAT.md "Mode 1, coder 3"; after the raw tokens
and the steps, which Python reads first because a side-information prior's prediction
depends on them) is ``side information | n_escapes u32 | escapes u16[] | words u16[]``,
the side information plain (``width u8 | centres i8/i16[C] | classes u8[C]``) or packed
(two rows of side symbols coded with coder 3 itself). :func:`parse` walks it in numba:
every read is bounds-checked, and a malformed field yields a status and its values, which
:func:`message` turns into the words of a :class:`CorruptStream`.

Before :func:`parse` each substream's parsing was a few dozen small numpy calls, about a
fifth of a one-thread decode, all holding the GIL, so two decoder threads queued for it
(benchmarks/RESULTS.md, "Codec speed").

:func:`parse` compiles ``rans._decode`` into itself, and numba's on-disk cache only watches
this file: after editing the rANS decoder, touch this file too (or clear ``__pycache__``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kvcodec.codec import rans
from kvcodec.codec.entropy import NUM_CLASSES

# statuses of parse(): (status, a, b) -> message()
OK, CLASS, SIDE_FIT, SIDE_PAYLOAD, CLASS_RANGE, CENTRE_RANGE, WIDTH, PLAIN_FIT, ESCAPE_FIT, ODD_WORDS = range(10)


_MESSAGES = {
    CLASS: "channel {a}: scale class {b} > {classes}",  # a side row's class, or a channel's (plain)
    SIDE_FIT: "side information: {a} escapes and {b} words do not fit the {size}-byte substream",
    SIDE_PAYLOAD: "side information: entropy payload: {rans}",
    CLASS_RANGE: "classes: decoded class outside 0..{classes}",
    CENTRE_RANGE: "centres: decoded centre outside int16",
    WIDTH: "centre width: {a} (must be 1 or 2)",
    PLAIN_FIT: "side information: {size} bytes, needs {a}",
    ESCAPE_FIT: "escape list: {a} escapes do not fit the {size}-byte substream",
    ODD_WORDS: "rANS words: {a} bytes is not a whole number of u16 words",
}


def message(status: int, a: int, b: int, size: int) -> str:
    """The words for a failed :func:`parse` of a ``size``-byte quantized part."""
    detail = rans._ERRORS[a] if status == SIDE_PAYLOAD else ""
    return _MESSAGES[status].format(a=a, b=b, size=size, classes=NUM_CLASSES, rans=detail)


@njit(inline="always")
def _u16(p, i):
    return np.uint16(p[i]) | np.uint16(np.uint16(p[i + 1]) << np.uint16(8))


@njit(inline="always")
def _u32(p, i):
    return np.int64(p[i]) | (np.int64(p[i + 1]) << 8) | (np.int64(p[i + 2]) << 16) | (np.int64(p[i + 3]) << 24)


@njit(inline="always")
def _words(p, at, count, pad):
    """``count`` little-endian u16 from byte ``at``, then ``pad`` zero words (the rANS decoder's padding)."""
    w = np.zeros(count + pad, dtype=np.uint16)
    for i in range(count):
        w[i] = _u16(p, at + 2 * i)
    return w


@njit(nogil=True, cache=True)
def parse(p, pos, channels, packed, pred_classes, pred_centers, centers, classes, esc, freq, cum, slot2sym):
    """Parse ``p`` (uint8, the quantized part) from ``pos`` (after the steps).

    Fills ``centers`` (int32 ``[C]``) and ``classes`` (uint8 ``[C]``); with a prior
    (``pred_classes`` / ``pred_centers`` int64 ``[C]``, packed only; empty without) the
    packed rows are differences from them. The caller has checked that ``p`` holds the
    fixed part (:func:`kvcodec.codec.substream.quantized_side_bytes`).

    Returns:
        ``(status, a, b, escapes_at, n_escapes, words_at)``: status :data:`OK` or what failed,
        with its values in ``a`` and ``b``.
    """
    n = p.shape[0]
    if packed:
        side_classes = np.empty(2, dtype=np.uint8)
        for r in range(2):
            side_classes[r] = p[pos + r]
            if side_classes[r] > NUM_CLASSES:
                return CLASS, r, np.int64(side_classes[r]), 0, 0, 0
        n_esc, n_words = _u32(p, pos + 2), _u32(p, pos + 6)
        pos += 10
        end = pos + 2 * (n_esc + n_words)
        if end + 4 > n:
            return SIDE_FIT, n_esc, n_words, 0, 0, 0
        rows = np.empty(2 * channels, dtype=np.uint32)  # float32 bits [2, C]: exact integers
        status = rans._decode(
            _words(p, pos + 2 * n_esc, n_words, channels), _words(p, pos, n_esc, 0), side_classes, esc, freq,
            cum, slot2sym, rows, 0, channels, 1, channels, rans.OUT_FLOAT32, np.zeros(2, dtype=np.int32),
            np.ones(2, dtype=np.float32), np.float32(-np.inf), np.float32(np.inf),
        )
        if status:
            return SIDE_PAYLOAD, status, 0, 0, 0, 0
        values = rows.view(np.float32)
        prior = pred_classes.shape[0] > 0
        cls = np.int64(0)
        for c in range(channels):
            row0, centre = np.int64(values[c]), np.int64(values[channels + c])
            if prior:
                cls = row0 + pred_classes[c]
                centre += pred_centers[c]
            else:
                cls += row0  # the row holds differences from the previous channel's class
            if cls < 0 or cls > NUM_CLASSES:
                return CLASS_RANGE, c, cls, 0, 0, 0
            if centre < -32768 or centre > 32767:
                return CENTRE_RANGE, c, centre, 0, 0, 0
            classes[c] = cls
            centers[c] = centre
        pos = end
    else:
        width = np.int64(p[pos])
        if width != 1 and width != 2:
            return WIDTH, width, 0, 0, 0, 0
        pos += 1
        need = pos + (width + 1) * channels + 4
        if n < need:
            return PLAIN_FIT, need, 0, 0, 0, 0
        for c in range(channels):
            if width == 1:
                centers[c] = np.int8(p[pos + c])
            else:
                centers[c] = np.int16(_u16(p, pos + 2 * c))
        pos += width * channels
        for c in range(channels):
            classes[c] = p[pos + c]
            if classes[c] > NUM_CLASSES:
                return CLASS, c, np.int64(classes[c]), 0, 0, 0
        pos += channels
    n_esc = _u32(p, pos)
    pos += 4
    if pos + 2 * n_esc > n:
        return ESCAPE_FIT, n_esc, 0, 0, 0, 0
    if (n - pos - 2 * n_esc) % 2:
        return ODD_WORDS, n - pos - 2 * n_esc, 0, 0, 0, 0
    return OK, 0, 0, pos, n_esc, pos + 2 * n_esc
