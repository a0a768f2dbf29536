"""How many bits would predicting keys and values from already-decoded tensors save?

    python benchmarks/prediction_bench.py --fit /usr/share/common-licenses/GPL-3 \
        --text /usr/share/common-licenses/Apache-2.0 --text .../argparse.py

The measurement that led to header flag 8 (benchmarks/RESULTS.md, "Predicting from what is
already decoded"; the codec now does this, :mod:`kvcodec.codec.predict`, and its streams — the
"codec stream" column — are coded with it). A layer's keys and values are two projections of
the same hidden state, and neighbouring layers' hidden states differ by one residual update. For each level, linear maps (least squares,
ridge 1e-3) are fitted on ``--fit``'s KV — predictors: **the real codec's decoded keys and
values at that level**, so they carry its quantization noise; RoPE removed from keys; the
sink token left out — and applied to each ``--text``:

* *end to end*: each layer's values quantized in a PCA basis at the codec's effective value
  step for that layer (sqrt(12 x the decoded MSE)), directly or as the residual of the
  prediction from the same layer's decoded keys; the symbols coded by coder 3 in 256-token
  blocks (plus 2 bytes per channel and block for centre and class, the sink token raw); the
  model scores the codec's decoded keys with those values;
* *ideal entropy*: bits per KV element of the per-coordinate entropy at the codec's
  effective steps, with keys and values independent, values predicted from the layer's
  keys, and additionally keys predicted from the previous layer's keys and values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, markdown_table  # noqa: E402

from kvcodec.codec import container, decode, encode, entropy, rans  # noqa: E402
from kvcodec.codec import transform as tr  # noqa: E402
from kvcodec.codec.profile import builtin_profile  # noqa: E402

MODEL = "smollm2-135m"
LEVELS = ("high", "balanced")
BLOCK = 256


class Coded:
    """A text's KV, exact and as the codec at one level decodes it, as ``[layers, tokens, H * D]``
    float64 (keys without RoPE, the sink token dropped)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, level: str, rope: tr.Rope) -> None:
        blob = encode(keys.half(), values.half(), level=level, model=MODEL, threads=2)
        kv = decode(blob, dtype=torch.float32, threads=2)
        self.blob, self.decoded = blob, kv
        layers = keys.shape[0]

        def flat(x: torch.Tensor, unrotate: bool) -> torch.Tensor:
            if unrotate:
                x = torch.stack([tr.unrotate(x[i].float(), rope, 0) for i in range(layers)])
            return x.permute(0, 2, 1, 3).reshape(layers, x.shape[2], -1)[:, 1:].double()

        self.k, self.v = flat(keys, True), flat(values, False)
        self.kh, self.vh = flat(kv.keys, True), flat(kv.values, False)

    @classmethod
    def joined(cls, parts: list[Coded]) -> Coded:
        """Several texts' tensors as one (tokens after tokens): what the maps are fitted on."""
        if len(parts) == 1:
            return parts[0]
        out = cls.__new__(cls)
        for name in ("k", "v", "kh", "vh"):
            setattr(out, name, torch.cat([getattr(p, name) for p in parts], dim=1))
        return out

    def bits(self) -> float:
        return 8 * len(self.blob) / (2 * self.decoded.keys.numel())

    def step(self, layer: int, values: bool) -> float:
        """The codec's effective uniform step for a (layer, keys/values): sqrt(12 x decoded MSE)."""
        exact, decoded = (self.v, self.vh) if values else (self.k, self.kh)
        return float(12 * (decoded[layer] - exact[layer]).pow(2).mean()) ** 0.5


