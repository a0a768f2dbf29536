"""``kvcodec calibrate``: measure a model's KV sensitivity and write a codec profile.

Two steps (see :mod:`kvcodec.codec.profile` for the theory):

1. *Sensitivity.* For each calibration text, prefill a prefix, then score the
   following tokens attending to that prefix's KV with gradients enabled; the
   mean squared gradient of the loss over each (layer, keys/values, kv head)
   is its Fisher weight. Texts are normalised to equal total weight and
   averaged; sink tokens are excluded (they are stored raw).
2. *Transform* (``--transform head``, the default). Fit one basis per (layer,
   keys/values, kv head): the KLT of the calibration KV, keys taken before RoPE
   (see :mod:`kvcodec.codec.transform`). Streams coded with it need the profile
   to decode; ``--transform none`` writes a profile that only sets steps.
3. *Levels.* For each lossy level, bisect (in log space) the largest step
   multiplier ``lambda`` whose reconstruction still meets the level's quality
   floor on the calibration texts (perplexity change and greedy agreement,
   scored with :class:`kvcodec.client.quality.QualityProbe`).

Example::

    kvcodec calibrate --text /usr/share/common-licenses/Apache-2.0 --out smollm2.json
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np

# Quality floors per level used when bisecting lambda: (max |ppl change| %, min greedy agreement %).
# Tighter than the targets so they hold on texts other than the calibration text.
LEVEL_FLOORS = {"high": (0.05, 99.3), "balanced": (0.4, 96.5), "compact": (2.5, 89.0)}


@dataclass
class Sensitivity:
    weights: np.ndarray  # [layers, 2, heads] mean squared gradient
    rms: np.ndarray      # [layers, 2, heads] RMS of the KV, for normalising steps


def measure_sensitivity(loaded, token_ids: list[int], prefix_len: int, eval_len: int, sink: int = 1) -> Sensitivity:
    """Fisher weights of one text's prefix KV (sink tokens excluded)."""
    import torch

    from kvcodec.client.hf_bridge import kv_to_cache
    from kvcodec.client.model import prefill

    keys, values = prefill(loaded, token_ids[:prefix_len])
    keys = keys.detach().clone().requires_grad_(True)
    values = values.detach().clone().requires_grad_(True)
    ev = torch.tensor([token_ids[prefix_len : prefix_len + eval_len]])
    with torch.enable_grad():
        cache = kv_to_cache(keys, values, loaded.config)
        out = loaded.model(input_ids=ev, past_key_values=cache, use_cache=True)
        loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ev[0, 1:], reduction="sum")
        loss.backward()
    w = torch.stack([(keys.grad[:, :, sink:] ** 2).mean((2, 3)), (values.grad[:, :, sink:] ** 2).mean((2, 3))], 1)
    kv = torch.stack([keys.detach()[:, :, sink:], values.detach()[:, :, sink:]], 1)
    rms = (kv - kv.mean(3, keepdim=True)).pow(2).mean((3, 4)).sqrt()
    return Sensitivity(w.double().numpy(), rms.double().numpy())


def combine(parts: list[Sensitivity]) -> tuple[np.ndarray, float]:
    """Average normalised weights; return them and the step scale.

    The step scale makes ``lambda`` read as the geometric mean of step / RMS,
    so a lambda is comparable to the profile-less RMS rule.
    """
    weights = np.mean([p.weights / p.weights.sum() for p in parts], axis=0)
    rms = np.exp(np.mean([np.log(np.maximum(p.rms, 1e-12)) for p in parts], axis=0))
    step_scale = float(np.exp(np.mean(np.log(rms * np.sqrt(np.maximum(weights, 1e-30))))))
    return weights, step_scale


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


TRANSFORMS = ("head", "layer", "rope", "none")


