"""How unevenly the output weighs KV error *directions*, and whether a metric measured on
calibration text carries over to other text (a measurement behind ``kvcodec calibrate``'s
shaped key bases).

    python benchmarks/metric_probe.py --fit /usr/share/common-licenses/MPL-2.0 \
        --fit /usr/share/vim/vim90/doc/options.txt \
        --text /usr/share/common-licenses/Apache-2.0 --text .../argparse.py

For each text (SmolLM2, prefill ``--prefix`` tokens, score the next ``--eval``; the ANCHORS.md
method) the eval loss's gradient ``g`` with respect to every prefix token's keys (un-rotated:
the codec codes keys before RoPE) and values gives the metric ``M = sum_t g_t g_t^T`` of each
(layer, K/V) over its ``H * D`` channels (the sink token left out): an error ``e`` changes the
loss by ``g . e`` to first order, so ``e^T M e`` is the variance of the perplexity change and,
in expectation, the KL's curvature.

An entropy-coded uniform quantizer at high rate spends ``-1/2 log2 det S`` bits for an error
covariance shaped ``S`` and does damage ``tr(M S)``. The codec today shapes error per head
only (``S`` = a multiple of the identity in each head, set by the head's Fisher weight);
shaping by the inverse of a metric ``A`` fitted on the ``--fit`` texts (``S = (A + ridge)^-1``)
changes a text's damage at equal bits by ``tr(M S) / det(S)^(1/n)`` against the per-head
shape. The table gives that change as bits per element (``1/2 log2`` of the damage ratio,
averaged over layers): what shaping would save at equal damage, on texts the metric was not
fitted on. For values it also tries the model's own output projection (``W_o^T W_o`` of the
query heads that share each kv head), which needs no calibration text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, markdown_table  # noqa: E402


def metrics(probe, rope) -> np.ndarray:
    """float64 ``[layers, 2, H * D, H * D]``: the keys' (un-rotated) and values' gradient metrics."""
    from kvcodec.codec.transform import unrotate

    gk, gv = probe.loss_gradients()
    gk = torch.stack([unrotate(g, rope, 0) for g in gk]) if rope is not None else gk
    out = []
    for g in (gk, gv):
        flat = g[:, :, 1:].permute(0, 2, 1, 3).reshape(g.shape[0], g.shape[2] - 1, -1).double()
        out.append(torch.einsum("ltc,ltd->lcd", flat, flat).numpy())
    return np.stack(out, 1)


def damage(m: np.ndarray, shape: np.ndarray) -> float:
    """``tr(M S) / det(S)^(1/n)``: damage at the rate of a unit-determinant shape."""
    return float(np.trace(m @ shape) / np.exp(np.linalg.slogdet(shape)[1] / len(shape)))


def per_head_shape(a: np.ndarray, heads: int) -> np.ndarray:
    """The codec's shape without a metric: each head's error scaled by its own weight."""
    dim = len(a) // heads
    w = [np.trace(a[h * dim : (h + 1) * dim, h * dim : (h + 1) * dim]) / dim for h in range(heads)]
    return np.diag(np.repeat(1 / np.maximum(w, 1e-300), dim))


def metric_shape(a: np.ndarray, ridge: float) -> np.ndarray:
    """``(A / (tr A / n) + ridge)^-1``: the error shape a metric ``A`` asks for."""
    n = len(a)
    return np.linalg.inv(a / (np.trace(a) / n) + ridge * np.eye(n))


def output_projection(loaded, heads: int, dim: int) -> np.ndarray:
    """``[layers, H * D, H * D]``: sum of ``W_o^T W_o`` over the query heads sharing each kv head."""
    cfg = loaded.config
    q_heads = cfg.num_attention_heads
    out = np.zeros((cfg.num_hidden_layers, heads * dim, heads * dim))
    for layer, block in enumerate(loaded.model.model.layers):
        wo = block.self_attn.o_proj.weight.detach().double().numpy()
        for q in range(q_heads):
            h = q // (q_heads // heads)
            cols = wo[:, q * dim : (q + 1) * dim]
            out[layer, h * dim : (h + 1) * dim, h * dim : (h + 1) * dim] += cols.T @ cols
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="append", required=True, help="text the metric is fitted on (repeatable)")
    parser.add_argument("--text", action="append", required=True, help="held-out text (repeatable)")
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--ridge", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="ridges added to the trace-normalised metric (default: 0.01 0.1 1)")
    args = parser.parse_args(argv)
    for path in args.fit + args.text:
        if not Path(path).is_file():
            parser.error(f"--fit/--text: {path}: no such file")
    if any(r <= 0 for r in args.ridge):
        parser.error(f"--ridge: {args.ridge}: need positive values")

    from kvcodec.client.model import load_model
    from kvcodec.client.quality import QualityProbe
    from kvcodec.codec.transform import model_rope

    loaded = load_model()
    rope = model_rope(loaded.model.model.rotary_emb)
    measured = {}
    for path in args.fit + args.text:
        print(f"{path}: gradients", file=sys.stderr)
        measured[path] = metrics(QualityProbe.from_text(loaded, path, args.prefix, args.eval), rope)
    layers, _, channels, _ = measured[args.fit[0]].shape
    heads = loaded.num_kv_heads
    fit = sum(m / np.trace(m, axis1=-2, axis2=-1)[..., None, None] for p, m in measured.items() if p in args.fit)
    wo = output_projection(loaded, heads, channels // heads)

    rows = []
    for path in args.text:
        m = measured[path]
        row = [Path(path).name]
        for kind in (0, 1):
            eig = [np.linalg.eigvalsh(m[layer, kind])[::-1] for layer in range(layers)]
            row.append(f"{np.median([e[0] / max(e[channels // 2], 1e-300) for e in eig]):.0f}")
        for kind in (0, 1):
            for ridge in args.ridge:
                saved = [0.5 * np.log2(damage(m[layer, kind], per_head_shape(fit[layer, kind], heads))
                                       / damage(m[layer, kind], metric_shape(fit[layer, kind], ridge)))
                         for layer in range(layers)]
                row.append(f"{np.mean(saved):+.3f}")
        saved = [0.5 * np.log2(damage(m[layer, 1], per_head_shape(wo[layer], heads))
                               / damage(m[layer, 1], metric_shape(wo[layer], 1e-9)))
                 for layer in range(layers)]
        own = [0.5 * np.log2(damage(m[layer, kind], per_head_shape(m[layer, kind], heads))
                             / damage(m[layer, kind], metric_shape(m[layer, kind], 0.01)))
               for layer in range(layers) for kind in (0, 1)]
        row += [f"{np.mean(saved):+.3f}", f"{np.mean(own):+.3f}"]
        rows.append(row)

    print(f"Machine: {machine()}; model {loaded.name}; prefix {args.prefix} tokens, scored on the next {args.eval}; "
          f"metric fitted on {', '.join(Path(p).name for p in args.fit)}\n")
    headers = ["text", "K eigen spread (1st / median)", "V eigen spread"]
    headers += [f"K shaped, ridge {r:g} (bits saved)" for r in args.ridge]
    headers += [f"V shaped, ridge {r:g}" for r in args.ridge]
    headers += ["V shaped by W_o^T W_o", "own metric (in-sample bound, K and V)"]
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
