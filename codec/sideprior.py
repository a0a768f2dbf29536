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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

