"""Side-information priors: a profile's expectation of each channel's class and centre.

A coder-3 substream carries, per channel, a scale class and a centre (FORMAT.md,
"Packed side information"). In a profile's transform domain both are stable
from text to text: the KLT coordinate ``c`` of layer ``l``'s keys has about the
same spread and offset whatever the document. A profile may therefore carry,
per level and (layer, keys/values), the classes and centres its calibration
texts produced at the level's steps; a stream with header flag bit 2 codes the
*differences* from that prior instead of the values themselves. On SmolLM2 at
``compact`` this takes the side information from ~155 to ~110 coded bytes per
256-token substream (FORMAT.md, "Predicted side information").

A substream whose steps differ from the prior's (the encoder floors a step when
a block holds an outlier, or a profile's level was rescaled) shifts the
predicted classes by the difference of the steps in quarter octaves and
rescales the predicted centres. Everything here is exact integer or correctly
rounded IEEE arithmetic, so encoder and decoder predict the same integers on
any machine; a poor prediction costs bytes, never correctness.

The decoder takes whatever classes and centres a stream carries, so the encoder
is free to choose them: :func:`choose_side` moves a channel's class and centre
towards the prediction where the side symbols it saves outweigh the symbol bits it
costs (FORMAT.md, "Predicted side information", encoder's choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from kvcodec.codec import entropy, rans
from kvcodec.codec.entropy import NUM_CLASSES

# 2**(-7/8), 2**(-5/8), 2**(-3/8), 2**(-1/8) as exact binary64 literals (normative, FORMAT.md):
# a frexp mantissa m in [0.5, 1) lies in quarter octave j = #{t : m >= t}.
_QUARTER_OCTAVE = np.array([float.fromhex(h) for h in (
    "0x1.172b83c7d517bp-1", "0x1.4bfdad5362a27p-1", "0x1.8ace5422aa0dbp-1", "0x1.d5818dcfba487p-1",
)])


def quarter_octaves(x: np.ndarray) -> np.ndarray:
    """``round(4 * log2(x))`` for positive finite ``x``, computed exactly (int64)."""
    mant, exp = np.frexp(np.asarray(x, dtype=np.float64))
    return 4 * exp.astype(np.int64) + (mant[..., None] >= _QUARTER_OCTAVE).sum(axis=-1) - 4


@dataclass(frozen=True)
class SidePrior:
    """The expected side information of one (level, layer, keys/values).

    Attributes:
        steps: float32 ``[H]``: the steps the prior was measured at.
        classes: int64 ``[C]``: expected scale class per channel at ``steps``.
        centres: int64 ``[C]``: expected centre per channel at ``steps``.
    """

    steps: np.ndarray
    classes: np.ndarray
    centres: np.ndarray

    def predict(self, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted ``(classes, centres)`` (int64 ``[C]``) of a substream coded with ``steps``."""
        steps = np.asarray(steps, dtype=np.float32)
        if np.array_equal(steps, self.steps):
            return self.classes, self.centres
        classes, centres = _moved(self.classes, self.centres, self.steps, steps)
        return np.clip(classes, 0, NUM_CLASSES), np.clip(np.rint(centres), -32768, 32767).astype(np.int64)


def _moved(classes: np.ndarray, centres: np.ndarray, measured: np.ndarray, steps: np.ndarray):
    """Classes and centres of one substream measured at ``measured`` steps, as they would be at
    ``steps``: classes shifted by the difference in quarter octaves (int64), centres rescaled
    (float64, not rounded: ``c * s0`` is exact for an int16 times a float32, then one correctly
    rounded division)."""
    dim = classes.size // measured.size
    shift = np.repeat(quarter_octaves(steps) - quarter_octaves(measured), dim)
    scaled = np.asarray(centres, dtype=np.float64) * np.repeat(measured.astype(np.float64), dim)
    return np.asarray(classes, dtype=np.int64) - shift, scaled / np.repeat(steps.astype(np.float64), dim)


