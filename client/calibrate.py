"""``kvcodec calibrate``: measure a model's KV sensitivity and write a codec profile.

Four steps (see :mod:`kvcodec.codec.profile` for the theory):

1. *Sensitivity.* For each calibration text, prefill a prefix, then score the
   following tokens attending to that prefix's KV with gradients enabled; the
   mean squared gradient of the loss over each (layer, keys/values, kv head)
   is its Fisher weight. Texts are normalised to equal total weight and
   averaged; sink tokens are excluded (they are stored raw).
2. *Transform* (``--transform mixed``, the default). Fit the KLT of the
   calibration KV, keys taken before RoPE (see :mod:`kvcodec.codec.transform`):
   for keys one basis across a layer's kv heads (in the sensitivity-weighted
   domain: keys of different heads are correlated, and on SmolLM2 this takes
   5-9% off every level at equal quality), for values one per kv head (mixing
   values across heads cost ~2 points of greedy agreement). The keys' basis is
   also *shaped* by the keys' gradient metric (the sum of the eval loss's
   gradient outer products, keys before RoPE, measured on ``--shape-text`` or
   else the calibration texts; :func:`kvcodec.codec.transform.fit_shaped_bases`):
   the queries look along a few key directions, so error is put elsewhere — on
   SmolLM2 0.25-0.6 bits fewer per key element at equal KL; ``--no-shape``
   keeps it orthonormal. Values' metric does not carry over between texts, so
   values stay orthonormal. Streams coded with a transform need the profile to
   decode; ``--transform none`` writes a profile that only sets steps.
3. *Rate-distortion curves* (``--allocation measured``, the default). Code
   the calibration KV at a ladder of steps (``RD_MULTIPLIERS`` times
   ``RD_REFERENCE_LAMBDA``) and, for every (layer, keys/values) group, record
   the bits its substreams take and the output KL (vs the exact KV) when only
   that group is replaced by its reconstruction. KL adds up across groups to
   within ~10% at the rates the levels use, so the allocation that
   minimises total KL at a rate gives every group the step where
   ``KL_g + mu * bits_g`` is least (curves interpolated in log step). The
   curves are stored in the profile: ``--retune PROFILE`` repeats only step 4.
4. *Levels.* For each lossy level, bisect (in log space) the largest slope
   ``mu`` (with ``--allocation fisher``: the largest step multiplier
   ``lambda``) whose reconstruction still meets the level's quality floor on
   the calibration texts (perplexity change and greedy agreement, scored with
   :class:`kvcodec.client.quality.QualityProbe`); ``--slope LEVEL=MU`` takes a
   slope as given instead (one chosen by checking held-out texts: on two
   calibration texts the quality measures are noisy enough that bisection can
   settle anywhere in a range of slopes). Then, with a transform, fit each
   level's *prediction* maps (:mod:`kvcodec.codec.predict`: each layer's keys
   and values from the symbols decoded before them, least squares on the
   calibration KV at the level's steps; kept for the levels whose calibration
   streams they shrink by at least 5%; ``--no-prediction`` skips them) and
   record each level's side-information prior (:mod:`kvcodec.codec.sideprior`):
   the classes and centres the calibration KV gets at the level's steps.

Example::

    kvcodec calibrate --text /usr/share/common-licenses/Apache-2.0 --out smollm2.json
    kvcodec calibrate --retune smollm2.json --floor balanced=0.5,96 \
        --text /usr/share/common-licenses/Apache-2.0 --out smollm2-b.json
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace

import numpy as np

# Quality floors per level, met on every calibration text when bisecting a level's slope (or
# lambda): (max |ppl change| %, min greedy agreement %). The targets are 0.1 / 99 (high),
# 1 / 95 (balanced), 5 / 85 (compact) on texts *not* calibrated on; these floors were set by
# checking two held-out texts (GPL-3, argparse.py; benchmarks/RESULTS.md): the perplexity
# floor is the one that binds on SmolLM2's calibration texts.
LEVEL_FLOORS = {"high": (0.1, 98.8), "balanced": (0.8, 95.0), "compact": (2.5, 89.0)}


# The ladder of steps at which the rate-distortion curves are measured, as multiples of
# RD_REFERENCE_LAMBDA (steps / RMS, geometric mean); allocations are chosen on a finer
# ladder (RD_FINE per octave) interpolated between them.
RD_REFERENCE_LAMBDA = 0.35
RD_MULTIPLIERS = tuple(2.0**k for k in range(-4, 4))
RD_FINE = 4
ALLOCATIONS = ("measured", "fisher")


@dataclass
class Sensitivity:
    weights: np.ndarray  # [layers, 2, heads] mean squared gradient
    rms: np.ndarray      # [layers, 2, heads] RMS of the KV, for normalising steps
    # [layers, H * D, H * D] sum over tokens of the keys' gradient outer products, keys before RoPE
    # (the metric key errors are weighed by; None where the model's RoPE cannot be removed)
    key_metric: np.ndarray | None = None


def measure_sensitivity(probe, sink: int = 1) -> Sensitivity:
    """Fisher weights of a probe's prefix KV and the keys' gradient metric (sink tokens excluded).

    A sliding-window layer's weights are the mean over the prefix tokens inside the eval
    tokens' window (the last ``window - 1``): the others cannot move the eval loss, and a chunk
    whose KV is coded with these steps may be the last of some other context."""
    import torch

    from kvcodec.client.model import sliding_window_layers
    from kvcodec.codec.transform import unrotate

    loaded = probe.loaded
    keys, values = probe.exact_kv
    gk, gv = probe.loss_gradients()
    w = torch.stack([(gk[:, :, sink:] ** 2).mean((2, 3)), (gv[:, :, sink:] ** 2).mean((2, 3))], 1)
    sliding, window = sliding_window_layers(loaded.config)
    if sliding:
        seen = max(sink, keys.shape[2] - window + 1)
        for layer in sliding:
            w[layer] = torch.stack([(g[layer, :, seen:] ** 2).mean((1, 2)) for g in (gk, gv)])
    kv = torch.stack([keys[:, :, sink:], values[:, :, sink:]], 1)
    rms = (kv - kv.mean(3, keepdim=True)).pow(2).mean((3, 4)).sqrt()
    ropes = _model_ropes(loaded)
    metric = None
    if ropes is not None:  # keys are coded before RoPE: dL/dk_pre = R^T dL/dk_post, i.e. the gradient un-rotated
        grad = torch.stack([unrotate(g, rope, 0) for g, rope in zip(gk.float(), ropes)])[:, :, sink:]
        flat = grad.permute(0, 2, 1, 3).reshape(grad.shape[0], grad.shape[2], -1).double()
        metric = torch.einsum("ltc,ltd->lcd", flat, flat).numpy()
    return Sensitivity(w.double().numpy(), rms.double().numpy(), metric)


def _model_ropes(loaded):
    """Each layer's RoPE (:func:`kvcodec.codec.transform.model_ropes`), None if it cannot be removed."""
    from kvcodec.codec.transform import model_ropes

    rotary = getattr(getattr(loaded.model, "model", None), "rotary_emb", None)
    return model_ropes(rotary, loaded.num_layers) if rotary is not None else None


