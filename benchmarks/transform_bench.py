"""What the profile's transform buys: the same profile with and without it, side by side.

    python benchmarks/transform_bench.py --text /usr/share/common-licenses/GPL-3 [--text ...]

For each text and lossy level, encode the SmolLM2 prefix KV four ways — no profile (steps from
the data's RMS), the shipped profile with its transform removed (same sensitivities and
lambdas), the same with only RoPE removed from keys (identity bases, what ``kvcodec calibrate
--transform rope`` writes), and the shipped profile as is (keys before RoPE, per-head KLT
bases) — then print
bits per element, perplexity change and greedy agreement (kvcodec.client.quality), and
single-thread encode/decode MB/s of fp16 KV on this machine (best of ``--repeat``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import machine, markdown_table  # noqa: E402

from kvcodec.codec import decode, encode, inspect  # noqa: E402
from kvcodec.codec.profile import builtin_profile  # noqa: E402
from kvcodec.codec.transform import identity_bases  # noqa: E402

MODEL = "smollm2-135m"


def variants(layers: int, heads: int, dim: int) -> dict:
    shipped = builtin_profile(MODEL, layers, heads, dim)
    if shipped is None or not shipped.has_transform:
        raise SystemExit("the shipped SmolLM2 profile has no transform")
    plain = copy.deepcopy(shipped)
    plain.bases, plain.rope_inv_freq = None, None
    rope_only = copy.deepcopy(shipped)  # what `kvcodec calibrate --transform rope` writes
    rope_only.bases = identity_bases(layers, heads * dim, dim)
    return {"no profile": None, "profile, no transform": plain, "profile, RoPE removed only": rope_only,
            "profile + transform": shipped}


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", action="append", help="text file (repeatable; default GPL-3)")
    parser.add_argument("--levels", nargs="+", default=["high", "balanced", "compact"])
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (best is kept)")
    args = parser.parse_args(argv)

    from kvcodec.client.model import load_model
    from kvcodec.client.quality import QualityProbe

    loaded = load_model(None)
    rows = []
    for path in args.text or ["/usr/share/common-licenses/GPL-3"]:
        probe = QualityProbe.from_text(loaded, path, args.prefix, args.eval)
        keys, values = (t.half() for t in probe.exact_kv)
        mb = (keys.numel() + values.numel()) * 2 / 1e6
        for name, prof in variants(*keys.shape[:2], keys.shape[3]).items():
            for level in args.levels:
                before = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    t_enc, blob = timed(lambda: encode(keys, values, level=level, model=MODEL, profile=prof), args.repeat)
                    t_dec, kv = timed(lambda: decode(blob, profile=prof), args.repeat)
                finally:
                    torch.set_num_threads(before)
                q = probe.score(kv.keys, kv.values)
                info = inspect(blob)
                rows.append([Path(path).name, name, level, f"{info.bits_per_element:.3f}",
                             f"{q.ppl_change_pct:+.2f}%", f"{q.agree_pct:.1f}%",
                             f"{mb / t_enc:.0f}", f"{mb / t_dec:.0f}"])
                print("  " + " | ".join(rows[-1]), file=sys.stderr)
    print(f"Machine: {machine()}; encode/decode on one thread, best of {args.repeat}")
    print(f"Model: {loaded.name}; prefix {args.prefix} tokens, scored on the next {args.eval}\n")
    print(markdown_table(["text", "profile", "level", "bits/el", "ppl change", "greedy agree",
                          "enc MB/s", "dec MB/s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