def fit_prior(steps: list[np.ndarray], classes: list[np.ndarray], centres: list[np.ndarray]) -> SidePrior:
    """The prior of one (level, layer, keys/values) from calibration substreams' side information.

    ``steps[i]`` (float32 ``[H]``), ``classes[i]`` and ``centres[i]`` (``[C]``) come from one
    substream each. The prior's steps are the most common step vector (the profile's own, unless
    floored); the others' classes and centres are moved to it before averaging.
    """
    if not steps:
        raise ValueError("fit_prior: no substreams")
    keys = [np.asarray(s, dtype=np.float32).tobytes() for s in steps]
    ref = np.frombuffer(max(set(keys), key=keys.count), dtype=np.float32).copy()
    moved = [_moved(cls, cen, np.asarray(s, dtype=np.float32), ref) for s, cls, cen in zip(steps, classes, centres)]
    cls = np.clip(np.rint(np.mean([m[0] for m in moved], axis=0)), 0, NUM_CLASSES).astype(np.int64)
    cen = np.clip(np.rint(np.mean([m[1] for m in moved], axis=0)), -32768, 32767).astype(np.int64)
    return SidePrior(ref, cls, cen)



# Code length of every class's symbols in 1/COST_ONE bits, rounded to integers so that the
# encoder's choices (sums and comparisons) are exact and the same on every machine and backend.
COST_ONE = 4096
ESCAPE_BITS = 16  # an escaped magnitude's u16, on top of the escape symbol
_CLASS_SHIFTS = np.array((-2, -1, 1, 2), dtype=np.int64)  # classes tried beside the current and the predicted
_PASSES = 3
_ESC = rans.ESC.astype(np.int64)


def _cost_table() -> np.ndarray:
    """int64 ``[NUM_CLASSES + 1, 2 * E_MAX + 3]``: ``-log2(freq / 2**PROB_BITS)`` in 1/COST_ONE bits,
    escapes including their u16 (``math.log2`` of integers, rounded: the same table everywhere
    but for a rounding tie no real table meets)."""
    table = np.zeros(rans.FREQ.shape, dtype=np.int64)
    for cls in range(1, NUM_CLASSES + 1):
        e = int(rans.ESC[cls])
        for i in range(2 * e + 3):
            bits = rans.PROB_BITS - math.log2(int(rans.FREQ[cls, i])) + (ESCAPE_BITS if i > 2 * e else 0)
            table[cls, i] = round(bits * COST_ONE)
    return table


COST = _cost_table()


@njit(nogil=True, cache=True)
def _row_cost(values, counts, shift, cls, esc, cost, limit):
    """Cost of one channel's symbols (``values[i] - shift``, each ``counts[i]`` times) under class
    ``cls``; -1 where the class cannot code them (class 0 codes only zeros; escapes fit u16)."""
    total = 0
    for i in range(len(values)):
        x = values[i] - shift
        if cls == 0:
            if x != 0:
                return -1
            continue
        e = esc[cls]
        if x > e:
            if x - e - 1 > limit:
                return -1
            total += counts[i] * cost[cls, 2 * e + 2]
        elif x < -e:
            if -x - e - 1 > limit:
                return -1
            total += counts[i] * cost[cls, 2 * e + 1]
        else:
            total += counts[i] * cost[cls, x + e]
    return total


@njit(nogil=True, cache=True)
def _histograms(deltas):
    """Each channel's distinct symbols and their counts: ``(values [C, T], counts [C, T], n [C])``;
    a channel too spread for a dense count keeps every symbol on its own."""
    channels, tokens = deltas.shape
    values = np.empty((channels, tokens), dtype=np.int64)
    counts = np.empty((channels, tokens), dtype=np.int64)
    sizes = np.empty(channels, dtype=np.int64)
    for c in range(channels):
        row = deltas[c]
        lo, hi = row.min(), row.max()
        if hi - lo >= tokens:
            values[c] = row
            counts[c] = 1
            sizes[c] = tokens
            continue
        dense = np.zeros(hi - lo + 1, dtype=np.int64)
        for x in row:
            dense[x - lo] += 1
        n = 0
        for i in range(len(dense)):
            if dense[i]:
                values[c, n] = lo + i
                counts[c, n] = dense[i]
                n += 1
        sizes[c] = n
    return values, counts, sizes


@njit(nogil=True, cache=True)
def _side_cost(diff, cls, esc, cost):
    """Cost of one side symbol under the side row's class (class 0 codes nothing but 0)."""
    if cls == 0:
        return 0 if diff == 0 else 1 << 40
    e = esc[cls]
    if diff > e:
        return cost[cls, 2 * e + 2]
    if diff < -e:
        return cost[cls, 2 * e + 1]
    return cost[cls, diff + e]