def _rope_inv_freq(ropes) -> np.ndarray | None:
    """A profile's ``rope_inv_freq``: one table when every layer shares it, else one per layer."""
    if ropes is None:
        return None
    tables = np.stack([rope.inv_freq for rope in ropes]).astype(np.float32)
    return tables[0] if np.all(tables == tables[0]) else tables


def combine(parts: list[Sensitivity]) -> tuple[np.ndarray, float]:
    """Average normalised weights; return them and the step scale.

    The step scale makes ``lambda`` read as the geometric mean of step / RMS,
    so a lambda is comparable to the profile-less RMS rule.
    """
    weights = np.mean([p.weights / p.weights.sum() for p in parts], axis=0)
    rms = np.exp(np.mean([np.log(np.maximum(p.rms, 1e-12)) for p in parts], axis=0))
    step_scale = float(np.exp(np.mean(np.log(rms * np.sqrt(np.maximum(weights, 1e-30))))))
    return weights, step_scale


def combine_key_metrics(parts: list[Sensitivity]) -> np.ndarray | None:
    """The texts' key metrics, each layer's normalised to unit trace per text, averaged
    (None if any text has none)."""
    if any(p.key_metric is None for p in parts):
        return None
    norm = [p.key_metric / np.maximum(np.trace(p.key_metric, axis1=1, axis2=2), 1e-300)[:, None, None]
            for p in parts]
    return np.mean(norm, axis=0)


