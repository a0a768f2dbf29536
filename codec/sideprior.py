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
def _histograms(deltas, todo):
    """The distinct symbols of each listed channel and their counts, flat:
    ``(values, counts, starts)``, channel ``todo[i]``'s in ``starts[i]:starts[i + 1]``. A channel
    with a symbol beyond ``±tokens`` keeps every symbol on its own (the costs are sums, so the
    grouping changes no result)."""
    tokens = deltas.shape[1]
    # room for 32 distinct symbols a channel (a real channel has ~10), grown on demand
    values = np.empty(len(todo) * 32 + tokens, dtype=np.int64)
    counts = np.empty(len(values), dtype=np.int64)
    starts = np.zeros(len(todo) + 1, dtype=np.int64)
    # symbol x counts at [*, x + tokens], in four interleaved copies: increments of one bin
    # in a row would each wait for the last (deltas are mostly a few values around 0)
    dense = np.zeros((4, 2 * tokens + 1), dtype=np.int64)
    for i in range(len(todo)):
        row, at = deltas[todo[i]], starts[i]
        if at + tokens > len(values):
            values = np.concatenate((values, np.empty(len(values), dtype=np.int64)))
            counts = np.concatenate((counts, np.empty(len(counts), dtype=np.int64)))
        lo, hi = row.min(), row.max()
        if lo < -tokens or hi > tokens:
            for t in range(tokens):
                values[at + t] = row[t]
                counts[at + t] = 1
            starts[i + 1] = at + tokens
            continue
        for t in range(tokens):
            dense[t & 3, row[t] + tokens] += 1
        n = at
        for x in range(lo + tokens, hi + tokens + 1):
            k = dense[0, x] + dense[1, x] + dense[2, x] + dense[3, x]
            if k:
                values[n] = x - tokens
                counts[n] = k
                dense[0, x] = dense[1, x] = dense[2, x] = dense[3, x] = 0
                n += 1
        starts[i + 1] = n
    return values, counts, starts


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
def _side_classes(cls, cen, pred_cls, pred_cen, bounds):
    """:func:`kvcodec.codec.entropy.scale_classes` of the two side rows (class and centre
    differences from the prediction): the same float division and ``bisect_left``."""
    out = np.zeros(2, dtype=np.int64)
    for r in range(2):
        total = 0
        peak = 0
        for c in range(len(cls)):
            d = abs(cls[c] - pred_cls[c]) if r == 0 else abs(cen[c] - pred_cen[c])
            total += d
            peak = max(peak, d)
        if peak > 0:
            out[r] = 1 + np.searchsorted(bounds, total / len(cls))
    return out


@njit(nogil=True, cache=True)
def _choose(deltas, centers, classes, pred_cls, pred_cen, bounds, esc, cost, limit, tries, passes):
    """:func:`choose_side`'s passes: per channel the (class, centre) of least symbol + side cost.
    Only channels whose class or centre differs from the prediction are looked at (a channel
    that matches already costs no side bits and never moves)."""
    channels = deltas.shape[0]
    cen = centers.copy()
    cls = classes.copy()
    shifts = np.zeros(channels, dtype=np.int64)
    todo = np.empty(channels, dtype=np.int64)
    n_todo = 0
    for c in range(channels):
        if cls[c] != pred_cls[c] or cen[c] != pred_cen[c]:
            todo[n_todo] = c
            n_todo += 1
    todo = todo[:n_todo]
    values, counts, starts = _histograms(deltas, todo)
    new_cen = cen.copy()
    new_cls = cls.copy()
    step = np.zeros(channels, dtype=np.int64)
    # symbol costs of each channel's candidates (-1: cannot code), kept while the channel stays put
    sym = np.empty((n_todo, 2, len(tries) + 2), dtype=np.int64)
    known = np.zeros(n_todo, dtype=np.bool_)
    for _ in range(passes):  # each pass prices the side symbols with the rows the last one left
        side_cls = _side_classes(cls, cen, pred_cls, pred_cen, bounds)
        changed = False
        for i in range(n_todo):
            c = todo[i]
            new_cen[c], new_cls[c], step[c] = cen[c], cls[c], 0
            if cls[c] == pred_cls[c] and cen[c] == pred_cen[c]:
                continue  # both side symbols are already 0
            best = -1
            for s in range(2):
                shift = 0 if s == 0 else pred_cen[c] - cen[c]
                if s == 1 and (shift == 0 or shift > 1 or shift < -1):
                    continue
                side_cen = _side_cost(cen[c] + shift - pred_cen[c], side_cls[1], esc, cost)
                for j in range(len(tries) + 2):
                    if j == 0:
                        k = cls[c]
                    elif j == 1:
                        k = pred_cls[c]
                    else:
                        k = cls[c] + tries[j - 2]
                    if k < 0 or k > len(esc) - 1 or (j > 0 and k == cls[c]) or (j > 1 and k == pred_cls[c]):
                        continue
                    if not known[i]:
                        a, b = starts[i], starts[i + 1]
                        sym[i, s, j] = _row_cost(values[a:b], counts[a:b], shifts[c] + shift, k, esc, cost, limit)
                    if sym[i, s, j] < 0:
                        continue
                    total = sym[i, s, j] + side_cen + _side_cost(k - pred_cls[c], side_cls[0], esc, cost)
                    if best < 0 or total < best:
                        best = total
                        new_cls[c] = k
                        new_cen[c] = cen[c] + shift
                        step[c] = shift
            known[i] = True
            if new_cls[c] != cls[c] or new_cen[c] != cen[c]:
                changed = True
        if not changed:
            break
        for i in range(n_todo):
            c = todo[i]
            if new_cls[c] != cls[c] or new_cen[c] != cen[c]:
                known[i] = False
            cen[c], cls[c], shifts[c] = new_cen[c], new_cls[c], shifts[c] + step[c]
    return cen, cls, shifts


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
    cen, cls, shifts = _choose(np.ascontiguousarray(deltas), np.asarray(centers, dtype=np.int64),
                               np.asarray(classes, dtype=np.int64), pred_cls, pred_cen, entropy.BOUNDS,
                               _ESC, COST, rans.MAX_ESCAPE_MAGNITUDE, _CLASS_SHIFTS, _PASSES)
    return cen, cls.astype(np.uint8), shifts
