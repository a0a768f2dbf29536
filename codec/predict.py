"""Keys and values predicted from what is already decoded (header flag 8; FORMAT.md, "Mode 1,
transform: prediction from decoded symbols").

A layer's keys and values are projections of the same hidden states, and a layer's hidden
states differ from the previous layer's by one residual update. So, token by token, linear maps
of already-decoded symbols predict much of the next ones (:func:`sources`):

* the keys of layer ``l >= 1`` from the keys and values of layer ``l - 1``;
* the values of layer ``l`` from the keys of layer ``l`` (and, for ``l >= 1``, the keys and
  values of layer ``l - 1``).

On SmolLM2 (eight held-out texts, the same steps) this takes 19-22% off high's bits and 10-14%
off compact's (benchmarks/RESULTS.md, "Prediction from decoded symbols"). The prediction works
on the transform's integer symbols, so every decoder reconstructs exactly the symbols the
encoder quantized — the decoded tensors are those of the same stream coded without prediction;
only the rate changes:

* the encoder quantizes every substream as usual (symbols token-major ``[T, C]``, ``C = heads *
  head_dim`` in the transform's coordinate order) and codes ``q - P(sources)``;
* the decoder adds ``P(sources)`` to the symbols it decodes, in layer order within each block
  of tokens (every substream's rANS words still decode on their own; only adding the
  prediction follows that order).

``P = clamp(round_half_even(acc * 2**-shift), -LIMIT, LIMIT)`` with ``acc = concat(q_s) @ map.T``
(the sum over sources of each source's product with its columns): the maps are int16 (a profile
field, per level), so with ``|q| <= 2**15`` every product and partial sum is an integer below
``2**53`` — float64 matrix products are exact in any order, on every device and BLAS; float32
ones too when ``max|q_s| * (largest row L1 norm of the source's columns) < 2**24``, which
decoders check and use (splitting larger symbols into two such products) — and the
power-of-two scaling is exact.
``LIMIT`` and the step floor of predicted substreams (twice the usual, :data:`FLOOR_FACTOR`) keep
the coded residual within the int16 range the coder's escapes are sized for.

Each level has its own maps, fitted in its own symbol units (``kvcodec calibrate``,
:func:`fit_maps`): a map fitted at another level and rescaled by the step ratios gives away a
quarter of the gain (the quantization noise of the sources differs from level to level).
"""

from __future__ import annotations

import base64
import math

import numpy as np
import torch

from kvcodec.codec.transform import float32_matmul_is_ieee

LIMIT = 16383  # |prediction| bound; the predicted substreams' symbols are kept within it too
MAP_BITS = 12  # map entries within +-2047: a row's L1 norm stays near 2**16, so most products are
# exact in float32 (3.5x faster than float64 here); the entries' rounding moves a prediction by
# ~0.1 symbol, far below the residuals' spread
FLOOR_FACTOR = 2.0  # predicted substreams' step floor (absmax / 32767) is doubled: |q| <= 16383
MAX_SHIFT = 30
RIDGE = 1e-3  # ridge of the least-squares fit, relative to the predictors' mean energy


def sources(layer: int, is_value: bool) -> list[tuple[int, bool]]:
    """The ``(layer, is_value)`` substreams that predict one, in the order their maps' columns
    and the prediction's sum take them."""
    own = [(layer, False)] if is_value else []
    return own + ([(layer - 1, False), (layer - 1, True)] if layer > 0 else [])