class Predictor:
    """``y ~ mean + (x - x_mean) @ A``, fitted by ridge regression (reduced to rank
    :attr:`rank` if set: ``A`` projected on the top right singular vectors of the fitted
    predictions); ``x`` None: the mean alone. ``basis``: the PCA basis of the fit's residual."""

    rank: int | None = None

    def __init__(self, y: torch.Tensor, x: torch.Tensor | None) -> None:
        self.y_mean = y.mean(0)
        resid = y - self.y_mean
        self.x_mean = self.a = None
        if x is not None:
            self.x_mean = x.mean(0)
            xc = x - self.x_mean
            ridge = 1e-3 * xc.pow(2).sum() / xc.shape[1]
            self.a = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(xc.shape[1], dtype=xc.dtype), xc.T @ resid)
            if self.rank is not None and self.rank < min(self.a.shape):
                top = torch.linalg.svd(xc @ self.a, full_matrices=False)[2][: self.rank]  # [rank, C_y]
                self.a = self.a @ top.T @ top
            resid = resid - xc @ self.a
        self.basis = torch.linalg.eigh(resid.T @ resid)[1]

    def predict(self, n: int, x: torch.Tensor | None) -> torch.Tensor:
        if self.a is None:
            return self.y_mean.expand(n, -1)
        return self.y_mean + (x - self.x_mean) @ self.a


def ideal_bits(z: torch.Tensor, step: float) -> float:
    """Per-coordinate entropy (bits per element) of ``z`` ``[T, C]`` rounded to ``step``."""
    q = torch.round(z / step).long()
    total = 0.0
    for c in range(q.shape[1]):
        counts = torch.unique(q[:, c], return_counts=True)[1].double()
        p = counts / counts.sum()
        total -= float((p * torch.log2(p)).sum())
    return total / q.shape[1]


def coder3_bits(symbols: torch.Tensor) -> int:
    """Bits of integer ``symbols`` ``[T, C]`` coded by coder 3 in 256-token blocks, plus 2 bytes
    per channel and block for its centre and class."""
    total = 0
    for s in range(0, symbols.shape[0], BLOCK):
        block = symbols[s : s + BLOCK].numpy().astype(np.int32)[None]  # [1, T, C]
        _, deltas, kmax, abs_sums = rans.channel_deltas(block)
        words, escapes = rans.encode_deltas(deltas, entropy.scale_classes(abs_sums, kmax, block.shape[1]))
        total += 2 * (len(words) + len(escapes)) + 2 * block.shape[2]
    return 8 * total


def values_end_to_end(fit: Coded, test: Coded, predict: bool) -> tuple[torch.Tensor, float]:
    """``test``'s values through a PCA quantizer at the codec's value steps, from the decoded
    keys or not: the values ``[layers, tokens, H * D]`` (sink token excluded) and bits per
    value element."""
    out, bits = torch.empty_like(test.v), 0
    for layer in range(test.v.shape[0]):
        p = Predictor(fit.v[layer], fit.kh[layer] if predict else None)
        guess = p.predict(test.v.shape[1], test.kh[layer] if predict else None)
        step = test.step(layer, True)
        q = torch.round(((test.v[layer] - guess) @ p.basis) / step)
        out[layer] = guess + (q * step) @ p.basis.T
        bits += coder3_bits(q.long())
    return out, bits / test.v.numel()


