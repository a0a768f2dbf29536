"""Values predicted from the same layer's keys (header flag 8, FORMAT.md "Value prediction").

A layer's keys and values are two projections of the same hidden states, so a linear map of
a token's decoded keys predicts much of its values: on SmolLM2 it takes 12-20% off the value
bits at equal step (benchmarks/RESULTS.md, "Predicting from what is already decoded"). The
prediction works on the transform's integer symbols, so every decoder reconstructs exactly
the symbols the encoder quantized — the decoded tensors are those of the same stream coded
without prediction; only the rate changes:

* the encoder quantizes keys and values as usual (symbols ``q_K``, ``q_V``, token-major
  ``[T, C]`` with ``C = heads * head_dim`` in the transform's coordinate order) and codes
  ``q_V - P(q_K)`` in the values' substream;
* the decoder decodes the keys' substream, computes ``P(q_K)``, and adds it to the values'
  decoded symbols before the values' inverse transform.

``P(q)[t, i] = clamp(round_half_even(acc[t, i] * scale), -LIMIT, LIMIT)`` with
``acc = q @ map.T``: the map is int16 (a profile field, per layer), so with ``|q| <= 2**15``
every product and partial sum is an integer below ``2**53`` — float64 matrix products are
exact in any order, on every device and BLAS — and ``scale`` is one float64 per (level, layer)
computed from the profile with a fixed sequence of IEEE operations (:func:`level_scale`).
``LIMIT`` and the values' step floor (twice the usual, :data:`VALUE_FLOOR_FACTOR`) keep the
coded residual within the int16 range the coder's escapes are sized for.

The maps are fitted in one level's symbol units (``kvcodec calibrate``, :func:`fit_maps`),
divided by that level's key/value step ratio; a level uses them times its own ratio, because
a level's steps differ from another's by one factor per (layer, keys/values).
"""

from __future__ import annotations

import math

import numpy as np
import torch

LIMIT = 16383  # |prediction| bound; the values' symbols are kept within it too
VALUE_FLOOR_FACTOR = 2.0  # the values' step floor (absmax / 32767) is doubled: |q_V| <= 16383
MAX_SHIFT = 30
RIDGE = 1e-3  # ridge of the least-squares fit, relative to the predictors' mean energy


class Predictor:
    """One (level, layer)'s prediction of value symbols from key symbols.

    Args:
        weights: int16 ``[C, C]``: row ``i`` predicts value coordinate ``i``.
        scale: float64 multiplier of the integer sums (``level_scale``).
    """

    def __init__(self, weights: np.ndarray, scale: float):
        self.weights = weights
        self.scale = float(scale)
        self._device: dict[str, torch.Tensor] = {}

    def _map(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._device:  # transposed: q @ map.T
            self._device[key] = torch.from_numpy(self.weights.T.astype(np.float64)).to(device)
        return self._device[key]

    def offsets(self, q: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float64 ``[T, C]`` integer predictions for key symbols ``q`` (``[T, C]``, integers
        in any dtype, numpy or torch on any device; the result is on the same device)."""
        q = torch.as_tensor(q)
        acc = q.to(torch.float64) @ self._map(q.device)  # exact integer sums
        return torch.round(acc * self.scale).clamp_(-LIMIT, LIMIT)

    def offsets_hdt(self, q: torch.Tensor) -> torch.Tensor:
        """:meth:`offsets` for symbols laid out ``[H, T, D]``; int32 ``[H, T, D]``."""
        heads, tokens, dim = q.shape
        flat = q.permute(1, 0, 2).reshape(tokens, heads * dim)
        return self.offsets(flat).to(torch.int32).reshape(tokens, heads, dim).permute(1, 0, 2)


def level_scale(ratio: float, shift: int) -> float:
    """float64 ``ratio * 2**-shift``: what a level multiplies a layer's integer sums by
    (``ratio``: the level's key step over its value step for the layer, divided by the
    fitting level's — :meth:`kvcodec.codec.profile.Profile.value_predictor`)."""
    return float(ratio) * math.ldexp(1.0, -int(shift))


def to_int(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float ``[L, C, C]`` maps -> (int16 maps, int shifts ``[L]``): each layer scaled by the
    largest power of two that keeps its entries within int16."""
    maps = np.asarray(maps, dtype=np.float64)
    out = np.zeros(maps.shape, dtype=np.int16)
    shifts = np.zeros(len(maps), dtype=np.int64)
    for layer, m in enumerate(maps):
        peak = float(np.abs(m).max(initial=0.0))
        shift = MAX_SHIFT if peak == 0 else min(MAX_SHIFT, max(0, math.floor(math.log2(32767 / peak))))
        while shift > 0 and np.abs(np.rint(m * 2.0**shift)).max(initial=0) > 32767:
            shift -= 1
        out[layer] = np.clip(np.rint(m * 2.0**shift), -32767, 32767).astype(np.int16)
        shifts[layer] = shift
    return out, shifts


def fit_maps(blocks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Least-squares maps from key symbols to value symbols.

    Args:
        blocks: per substream block of the calibration KV, ``(q_K, q_V)`` symbols
            ``[L, T, C]`` at one level. Each block is centred first: the coder's per-substream
            channel centres absorb a block's mean, so the maps need not predict it.

    Returns:
        float64 ``[L, C, C]``: ``q_V[t] ~ maps[l] @ q_K[t]`` (ridge :data:`RIDGE`).
    """
    layers, _, channels = blocks[0][0].shape
    xtx = np.zeros((layers, channels, channels))
    xty = np.zeros((layers, channels, channels))
    for qk, qv in blocks:
        x = qk - qk.mean(axis=1, keepdims=True)
        y = qv - qv.mean(axis=1, keepdims=True)
        xtx += np.einsum("ltc,ltd->lcd", x, x)
        xty += np.einsum("ltc,ltd->lcd", x, y)
    out = np.empty((layers, channels, channels))
    for layer in range(layers):
        ridge = RIDGE * np.trace(xtx[layer]) / channels + 1e-12
        out[layer] = np.linalg.solve(xtx[layer] + ridge * np.eye(channels), xty[layer]).T
    return out