@njit(nogil=True, cache=True)
def _choose(values, counts, sizes, moved, centers, classes, pred_cls, pred_cen, side_cls, esc, cost, limit, tries):
    """One pass: per channel the (class, centre) of least symbol + side cost, from the current
    ``centers`` / ``classes`` (the channel's symbols are ``values - moved``); returns
    ``(centres, classes, shifts)``."""
    channels = len(centers)
    out_cen = centers.copy()
    out_cls = classes.copy()
    shifts = np.zeros(channels, dtype=np.int64)
    for c in range(channels):
        if classes[c] == pred_cls[c] and centers[c] == pred_cen[c]:
            continue  # both side symbols are already 0
        n = sizes[c]
        best = -1
        for s in range(2):
            shift = 0 if s == 0 else pred_cen[c] - centers[c]
            if s == 1 and (shift == 0 or shift > 1 or shift < -1):
                continue
            side_cen = _side_cost(centers[c] + shift - pred_cen[c], side_cls[1], esc, cost)
            for j in range(len(tries) + 2):
                if j == 0:
                    k = classes[c]
                elif j == 1:
                    k = pred_cls[c]
                else:
                    k = classes[c] + tries[j - 2]
                if k < 0 or k > len(esc) - 1 or (j > 0 and k == classes[c]) or (j > 1 and k == pred_cls[c]):
                    continue
                sym = _row_cost(values[c, :n], counts[c, :n], moved[c] + shift, k, esc, cost, limit)
                if sym < 0:
                    continue
                total = sym + side_cen + _side_cost(k - pred_cls[c], side_cls[0], esc, cost)
                if best < 0 or total < best:
                    best = total
                    out_cls[c] = k
                    out_cen[c] = centers[c] + shift
                    shifts[c] = shift
    return out_cen, out_cls, shifts


def choose_side(
    deltas: np.ndarray, centers: np.ndarray, classes: np.ndarray, predicted: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move classes and centres towards the prediction where that makes the substream smaller.

    The measured class (from the mean ``|delta|``) and centre (the rounded mean) are each
    channel's cheapest for its symbols alone; against a prior the side symbols cost bits
    too. Per channel whose class or centre differs from the prediction this tries the
    centres {measured, predicted if one apart} and the classes {measured, predicted,
    measured ± 1, ± 2}, and keeps the pair of least symbol + side code length
    (integer costs from the coder's own tables, the side rows priced with the classes
    their current values get); up to three passes, each starting from the last one's
    choice. Deterministic and exact, so every encoder backend makes the same choice.

    Args:
        deltas: int ``[C, T]`` symbols minus the measured centres (channel-major).
        centers, classes: the measured ``[C]`` centres and classes.
        predicted: ``(classes, centres)`` int64 ``[C]`` from :meth:`SidePrior.predict`.

    Returns:
        ``(centres int64 [C], classes uint8 [C], shifts int64 [C])``: the chosen side
        information; the deltas to code are ``deltas - shifts[:, None]``.
    """
    pred_cls, pred_cen = (np.asarray(p, dtype=np.int64) for p in predicted)
    cen = np.asarray(centers, dtype=np.int64)
    cls = np.asarray(classes, dtype=np.int64)
    values, counts, sizes = _histograms(np.ascontiguousarray(deltas, dtype=np.int64))
    shifts = np.zeros(len(cen), dtype=np.int64)
    for _ in range(_PASSES):  # each pass prices the side symbols with the rows the last one left
        rows = np.abs(np.stack([cls - pred_cls, cen - pred_cen]))
        side_cls = entropy.scale_classes(rows.sum(axis=1), rows.max(axis=1, initial=0), rows.shape[1])
        new_cen, new_cls, step = _choose(values, counts, sizes, shifts, cen, cls, pred_cls, pred_cen,
                                         side_cls.astype(np.int64), _ESC, COST, rans.MAX_ESCAPE_MAGNITUDE,
                                         _CLASS_SHIFTS)
        if np.array_equal(new_cen, cen) and np.array_equal(new_cls, cls):
            break
        cen, cls, shifts = new_cen, new_cls, shifts + step
    return cen, cls.astype(np.uint8), shifts