def ideal_rates(fit: Coded, test: Coded) -> tuple[float, float, float]:
    """Bits per KV element (ideal entropy): independent, values from keys, and the chain."""
    sums = np.zeros(3)
    for layer in range(test.k.shape[0]):
        sk, sv = test.step(layer, False), test.step(layer, True)

        def rate(y_fit, y_test, x_fit, x_test, step):
            p = Predictor(y_fit, x_fit)
            return ideal_bits((y_test - p.predict(y_test.shape[0], x_test)) @ p.basis, step)

        keys = rate(fit.k[layer], test.k[layer], None, None, sk)
        values = rate(fit.v[layer], test.v[layer], None, None, sv)
        from_keys = rate(fit.v[layer], test.v[layer], fit.kh[layer], test.kh[layer], sv)
        if layer:
            prev_fit = torch.cat([fit.kh[layer - 1], fit.vh[layer - 1]], 1)
            prev_test = torch.cat([test.kh[layer - 1], test.vh[layer - 1]], 1)
            chain = rate(fit.k[layer], test.k[layer], prev_fit, prev_test, sk) + rate(
                fit.v[layer], test.v[layer], torch.cat([fit.kh[layer], prev_fit], 1),
                torch.cat([test.kh[layer], prev_test], 1), sv)
        else:
            chain = keys + from_keys
        sums += [keys + values, keys + from_keys, chain]
    return tuple(sums / (2 * test.k.shape[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="append", help="text the maps are fitted on (repeatable; default GPL-3)")
    parser.add_argument("--rank", type=int, help="reduced-rank maps of this rank (default: full)")
    parser.add_argument("--text", action="append", help="text to measure (repeatable)")
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--eval", type=int, default=512)
    args = parser.parse_args(argv)
    texts = args.text or ["/usr/share/common-licenses/Apache-2.0"]
    fit_texts = args.fit or ["/usr/share/common-licenses/GPL-3"]
    for flag, paths in (("--fit", fit_texts), ("--text", texts)):
        for path in paths:
            if not Path(path).is_file():
                parser.error(f"{flag}: {path}: no such file")
    if args.rank is not None and args.rank < 1:
        parser.error(f"--rank: must be at least 1, got {args.rank}")

    from kvcodec.client.model import load_model
    from kvcodec.client.quality import QualityProbe

    loaded = load_model(None)
    fit_kvs = [QualityProbe.from_text(loaded, path, args.prefix, args.eval).exact_kv for path in fit_texts]
    layers, heads, _, dim = fit_kvs[0][0].shape
    profile = builtin_profile(MODEL, layers, heads, dim)
    if profile is None or not profile.has_transform:
        sys.exit(f"no shipped profile with a transform for {MODEL} {layers} x {heads} x {dim}")
    rope = profile.transform(0, False).rope
    fits = {level: Coded.joined([Coded(*kv, level, rope) for kv in fit_kvs]) for level in LEVELS}
    Predictor.rank = args.rank
    e2e, ideal = [], []
    for path in texts:
        probe = QualityProbe.from_text(loaded, path, args.prefix, args.eval)
        keys, values = probe.exact_kv
        name = Path(path).name
        for level in LEVELS:
            print(f"{name} {level} ...", file=sys.stderr)
            test = Coded(keys, values, level, rope)
            q = probe.score(test.decoded.keys, test.decoded.values)
            row = [name, level, f"{test.bits():.3f} b/el, {q.ppl_change_pct:+.3f}%, {q.agree_pct:.1f}%"]
            bits = []
            for predict in (False, True):
                v, b = values_end_to_end(fits[level], test, predict)
                v = torch.cat([values[:, :, :1].float(), v.float().reshape(*v.shape[:2], *values.shape[1::2])
                               .permute(0, 2, 1, 3)], dim=2)  # the sink token back, raw
                q = probe.score(test.decoded.keys, v)
                row.append(f"{b:.3f}, {q.ppl_change_pct:+.3f}%, {q.agree_pct:.1f}%")
                bits.append(b)
            e2e.append(row + [f"{100 * (1 - bits[1] / bits[0]):.1f}%"])
            ideal.append([name, level] + [f"{r:.3f}" for r in ideal_rates(fits[level], test)])
    fitted = " + ".join(Path(p).name for p in fit_texts)
    rank = f"rank {args.rank}" if args.rank else "full rank"
    print(f"Machine: {machine()}; model {loaded.name}; maps ({rank}) fitted on {fitted}; prefix {args.prefix} "
          f"tokens, scored on the next {args.eval}\n")
    print(markdown_table(["text", "level", "codec stream (bits, ppl, agree)", "values coded directly (bits/value el, ppl, agree)",
                          "values from decoded keys", "value bits saved"], e2e))
    print()
    print(markdown_table(["text", "level", "ideal: independent", "values from keys", "+ keys from the previous layer"],
                         ideal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