def bisect_lambda(score, floor: tuple[float, float], lo: float = 0.02, hi: float = 4.0, steps: int = 7) -> float:
    """Largest lambda in [lo, hi] for which ``score(lambda)`` meets ``floor`` (log bisection)."""
    max_ppl, min_agree = floor

    def ok(lam: float) -> bool:
        results = score(lam)
        return all(abs(r.ppl_change_pct) <= max_ppl and r.agree_pct >= min_agree for r in results)

    if not ok(lo):
        return lo
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@dataclass
class RateDistortion:
    """Measured curves of every (layer, keys/values) group.

    Attributes:
        multipliers: float64 ``[M]`` steps as multiples of ``reference`` (a lambda).
        bits: float64 ``[M, layers, 2]`` bits per element of the group's substreams (mean over texts).
        kl: float64 ``[M, layers, 2]`` output KL with only that group reconstructed (sum over texts).
    """

    multipliers: np.ndarray
    bits: np.ndarray
    kl: np.ndarray
    reference: float = RD_REFERENCE_LAMBDA

    def to_json(self) -> dict:
        return {"reference_lambda": self.reference, "multipliers": self.multipliers.tolist(), "bits": np.round(self.bits, 6).tolist(),
                "kl": [[[float(f"{x:.6g}") for x in kv] for kv in layer] for layer in self.kl]}

    @classmethod
    def from_json(cls, body: dict, layers: int) -> RateDistortion:
        """Curves stored in a profile's calibration record; raises InvalidInput if malformed."""
        from kvcodec.codec.errors import InvalidInput

        try:
            rd = cls(*(np.asarray(body[k], dtype=np.float64) for k in ("multipliers", "bits", "kl")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"rate_distortion: bad or missing field ({exc})") from None
        rd.reference = float(body.get("reference_lambda", RD_REFERENCE_LAMBDA))
        shape = (len(rd.multipliers), layers, 2)
        if rd.bits.shape != shape or rd.kl.shape != shape or np.any(rd.multipliers <= 0):
            raise InvalidInput(f"rate_distortion: curves of shape {rd.bits.shape}, {rd.kl.shape} != {shape}")
        return rd

    def refined(self, per_octave: int = RD_FINE) -> RateDistortion:
        """The curves on a ladder ``per_octave`` times finer (linear in log step; KL in log KL)."""
        lm = np.log2(self.multipliers)
        fine = np.arange(lm[0], lm[-1] + 1e-9, 1.0 / per_octave)
        logkl = np.log(np.maximum(self.kl, 1e-12))

        def interp(y: np.ndarray) -> np.ndarray:
            flat = y.reshape(len(lm), -1)
            out = np.stack([np.interp(fine, lm, flat[:, j]) for j in range(flat.shape[1])], axis=1)
            return out.reshape(len(fine), *y.shape[1:])

        return RateDistortion(2.0**fine, interp(self.bits), np.exp(interp(logkl)), self.reference)

    def allocate(self, mu: float) -> np.ndarray:
        """Step multiplier ``[layers, 2]`` of each group minimising ``KL + mu * bits``."""
        return self.multipliers[np.argmin(self.kl + mu * self.bits, axis=0)]


def measure_rate_distortion(probes, kvs, profile, model: str, log=print) -> RateDistortion:
    """Measure :class:`RateDistortion` curves on the calibration probes (see the module docstring)."""
    from kvcodec.codec import container
    from kvcodec.codec.api import decode, encode

    mults = np.asarray(RD_MULTIPLIERS)
    layers = profile.layers
    bits = np.zeros((len(mults), layers, 2))
    kl = np.zeros((len(mults), layers, 2))
    for i, m in enumerate(mults):
        # the profile's weights and transform with one uniform step multiplier (no allocation)
        trial = replace(profile, levels={"balanced": RD_REFERENCE_LAMBDA * m}, allocation={}, side_priors={})
        for probe, (k, v) in zip(probes, kvs):
            blob = encode(k, v, level="balanced", model=model, profile=trial)
            layout = container.parse(blob)
            h = layout.header
            per_group = k[0].numel()
            kv = decode(blob, profile=trial)
            for layer in range(layers):
                for kind in range(2):
                    size = sum(layout.lengths[h.substream_id(layer, bool(kind), b)] for b in range(h.blocks_per_tensor))
                    bits[i, layer, kind] += 8 * size / per_group / len(probes)
                    keys, values = probe.exact_kv
                    if kind:
                        values[layer] = kv.values[layer]
                    else:
                        keys[layer] = kv.keys[layer]
                    kl[i, layer, kind] += probe.score(keys, values).kl_mean
        log(f"  rate-distortion: step x{RD_REFERENCE_LAMBDA * m:.4f}: {bits[i].mean():.3f} bits/element, "
            f"summed group KL {kl[i].sum():.5f}")
    return RateDistortion(mults, bits, kl)


def fit_side_priors(profile, kvs, model: str) -> dict[str, dict[str, np.ndarray]]:
    """Each level's side-information prior (:mod:`kvcodec.codec.sideprior`): the classes and
    centres the calibration KV ``kvs`` gets at the level's steps, per (layer, keys/values),
    pooled over every substream with at least half a block of quantized tokens."""
    from kvcodec.codec import container, substream
    from kvcodec.codec.api import encode
    from kvcodec.codec.sideprior import fit_prior

    plain = replace(profile, side_priors={})
    shape = (profile.layers, 2)
    out = {}
    for level in sorted(plain.levels):
        samples = {}
        for k, v in kvs:
            blob = encode(k, v, level=level, model=model, profile=plain)
            layout = container.parse(blob)
            h = layout.header
            for sid in range(h.n_substreams):
                block = sid % h.blocks_per_tensor
                n_raw, tokens = h.block_raw_tokens(block), h.block_tokens(block)
                if 2 * (tokens - n_raw) < h.token_block and h.blocks_per_tensor > 1:
                    continue
                _, rest = substream.split_raw(container.substream(blob, layout, sid), h.kv_heads, tokens, h.head_dim,
                                              k.dtype, n_raw, h.coder, h.packed_side)
                p = substream.parse_rans(rest, h.kv_heads, h.head_dim, h.packed_side)
                group = samples.setdefault(divmod(sid // h.blocks_per_tensor, 2), ([], [], []))
                for values, value in zip(group, (p.steps, p.classes, p.centers)):
                    values.append(value)
        priors = {at: fit_prior(*group) for at, group in samples.items()}
        out[level] = {
            "steps": np.stack([priors[at].steps for at in np.ndindex(shape)]).reshape(*shape, -1),
            "classes": np.stack([priors[at].classes for at in np.ndindex(shape)]).reshape(*shape, -1).astype(np.uint8),
            "centres": np.stack([priors[at].centres for at in np.ndindex(shape)]).reshape(*shape, -1).astype(np.int16),
        }
    return out


def fit_prediction(profile, kvs, level: str = "balanced") -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The profile's prediction maps (:mod:`kvcodec.codec.predict`): for every (layer,
    keys/values), the least-squares map from its sources' symbols to its own, on the
    calibration KV ``kvs`` quantized at ``level``'s steps block by block as the encoder
    quantizes them. Returns ``((keys int16 [L, C, 2C], values int16 [L, C, 3C]), shifts [L, 2])``."""
    from kvcodec.codec import predict, substream
    from kvcodec.codec.api import DEFAULT_TOKEN_BLOCK, _step_rule
    from kvcodec.codec.levels import get_level

    lv = get_level(level)
    blocks = []
    for k, v in kvs:
        tokens = k.shape[2]
        for start in range(0, tokens, DEFAULT_TOKEN_BLOCK):
            n_raw = max(0, min(DEFAULT_TOKEN_BLOCK, profile.sink_tokens - start))
            if min(tokens - start, DEFAULT_TOKEN_BLOCK) - n_raw < 2:
                continue
            block = []
            for layer in range(profile.layers):
                for is_value, x in ((False, k), (True, v)):
                    _, q = substream.transform_symbols(
                        x[layer, :, start : start + DEFAULT_TOKEN_BLOCK], _step_rule(lv, profile, layer, is_value),
                        n_raw, profile.transform(layer, is_value), start + n_raw,
                        bool(predict.sources(layer, is_value)))
                    block.append(q.transpose(1, 0, 2).reshape(q.shape[1], -1))  # token-major [T, C]
            blocks.append(np.stack(block).astype(np.float64).reshape(profile.layers, 2, *block[0].shape))
    keys, values = predict.fit_maps(blocks)
    (keys, key_shifts), (values, value_shifts) = predict.to_int(keys), predict.to_int(values)
    return (keys, values), np.stack([key_shifts, value_shifts], axis=1)


PREDICTION_MIN_SAVING = 0.05  # a level keeps its maps (~15 MB of profile for SmolLM2) only if they save this much


def fit_predictions(profile, kvs, model: str, log=print) -> dict:
    """Each level's prediction maps (:func:`fit_prediction`), kept for the levels whose streams
    of the calibration KV ``kvs`` they make at least :data:`PREDICTION_MIN_SAVING` smaller (on
    SmolLM2 compact's are not: its coarse steps leave little to predict)."""
    from kvcodec.codec.api import encode
    from kvcodec.codec.predict import Maps

    plain = replace(profile, prediction={})
    kept = {}
    for level in sorted(profile.levels):
        maps, shifts = fit_prediction(profile, kvs, level)
        trial = replace(profile, prediction={level: Maps(*maps, shifts)})
        ours = sum(len(encode(k, v, level=level, model=model, profile=trial)) for k, v in kvs)
        theirs = sum(len(encode(k, v, level=level, model=model, profile=plain)) for k, v in kvs)
        log(f"  prediction at {level}: calibration streams {100 * (ours / theirs - 1):+.1f}%")
        if ours <= (1 - PREDICTION_MIN_SAVING) * theirs:
            kept[level] = trial.prediction[level]
    return kept


TRANSFORMS = ("mixed", "head", "layer", "rope", "none")


def calibrate(loaded, texts: list[str], *, prefix_len: int = 1536, eval_len: int = 512,
              levels: dict[str, tuple[float, float]] | None = None,
              fixed: dict[str, float] | None = None, slopes: dict[str, float] | None = None,
              transform: str = "mixed", allocation: str = "measured", retune=None, prediction: bool = True,
              shape: bool = True, shape_texts: list[str] | None = None, log=print):
    """Build a :class:`~kvcodec.codec.profile.Profile` for ``loaded`` from ``texts``.

    Args:
        levels: quality floor per level to bisect lambda against (default LEVEL_FLOORS).
        fixed: lambdas to take as given instead of bisecting (e.g. from an earlier run).
        slopes: rate-distortion slopes to take as given (measured allocation) instead of bisecting.
        transform: ``mixed`` (keys: one basis across a layer's heads, in the sensitivity-weighted
            domain and shaped by the keys' gradient metric unless ``shape`` is False
            (:func:`~kvcodec.codec.transform.fit_shaped_bases`); values: one per kv head),
            ``head`` (a basis per kv head), ``layer`` (one across
            a layer's heads for both), ``rope`` (keys before RoPE, no basis: part of the keys' gain
            at little decode cost) or ``none``.
        allocation: ``measured`` (per-group steps from measured rate-distortion curves, the
            level's slope bisected) or ``fisher`` (steps from the Fisher weights alone, the
            level's lambda bisected). Levels in ``fixed`` get no allocation.
        shape_texts: texts to measure the keys' metric on (default: ``texts``). Other texts
            than the curves' keep the curves honest: measured on the metric's own texts, the
            keys' KL looks smaller than it is on other text, and the allocation starves them.
    """
    from kvcodec.client.model import tokenize_file

    ids = [tokenize_file(loaded, t, prefix_len + eval_len) for t in texts]
    shape_ids = None if not shape_texts else [tokenize_file(loaded, t, prefix_len + eval_len) for t in shape_texts]
    return calibrate_tokens(loaded, ids, [str(t) for t in texts], prefix_len=prefix_len, eval_len=eval_len,
                            levels=levels, fixed=fixed, slopes=slopes, transform=transform,
                            allocation=allocation, retune=retune, prediction=prediction, shape=shape,
                            shape_ids=shape_ids, shape_names=[str(t) for t in shape_texts or []], log=log)


def calibrate_tokens(loaded, ids: list[list[int]], names: list[str], *, prefix_len: int = 1536,
                     eval_len: int = 512, levels: dict[str, tuple[float, float]] | None = None,
                     fixed: dict[str, float] | None = None, slopes: dict[str, float] | None = None,
                     transform: str = "mixed", allocation: str = "measured", retune=None, prediction: bool = True,
                     shape: bool = True, shape_ids: list[list[int]] | None = None,
                     shape_names: list[str] | None = None, log=print):
    """:func:`calibrate` on token sequences (``names``: what the profile records as its texts).

    With ``retune`` (a profile calibrated with ``allocation="measured"``), its weights, transform
    and stored rate-distortion curves are kept and only the levels are searched again (for
    other floors or texts): minutes instead of the curves' half hour.
    """
    fixed, slopes = dict(fixed or {}), dict(slopes or {})

    import copy

    from kvcodec.client.quality import QualityProbe
    from kvcodec.codec.api import decode, encode
    from kvcodec.codec.errors import InvalidInput

    levels = LEVEL_FLOORS if levels is None else levels
    probes = [QualityProbe(loaded, tok, prefix_len, eval_len) for tok in ids]
    kvs = [tuple(t.half() for t in p.exact_kv) for p in probes]
    if retune is not None:
        if allocation != "measured":
            raise InvalidInput(f"retune: needs allocation 'measured', not {allocation!r}")
        if not retune.calibration.get("rate_distortion"):
            raise InvalidInput("retune: the profile holds no measured rate-distortion curves")
        profile = copy.deepcopy(retune)
        profile.side_priors = {}  # fitted again below, at the new levels' steps
        profile.prediction = {}  # likewise
        profile.allocation = {lv: a for lv, a in profile.allocation.items() if lv not in levels and lv not in slopes}
        profile.levels = {lv: lam for lv, lam in profile.levels.items() if lv not in levels and lv not in slopes}
        profile.calibration.update({"retuned_on": list(names), "prefix_len": prefix_len, "eval_len": eval_len})
    else:
        profile = _fit(loaded, ids, names, probes, kvs, prefix_len, eval_len, transform,
                       (shape_ids or ids, shape_names or names) if shape else None, log)
    layers = profile.layers
    profile.levels.update(fixed)
    todo = {level: floor for level, floor in levels.items() if level not in fixed and level not in slopes}
    rd = None
    if retune is not None:
        rd = RateDistortion.from_json(profile.calibration["rate_distortion"], layers).refined()
    elif allocation == "measured" and (todo or slopes):
        log(f"rate-distortion curves: {len(RD_MULTIPLIERS)} steps x {layers * 2} groups x {len(probes)} texts")
        measured = measure_rate_distortion(probes, kvs, profile, loaded.name, log)
        profile.calibration["allocation"] = "measured"
        profile.calibration["rate_distortion"] = measured.to_json()
        rd = measured.refined()

    given = dict(slopes)  # recorded as such in the profile
    if slopes and rd is None:
        raise InvalidInput("slopes: need the measured allocation's rate-distortion curves (allocation 'measured')")

    def use_slope(level: str, mu: float) -> None:
        profile.levels[level] = rd.reference
        profile.allocation[level] = rd.allocate(mu)
        profile.calibration.setdefault("slopes", {})[level] = mu

    def run(level: str) -> list:
        out = []
        for probe, (k, v) in zip(probes, kvs):
            kv = decode(encode(k, v, level=level, model=loaded.name, profile=profile), profile=profile)
            out.append(probe.score(kv.keys, kv.values))
        return out

    for level, floor in todo.items():
        if rd is None:

            def score(lam: float, level=level):
                profile.levels[level] = lam
                out = run(level)
                log(f"  {level} lambda {lam:.4f}: {_worst(out)}")
                return out

            profile.levels[level] = bisect_lambda(score, floor)
            log(f"{level}: lambda {profile.levels[level]:.4f}")
            continue

        def score_mu(mu: float, level=level):
            use_slope(level, mu)
            out = run(level)
            log(f"  {level} slope {mu:.3g}: {_worst(out)}")
            return out

        slopes[level] = bisect_lambda(score_mu, floor, lo=1e-8, hi=1e-1, steps=12)
    for level, mu in slopes.items():
        use_slope(level, mu)
        if level in given:
            profile.calibration.setdefault("slopes_given", {})[level] = mu
        log(f"{level}: slope {mu:.3g}, step multipliers {profile.allocation[level].min():.3g}"
            f"..{profile.allocation[level].max():.3g}")
    if profile.has_transform and prediction:
        profile.prediction = fit_predictions(profile, kvs, loaded.name, log)
        log(f"prediction: {', '.join(sorted(profile.prediction)) or 'no level'}")
    if profile.has_transform:
        profile.side_priors = fit_side_priors(profile, kvs, loaded.name)
        log(f"side-information priors: {', '.join(sorted(profile.side_priors))}")
    return profile


def _worst(results) -> str:
    """The worst perplexity change and greedy agreement over the calibration texts, for the log."""
    ppl = max((r.ppl_change_pct for r in results), key=abs)
    return f"worst ppl {ppl:+.3f}%, worst agree {min(r.agree_pct for r in results):.1f}%"


def _fit(loaded, ids, names, probes, kvs, prefix_len: int, eval_len: int, transform: str, shape, log):
    """Sensitivity weights and (unless ``transform`` is ``none``) the transform of a new profile;
    ``shape``: ``(token ids, names)`` of the texts to measure the keys' metric on, or None."""
    from kvcodec.client.quality import QualityProbe
    from kvcodec.codec.profile import Profile

    parts = []
    for path, probe in zip(names, probes):
        log(f"sensitivity: {path}")
        parts.append(measure_sensitivity(probe))
    weights, step_scale = combine(parts)
    cfg = loaded.config
    layers, heads = weights.shape[0], weights.shape[2]
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    profile = Profile(loaded.name, layers, heads, dim, weights, {}, 1, step_scale,
                      {"texts": list(names), "prefix_len": prefix_len, "eval_len": eval_len})
    if transform != "none":
        from kvcodec.codec.transform import block_diagonal, fit_bases, fit_shaped_bases, identity_bases

        rope = _model_ropes(loaded)
        group = dim if transform == "head" else heads * dim
        what = {"rope": "no basis", "mixed": f"keys: KLT per layer ({group} channels), values: KLT per head"}.get(
            transform, f"KLT per {transform} ({group} channels)")
        log(f"transform: {what}, keys {'before RoPE' if rope else 'as cached'}")
        if transform == "rope":
            if rope is None:
                from kvcodec.codec.errors import InvalidInput

                raise InvalidInput("--transform rope: the model's RoPE cannot be removed exactly (scaled or dynamic)")
            profile.bases = identity_bases(layers, heads * dim, dim)
        elif transform == "mixed":  # values' per-head bases stored block-diagonally in the layer-wide group
            profile.bases = fit_bases(kvs, weights, group, rope)
            profile.bases[:, 1] = block_diagonal(fit_bases(kvs, weights, dim, rope)[:, 1], group)
            metric = None
            if shape is not None:
                shape_ids, shape_names = shape
                shape_parts = parts
                if shape_ids is not ids:
                    shape_parts = []
                    for path, tok in zip(shape_names, shape_ids):
                        log(f"key metric: {path}")
                        shape_parts.append(measure_sensitivity(QualityProbe(loaded, tok, prefix_len, eval_len)))
                metric = combine_key_metrics(shape_parts)
            if metric is not None:
                log("transform: keys shaped by their gradient metric")
                keys, analysis = fit_shaped_bases(kvs, weights, metric, 0, rope)
                profile.bases[:, 0] = keys
                profile.analysis = profile.bases.astype(np.int32)
                profile.analysis[:, 0] = analysis
                profile.calibration["shape"] = "keys"
                profile.calibration["shape_texts"] = list(shape[1])
        else:
            profile.bases = fit_bases(kvs, weights, group, rope)
        profile.rope_inv_freq = _rope_inv_freq(rope)
        profile.calibration["transform"] = transform
    return profile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure a model's KV sensitivity and write a codec profile",
        description=__doc__.split("Example::")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model name (smollm2-135m, gemma3-270m), GGUF file or transformers directory "
                                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", action="append", required=True, help="calibration text (repeatable)")
    p.add_argument("--out", required=True, help="profile file to write (.json)")
    p.add_argument("--prefix", type=int, default=1536, help="prefix tokens (default: %(default)s)")
    p.add_argument("--eval", type=int, default=512, help="scored tokens (default: %(default)s)")
    p.add_argument("--transform", choices=TRANSFORMS, default="mixed",
                   help="keys: KLT across a layer's heads, values: per kv head (default); per kv head KLT; "
                        "per layer KLT; rope (keys before RoPE only); or none")
    p.add_argument("--no-shape", dest="shape", action="store_false",
                   help="with --transform mixed, keep the keys' basis orthonormal instead of shaping their error "
                        "by the measured gradient metric (on SmolLM2 shaping takes 0.25-0.6 bits off each key "
                        "element at equal KL)")
    p.add_argument("--shape-text", dest="shape_texts", action="append", default=[],
                   help="text to measure the keys' metric on (repeatable; default: the --text files). Texts "
                        "other than --text keep the measured curves honest about what shaping buys")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="measured",
                   help="per-group steps from measured rate-distortion curves (default; about 30 minutes "
                        "for two texts on 2 CPU cores) or from the Fisher weights alone")
    p.add_argument("--floor", action="append", default=[], metavar="LEVEL=PPL,AGREE",
                   help="quality floor a level must meet on every calibration text: max |perplexity change| %% "
                        "and min greedy agreement %% (defaults: "
                        + ", ".join(f"{k}={a},{b}" for k, (a, b) in LEVEL_FLOORS.items()) + ")")
    p.add_argument("--retune", metavar="PROFILE",
                   help="keep this profile's weights, transform and measured curves; search only the levels "
                        "(those given by --floor, else all) against --text")
    p.add_argument("--no-prediction", dest="prediction", action="store_false",
                   help="do not fit the maps that predict each layer's keys and values from the symbols "
                        "decoded before them (with a transform, streams code the differences: on SmolLM2 "
                        "16-19%% fewer bits at high and balanced, 8-9%% at compact; the maps add ~15 MB per "
                        "level to the profile, and decoding is about half as fast)")
    p.add_argument("--alias", action="append", default=[], help="other model names the profile applies to")
    p.add_argument("--lambda", dest="lambdas", action="append", default=[], metavar="LEVEL=VALUE",
                   help="use this step multiplier for a level instead of searching for it (no allocation)")
    p.add_argument("--slope", dest="slopes", action="append", default=[], metavar="LEVEL=MU",
                   help="use this rate-distortion slope for a level instead of searching for it "
                        "(measured allocation; e.g. one chosen by checking held-out texts)")
    p.set_defaults(func=cmd_calibrate)


def _level_numbers(items: list[str], flag: str) -> dict[str, float]:
    """``LEVEL=NUMBER`` options (``--lambda``, ``--slope``) as ``{level: number}``; UsageError if bad."""
    from kvcodec.cli import UsageError

    out = {}
    for item in items:
        level, _, value = item.partition("=")
        try:
            out[level] = float(value)
        except ValueError:
            raise UsageError(f"{flag}: {item!r} is not LEVEL=NUMBER") from None
        if level not in LEVEL_FLOORS or not math.isfinite(out[level]) or out[level] <= 0:
            raise UsageError(f"{flag}: {item!r}: level must be one of {', '.join(LEVEL_FLOORS)}, value > 0")
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvcodec.cli import UsageError
    from kvcodec.client.model import ModelError, load_model

    for flag, texts in (("--text", args.text), ("--shape-text", args.shape_texts)):
        for t in texts:
            if not Path(t).is_file():
                raise UsageError(f"{flag}: {t}: no such file")
    if args.shape_texts and (not args.shape or args.transform != "mixed" or args.retune):
        raise UsageError("--shape-text: only shapes a new profile's keys (--transform mixed, without --no-shape "
                         "or --retune)")
    fixed, slopes = _level_numbers(args.lambdas, "--lambda"), _level_numbers(args.slopes, "--slope")
    if slopes and args.allocation != "measured":
        raise UsageError("--slope: needs --allocation measured")
    floors = {}
    for item in args.floor:
        level, _, value = item.partition("=")
        try:
            ppl, agree = (float(x) for x in value.split(","))
        except ValueError:
            raise UsageError(f"--floor: {item!r} is not LEVEL=PPL,AGREE (e.g. balanced=0.5,96)") from None
        if level not in LEVEL_FLOORS or ppl <= 0 or not 0 < agree <= 100:
            raise UsageError(f"--floor: {item!r}: level must be one of {', '.join(LEVEL_FLOORS)}, "
                             "0 < PPL, 0 < AGREE <= 100")
        floors[level] = (ppl, agree)
    retune = None
    if args.retune:
        from kvcodec.codec.errors import KVCodecError
        from kvcodec.codec.profile import load_profile

        try:
            retune = load_profile(args.retune)
        except KVCodecError as exc:
            raise UsageError(f"--retune: {exc}") from None
        if not retune.calibration.get("rate_distortion"):
            raise UsageError(f"--retune: {args.retune} holds no measured rate-distortion curves "
                             "(calibrated with --allocation fisher or by an older kvcodec)")
    levels = floors if (retune is not None and (floors or slopes)) else {**LEVEL_FLOORS, **floors}
    levels = {level: floor for level, floor in levels.items() if level not in slopes}
    try:
        loaded = load_model(args.model)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    if retune is not None and not retune.matches(loaded.num_layers, loaded.num_kv_heads, loaded.head_dim):
        raise UsageError(f"--retune: {args.retune} is for {retune.layers} layers x {retune.kv_heads} kv heads x "
                         f"{retune.head_dim}, the model has {loaded.num_layers} x {loaded.num_kv_heads} x {loaded.head_dim}")
    profile = calibrate(loaded, args.text, prefix_len=args.prefix, eval_len=args.eval, levels=levels, fixed=fixed,
                        slopes=slopes, transform=args.transform, allocation=args.allocation, retune=retune,
                        prediction=args.prediction, shape=args.shape, shape_texts=args.shape_texts,
                        log=lambda m: print(m, file=sys.stderr))
    if args.alias or retune is None:
        profile.calibration["aliases"] = args.alias
    profile.save(args.out)
    print(f"{args.out}: profile for {profile.model}, sha256 {profile.digest.hex()}")
    return 0
