"""How many tokens should a level patch? Size and quality of one level at several patch
fractions (header flag 16, :mod:`kvcodec.codec.patch`), the rest of the codec unchanged.

    python benchmarks/patch_bench.py --text /usr/share/common-licenses/GPL-2 \
        --text .../typing.py --level high --fraction 0 0.01 0.02 0.04

For each text (SmolLM2, prefill ``--prefix`` tokens, score the next ``--eval``: the ANCHORS.md
method), each fraction and each ``--scale`` of the level's lambda: bits per element of the
stream, perplexity change, its chance spread (``--spread`` sign-flipped copies of the error,
``QualityProbe.ppl_spread``), greedy agreement and KL, and the bits and KL against the unpatched
stream at the level's own lambda. A patched stream at a scaled lambda that spends the unpatched
stream's bits is the equal-rate comparison: whether patches beat spreading the same bits over
every element.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table  # noqa: E402

from kvcodec.codec import decode, encode, inspect  # noqa: E402
from kvcodec.codec.levels import get_level  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", action="append", required=True, help="text file (repeatable)")
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--level", default="high", choices=["high", "balanced", "compact"])
    parser.add_argument("--fraction", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.04],
                        help="patch fractions to compare (0: no patches)")
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0],
                        help="also scale the level's profile lambda by each factor (an in-memory profile, as "
                             "codec_bench --sweep does): to compare patched and unpatched streams at equal rate")
    parser.add_argument("--spread", type=int, default=8, help="sign-flipped copies per point (0: none)")
    args = parser.parse_args(argv)
    for path in args.text:
        if not Path(path).is_file():
            parser.error(f"--text: {path}: no such file")
    for f in args.fraction:
        if not 0 <= f < 1:
            parser.error(f"--fraction: {f}: need 0 <= fraction < 1")
    if any(x <= 0 for x in args.scale):
        parser.error("--scale: factors must be positive")
    if args.spread == 1 or args.spread < 0:
        parser.error(f"--spread: {args.spread}: need 0 or >= 2")

    fractions = sorted(set(args.fraction))  # 0 first: the unpatched stream the others are compared with
    from kvcodec.client.model import load_model
    from kvcodec.client.quality import QualityProbe
    from kvcodec.codec.profile import builtin_profile

    loaded = load_model()
    base = get_level(args.level)
    profiles = {}
    rows = []
    for path in args.text:
        name = Path(path).name
        print(f"{path}:", file=sys.stderr)
        probe = QualityProbe.from_text(loaded, path, args.prefix, args.eval)
        keys, values = probe.exact_kv
        if not profiles:  # the shipped profile, and copies with the level's lambda scaled
            shipped = builtin_profile("smollm2-135m", keys.shape[0], keys.shape[1], keys.shape[3])
            if shipped is None:
                parser.error(f"--model: {loaded.name} has no shipped profile to patch with")
            for x in sorted(set(args.scale) | {1.0}):
                profiles[x] = shipped
                if x != 1.0:
                    profiles[x] = copy.deepcopy(shipped)
                    profiles[x].levels[args.level] = shipped.levels[args.level] * x
        plain = None
        order = sorted(profiles, key=lambda x: (x != 1.0, x))  # the unpatched stream at the level's lambda first
        for frac, scale in [(f, x) for x in order for f in fractions]:
            prof = profiles[scale]
            blob = encode(keys.half(), values.half(), level=replace(base, patch_fraction=frac), model="smollm2-135m",
                          threads=2, profile=prof)
            info = inspect(blob)
            kv = decode(blob, threads=2, profile=prof)
            r = probe.score(kv.keys, kv.values)
            sd = statistics.stdev(probe.ppl_spread(kv.keys, kv.values, trials=args.spread)) if args.spread else None
            if plain is None and frac == 0 and scale == 1.0:
                plain = (info.bits_per_element, r.kl_mean)
            cost = info.bits_per_element - plain[0] if plain else None
            rows.append([name, f"{frac:g}", f"{scale:g}", info.patched_tokens, f"{info.bits_per_element:.3f}",
                         f"{r.ppl_change_pct:+.3f}%", "" if sd is None else f"{sd:.3f}%", f"{r.agree_pct:.1f}%",
                         f"{r.kl_mean:.2e}", "" if cost is None else f"{cost:+.3f}",
                         "" if plain is None else f"{r.kl_mean / plain[1]:.2f}"])
            print("  " + " | ".join(str(c) for c in rows[-1][1:]), file=sys.stderr)
    print(f"Machine: {machine()}; model {loaded.name}; level {args.level}; prefix {args.prefix} tokens, scored on "
          f"the next {args.eval}; ppl sd from {args.spread} sign-flipped copies\n")
    print(markdown_table(["text", "fraction", "lambda x", "patched tokens", "bits/el", "ppl change", "ppl sd (sign flips)",
                          "greedy agree", "KL (nats)", "bits/el over unpatched", "KL ratio"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