class Predictor:
    """One (level, layer, keys/values)'s prediction from its :func:`sources`' symbols.

    Args:
        weights: int16 ``[C, C * len(sources)]``: row ``i`` predicts coordinate ``i``; the
            columns of source ``s`` are ``s * C .. (s + 1) * C``.
        scale: float64 multiplier of the integer sums (a power of two).
    """

    def __init__(self, weights: np.ndarray, scale: float):
        self.weights = weights
        self.scale = float(scale)
        c = weights.shape[0]
        self._blocks = [weights[:, s : s + c] for s in range(0, weights.shape[1], c)]  # one per source
        # a source's symbols up to this magnitude keep every partial sum of its product below
        # 2**24: exact in float32
        self.float32_below = [(2**24 - 1) // max(1, int(np.abs(b.astype(np.int64)).sum(axis=1).max()))
                              for b in self._blocks]
        self._device: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}

    def _maps(self, device, dtype: torch.dtype) -> list[torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._device:  # transposed: q @ map.T
            self._device[key] = [torch.from_numpy(b.T.astype(np.float64)).to(device=device, dtype=dtype)
                                 for b in self._blocks]
        return self._device[key]

    def offsets(self, qs: list) -> torch.Tensor:
        """float64 ``[T, C]`` integer predictions from the sources' symbols ``qs`` (each
        ``[T, C]``, integers in any dtype, numpy or torch, on one device: the result's)."""
        total = None
        for i, q in enumerate(qs):
            term = self._sums(torch.as_tensor(q), i)  # exact integers, so any order of sums is exact
            total = term if total is None else total + term
        return torch.round(total * self.scale).clamp_(-LIMIT, LIMIT)

    def _sums(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """float64 ``q @ block_i.T``, exact. In float32 where that is plain IEEE arithmetic: at
        once when every partial sum stays below ``2**24`` (output ``i``'s partial sums are at most
        ``sum_j |block[i, j]| * max_t |q[t, j]|``), else as ``2**k * (hi @ w) + (lo @ w)``
        with ``q = 2**k * hi + lo``, ``0 <= lo < 2**k`` (each product exact, the sum in float64);
        float64 for what even that cannot hold."""
        bound = self.float32_below[i]
        peak = int(q.abs().max()) if q.numel() else 0
        k = bound.bit_length() - 1  # 2**k <= bound: lo < 2**k fits
        ieee = float32_matmul_is_ieee(q.device)
        # the largest symbol times the longest row bounds every partial sum; where that is too
        # coarse, each row's own bound (a few large symbols in coordinates its row weighs little)
        one_product = ieee and (peak <= bound or float(
            (q.abs().amax(0).to(torch.float64) @ self._maps(q.device, torch.float64)[i].abs()).max()) <= 2**24 - 1)
        if not one_product and (not ieee or k < 1 or peak // (1 << k) + 1 > bound):
            return q.to(torch.float64) @ self._maps(q.device, torch.float64)[i]
        w = self._maps(q.device, torch.float32)[i]
        q = q.to(torch.float32)  # integers below 2**24: exact
        if one_product:
            return (q @ w).to(torch.float64)
        hi = torch.floor(q * (1.0 / (1 << k)))  # exact: power-of-two scaling, integers
        lo = q - hi * (1 << k)
        return (hi @ w).to(torch.float64) * (1 << k) + (lo @ w).to(torch.float64)

    def offsets_hdt(self, qs: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`offsets` for symbols laid out ``[H, T, D]``; int32 ``[H, T, D]``."""
        heads, tokens, dim = qs[0].shape
        flat = [q.permute(1, 0, 2).reshape(tokens, heads * dim) for q in qs]
        return self.offsets(flat).to(torch.int32).reshape(tokens, heads, dim).permute(1, 0, 2)


class Maps:
    """One level's prediction maps (a profile field), fitted in that level's symbol units.

    Args:
        keys: int16 ``[L, C, 2C]`` (layer 0's rows unused: its keys have no source).
        values: int16 ``[L, C, 3C]`` (layer 0 uses the first ``C`` columns).
        shifts: int ``[L, 2]``: each map's entries are its real values times ``2**shift``.
    """

    def __init__(self, keys: np.ndarray, values: np.ndarray, shifts: np.ndarray):
        self.keys, self.values, self.shifts = keys, values, np.asarray(shifts, dtype=np.int64)
        self._predictors: dict[tuple[int, bool], Predictor] = {}

    def predictor(self, layer: int, is_value: bool) -> Predictor | None:
        """The :class:`Predictor` of one (layer, keys/values), None if it has no sources."""
        src = sources(layer, is_value)
        if not src:
            return None
        if (layer, is_value) not in self._predictors:
            maps = self.values if is_value else self.keys
            weights = maps[layer, :, : len(src) * maps.shape[1]]
            scale = math.ldexp(1.0, -int(self.shifts[layer, int(is_value)]))
            self._predictors[(layer, is_value)] = Predictor(weights, scale)
        return self._predictors[(layer, is_value)]

    def to_json(self, with_maps: bool = True) -> dict:
        out = {"shifts": [[int(x) for x in row] for row in self.shifts]}
        if with_maps:
            for name, maps in (("keys", self.keys), ("values", self.values)):
                out[name] = base64.b64encode(maps.astype("<i2").tobytes()).decode("ascii")
        return out


def to_int(maps: np.ndarray, bits: int = MAP_BITS) -> tuple[np.ndarray, np.ndarray]:
    """float ``[N, C, K]`` maps -> (int16 maps, shifts ``[N]``): each map scaled by the largest
    power of two that keeps its entries within ``+-(2**(bits - 1) - 1)``."""
    maps = np.asarray(maps, dtype=np.float64)
    top = 2 ** (bits - 1) - 1
    out = np.zeros(maps.shape, dtype=np.int16)
    shifts = np.zeros(len(maps), dtype=np.int64)
    for i, m in enumerate(maps):
        peak = float(np.abs(m).max(initial=0.0))
        shift = MAX_SHIFT if peak == 0 else min(MAX_SHIFT, max(0, math.floor(math.log2(top / peak))))
        while shift > 0 and np.abs(np.rint(m * 2.0**shift)).max(initial=0) > top:
            shift -= 1
        out[i] = np.clip(np.rint(m * 2.0**shift), -top, top).astype(np.int16)
        shifts[i] = shift
    return out, shifts


def fit_maps(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares maps of every substream from its :func:`sources`.

    Args:
        blocks: per substream block of the calibration KV, float64 symbols ``[L, 2, T, C]``
            (keys, values) at one level. Each block is centred first: the coder's per-substream
            channel centres absorb a block's mean, so the maps need not predict it.

    Returns:
        float64 ``(keys [L, C, 2C], values [L, C, 3C])``: ``q[t] ~ map @ concat(sources)[t]``
        (ridge :data:`RIDGE`; columns of sources a layer lacks are zero).
    """
    layers, _, _, channels = blocks[0].shape
    out = (np.zeros((layers, channels, 2 * channels)), np.zeros((layers, channels, 3 * channels)))
    centred = [b - b.mean(axis=2, keepdims=True) for b in blocks]
    for layer in range(layers):
        for kind in (0, 1):
            src = sources(layer, bool(kind))
            if not src:
                continue
            n = len(src) * channels
            xtx, xty = np.zeros((n, n)), np.zeros((n, channels))
            for b in centred:
                x = np.concatenate([b[lay, int(kind)] for lay, kind in src], axis=1)
                xtx += x.T @ x
                xty += x.T @ b[layer, kind]
            ridge = RIDGE * np.trace(xtx) / n + 1e-12
            out[kind][layer, :, :n] = np.linalg.solve(xtx + ridge * np.eye(n), xty).T
    return out