def calibrate(loaded, texts: list[str], *, prefix_len: int = 1536, eval_len: int = 512,
              levels: dict[str, tuple[float, float]] | None = None,
              fixed: dict[str, float] | None = None, transform: str = "head", log=print):
    """Build a :class:`~kvcodec.codec.profile.Profile` for ``loaded`` from ``texts``.

    Args:
        levels: quality floor per level to bisect lambda against (default LEVEL_FLOORS).
        fixed: lambdas to take as given instead of bisecting (e.g. from an earlier run).
        transform: ``head`` (a basis per kv head), ``layer`` (one across a layer's heads,
            in the sensitivity-weighted domain), ``rope`` (keys before RoPE, no basis: most of
            the keys' gain at little decode cost) or ``none``.
    """
    fixed = dict(fixed or {})

    from kvcodec.client.model import tokenize_file
    from kvcodec.client.quality import QualityProbe
    from kvcodec.codec.api import decode, encode
    from kvcodec.codec.profile import Profile

    levels = levels or LEVEL_FLOORS
    ids = [tokenize_file(loaded, t, prefix_len + eval_len) for t in texts]
    parts = []
    for path, tok in zip(texts, ids):
        log(f"sensitivity: {path}")
        parts.append(measure_sensitivity(loaded, tok, prefix_len, eval_len))
    weights, step_scale = combine(parts)
    cfg = loaded.config
    layers, heads = weights.shape[0], weights.shape[2]
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    profile = Profile(loaded.name, layers, heads, dim, weights, {}, 1, step_scale,
                      {"texts": [str(t) for t in texts], "prefix_len": prefix_len, "eval_len": eval_len})
    probes = [QualityProbe(loaded, tok, prefix_len, eval_len) for tok in ids]
    kvs = [tuple(t.half() for t in p.exact_kv) for p in probes]
    if transform != "none":
        from kvcodec.codec.transform import fit_bases, identity_bases, model_rope

        rotary = getattr(getattr(loaded.model, "model", None), "rotary_emb", None)
        rope = model_rope(rotary) if rotary is not None else None
        group = dim if transform == "head" else heads * dim
        what = "no basis" if transform == "rope" else f"KLT per {transform} ({group} channels)"
        log(f"transform: {what}, keys {'before RoPE' if rope else 'as cached'}")
        if transform == "rope":
            if rope is None:
                from kvcodec.codec.errors import InvalidInput

                raise InvalidInput("--transform rope: the model's RoPE cannot be removed exactly (scaled or dynamic)")
            profile.bases = identity_bases(layers, heads * dim, dim)
        else:
            profile.bases = fit_bases(kvs, weights, group, rope)
        profile.rope_inv_freq = None if rope is None else rope.inv_freq
        profile.calibration["transform"] = transform
    profile.levels.update(fixed)
    for level, floor in levels.items():
        if level in fixed:
            continue

        def score(lam: float, level=level):
            profile.levels[level] = lam
            out = []
            for probe, (k, v) in zip(probes, kvs):
                kv = decode(encode(k, v, level=level, model=loaded.name, profile=profile), profile=profile)
                out.append(probe.score(kv.keys, kv.values))
            r = out[0]
            log(f"  {level} lambda {lam:.4f}: ppl {r.ppl_change_pct:+.3f}% agree {r.agree_pct:.1f}%")
            return out

        profile.levels[level] = bisect_lambda(score, floor)
        log(f"{level}: lambda {profile.levels[level]:.4f}")
    return profile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure a model's KV sensitivity and write a codec profile",
        description=__doc__.split("Example::")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="GGUF file or transformers directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", action="append", required=True, help="calibration text (repeatable)")
    p.add_argument("--out", required=True, help="profile file to write (.json)")
    p.add_argument("--prefix", type=int, default=1536, help="prefix tokens (default: %(default)s)")
    p.add_argument("--eval", type=int, default=512, help="scored tokens (default: %(default)s)")
    p.add_argument("--transform", choices=TRANSFORMS, default="head",
                   help="per kv head KLT (default), per layer KLT, rope (keys before RoPE only), or none")
    p.add_argument("--alias", action="append", default=[], help="other model names the profile applies to")
    p.add_argument("--lambda", dest="lambdas", action="append", default=[], metavar="LEVEL=VALUE",
                   help="use this step multiplier for a level instead of searching for it")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvcodec.cli import UsageError
    from kvcodec.client.model import ModelError, load_model

    for t in args.text:
        if not Path(t).is_file():
            raise UsageError(f"--text: {t}: no such file")
    fixed = {}
    for item in args.lambdas:
        level, _, value = item.partition("=")
        try:
            fixed[level] = float(value)
        except ValueError:
            raise UsageError(f"--lambda: {item!r} is not LEVEL=NUMBER") from None
        if level not in LEVEL_FLOORS or fixed[level] <= 0:
            raise UsageError(f"--lambda: {item!r}: level must be one of {', '.join(LEVEL_FLOORS)}, value > 0")
    try:
        loaded = load_model(args.model)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    profile = calibrate(loaded, args.text, prefix_len=args.prefix, eval_len=args.eval, fixed=fixed,
                        transform=args.transform, log=lambda m: print(m, file=sys.stderr))
    profile.calibration["aliases"] = args.alias
    profile.save(args.out)
    print(f"{args.out}: profile for {profile.model}, sha256 {profile.digest.hex()}")
    return 0
