"""Which prefix tokens matter, and what giving them more precision could buy (a measurement,
not a codec feature).

    python benchmarks/saliency_probe.py --text /usr/share/common-licenses/GPL-3 \
        --text /usr/share/common-licenses/Apache-2.0 --text .../argparse.py

For each text (SmolLM2, prefill ``--prefix`` tokens, score the next ``--eval``; the ANCHORS.md
method):

1. *Concentration.* The squared gradient of the eval tokens' loss with respect to each prefix
   token's keys and values (the empirical Fisher weight of the token; the sink, token 0, is
   excluded — streams store it raw): the share of each (layer, kind, head)'s mass held by its
   top 1 / 2 / 5% tokens (mass-weighted mean over groups), and the share held by the last 256
   tokens (recency).
2. *Detection without the model.* An encoder sees only the KV. Tokens that behave as secondary
   attention sinks have keys close to the sink's, so rank tokens by the mean cosine similarity
   (over layers and kv heads) of their pre-RoPE keys to a sink prototype — the first text's
   token-0 key, standing in for one a profile would store — and report the Fisher mass the top
   ``--fraction`` of tokens so ranked hold.
3. *What precision there could buy (upper bound).* Encode at each level with the shipped
   profile, then restore the detected tokens' exact values (and keys) and score: the KL ratio is
   the most that any finer coding of those tokens could give. Storing them raw would cost
   ``fraction * (16 - bits)`` bits per element.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import machine, markdown_table  # noqa: E402

from kvcodec.codec import decode, encode, inspect  # noqa: E402
from kvcodec.codec.patch import choose_tokens  # noqa: E402


def fisher(probe) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared loss gradients ``[layers, heads, tokens]`` of the prefix keys and values."""
    gk, gv = probe.loss_gradients()
    return (gk**2).sum(-1), (gv**2).sum(-1)


def top_share(f: torch.Tensor, frac: float) -> float:
    """Mass-weighted mean over groups of the share of a group's mass in its top ``frac`` tokens."""
    f = f[:, :, 1:]
    n = max(1, int(frac * f.shape[-1]))
    top = torch.sort(f, -1, descending=True).values[..., :n].sum(-1)
    return float(top.sum() / f.sum())


def captured(f: torch.Tensor, order: torch.Tensor) -> float:
    """Share of the (non-sink) Fisher mass held by the tokens ``order`` names."""
    return float(f[:, :, order].sum() / f[:, :, 1:].sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", action="append", required=True, help="text file (repeatable; the first one "
                        "also gives the sink prototype)")
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--fraction", type=float, default=0.02, help="share of tokens detected (default 0.02)")
    parser.add_argument("--levels", nargs="+", default=["high", "balanced", "compact"],
                        choices=["high", "balanced", "compact"])
    args = parser.parse_args(argv)
    for path in args.text:
        if not Path(path).is_file():
            parser.error(f"--text: {path}: no such file")
    if not 0 < args.fraction < 1:
        parser.error(f"--fraction: {args.fraction}: need 0 < fraction < 1")

    from kvcodec.client.model import load_model
    from kvcodec.client.quality import QualityProbe
    from kvcodec.codec.transform import model_rope, unrotate

    loaded = load_model()
    rope = model_rope(loaded.model.model.rotary_emb)
    prototype = None
    conc, gains = [], []
    for path in args.text:
        name = Path(path).name
        print(f"{path}:", file=sys.stderr)
        probe = QualityProbe.from_text(loaded, path, args.prefix, args.eval)
        fk, fv = fisher(probe)
        keys, values = (t.float() for t in probe.exact_kv)
        pre = torch.stack([unrotate(layer, rope, 0) for layer in keys]) if rope is not None else keys
        if prototype is None:
            prototype = pre[:, :, :1].clone()
        n = max(1, int(args.fraction * keys.shape[2]))
        chosen = torch.from_numpy(choose_tokens(pre, prototype[:, :, 0], n, skip=1))  # the sink itself is raw
        conc.append([name] + [f"{top_share(f, p):.2f}" for f in (fv, fk) for p in (0.01, 0.02, 0.05)]
                    + [f"{float(f[:, :, -256:].sum() / f[:, :, 1:].sum()):.2f}" for f in (fv, fk)]
                    + [f"{captured(fv, chosen):.2f}", f"{captured(fk, chosen):.2f}"])
        for level in args.levels:
            blob = encode(keys.half(), values.half(), level=level, model="smollm2-135m")
            bits = inspect(blob).bits_per_element
            kv = decode(blob)
            dk, dv = kv.keys.float(), kv.values.float()
            base = probe.score(dk, dv)
            dv[:, :, chosen] = values[:, :, chosen]
            only_v = probe.score(dk, dv)
            dk[:, :, chosen] = keys[:, :, chosen]
            both = probe.score(dk, dv)
            raw_cost = n / keys.shape[2] * (16 - bits)
            gains.append([name, level, f"{bits:.3f}", f"{base.kl_mean:.2e}", f"{only_v.kl_mean / base.kl_mean:.2f}",
                          f"{both.kl_mean / base.kl_mean:.2f}", f"{raw_cost:.3f}", f"{2 ** (-2 * raw_cost):.2f}"])
            print(f"  {level}: {gains[-1][2:]}", file=sys.stderr)

    print(f"Machine: {machine()}; model {loaded.name}; prefix {args.prefix} tokens, scored on the next {args.eval}; "
          f"detected share {args.fraction:g}\n")
    print(markdown_table(["text", "V top 1%", "V top 2%", "V top 5%", "K top 1%", "K top 2%", "K top 5%",
                          "V last 256", "K last 256", "V held by detected", "K held by detected"], conc))
    print()
    print(markdown_table(["text", "level", "bits/el", "KL", "KL ratio, detected values exact",
                          "KL ratio, detected keys+values exact", "raw storage cost (bits/el)",
                          "KL ratio the same bits buy spread evenly (2^-2b)"], gains))
    return 0


if __name__ == "__main__":
    sys.exit(main())
