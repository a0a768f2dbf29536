"""Size, quality and speed of every level and of the ANCHORS.md baselines.

    python benchmarks/codec_bench.py --text /usr/share/common-licenses/GPL-3 \
        --text /usr/share/common-licenses/Apache-2.0 [--model gemma3-270m] [--json]

For each text: prefill ``--prefix`` tokens with the model (``--model``: SmolLM2-135M-Instruct
by default, or ``gemma3-270m``), replace the prefix KV by each method's reconstruction, score
the next ``--eval`` tokens (perplexity change, greedy agreement vs the exact KV; see
kvcodec.client.quality), and time our encoder and decoder (MB/s of fp16 KV on this CPU).
Bits per element count every byte of side information. Each lossy level runs with the
model's profile (``--profile``, else the one ``encode`` finds for the model: shipped or in
``$KVCODEC_PROFILE_PATH``) and, next to it, without one; the ``floor`` column says whether
the row meets the level's quality floor (:data:`FLOORS`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from baselines import fp16_zstd, kivi, per_token  # noqa: E402
from common import machine, markdown_table  # noqa: E402

from kvcodec.codec import LEVELS, decode, encode, inspect  # noqa: E402


TIMED_RUNS = 3  # encode and decode each run this often; the fastest counts (the first compiles numba kernels)
# The quality floors of the levels on held-out text: (max |ppl change| %, min greedy agreement %).
FLOORS = {"high": (0.1, 99.0), "balanced": (1.0, 95.0), "compact": (5.0, 85.0)}


def ours(level: str, keys: torch.Tensor, values: torch.Tensor, threads: int, model: str, profile) -> dict:
    """Encode and decode one level (``profile``: a Profile, ``"auto"`` or None), timed."""
    k16, v16 = keys.half(), values.half()
    fp16_mb = (k16.numel() + v16.numel()) * 2 / 1e6
    enc_s = dec_s = float("inf")
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        blob = encode(k16, v16, level=level, model=model, threads=threads, profile=profile)
        t1 = time.perf_counter()
        kv = decode(blob, threads=threads, profile=None if profile in (None, "auto") else profile)
        t2 = time.perf_counter()
        enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
    info = inspect(blob)
    return {
        "bits": info.bits_per_element,
        "side_pct": 100 * info.side_info_bytes / info.total_bytes,
        "enc_mbs": fp16_mb / enc_s,
        "dec_mbs": fp16_mb / dec_s,
        "kv": (kv.keys, kv.values),
    }


def sweep_points(level: str, keys, values, scales: list[float], model: str, base):
    """Our rate-quality curve: the level's profile lambda scaled by each factor."""
    import copy

    for scale in scales:
        if base is None:
            break
        prof = copy.deepcopy(base)
        prof.levels[level] = base.levels[level] * scale
        blob = encode(keys.half(), values.half(), level=level, model=model, profile=prof)
        kv = decode(blob, profile=prof)
        yield f"kvcodec {level} x{scale:g}", inspect(blob).bits_per_element, (kv.keys, kv.values)


def baselines(keys: torch.Tensor, values: torch.Tensor):
    yield "fp16 + zstd-19 (lossless)", fp16_zstd(keys, values)
    yield "8-bit per-token g64", per_token(keys, values, 8)
    yield "4-bit per-token g64", per_token(keys, values, 4)
    yield "KIVI-4 g32", kivi(keys, values, 4)
    yield "KIVI-2 g32", kivi(keys, values, 2)


def model_profile(loaded, path: str | None):
    """The profile the lossy rows use: ``path``, else the one ``encode`` finds for the model."""
    from kvcodec.codec.profile import builtin_profile, load_profile

    if path:
        return load_profile(path)
    return builtin_profile(loaded.name, loaded.num_layers, loaded.num_kv_heads, loaded.head_dim)


def meets_floor(level: str | None, q) -> str:
    """``yes``/``no`` against the level's floor (``""`` for lossless and the baselines)."""
    if level not in FLOORS:
        return ""
    max_ppl, min_agree = FLOORS[level]
    return "yes" if abs(q.ppl_change_pct) <= max_ppl and q.agree_pct >= min_agree else "no"


def run_text(loaded, path: str, args, profile) -> list[dict]:
    from kvcodec.client.quality import QualityProbe

    probe = QualityProbe.from_text(loaded, path, args.prefix, args.eval)
    keys, values = probe.exact_kv
    rows = []

    def add(method: str, bits: float, kv, spread: bool = False, level: str | None = None, **extra) -> None:
        q = probe.score(*kv)
        row = {"text": Path(path).name, "method": method, "bits_per_element": bits,
               "ratio_vs_fp16": 16 / bits, "ppl_ref": q.ppl_ref, "ppl_change_pct": q.ppl_change_pct,
               "agree_pct": q.agree_pct, "kl_mean": q.kl_mean, "floor": meets_floor(level, q), **extra}
        if spread and args.spread:
            draws = probe.ppl_spread(*kv, trials=args.spread)
            row["ppl_spread_pct"] = statistics.stdev(draws)
        rows.append(row)
        sd = f"  (sign flips: sd {row['ppl_spread_pct']:.3f})" if "ppl_spread_pct" in row else ""
        print(f"  {method:<28} {bits:6.3f} b/el  ppl {q.ppl_change_pct:+.3f}%{sd}  agree {q.agree_pct:.1f}%  "
              f"KL {q.kl_mean:.2e}", file=sys.stderr)

    variants = [("", profile)] + ([(", no profile", None)] if profile is not None else [])
    for level in args.levels:
        for suffix, prof in variants if level != "lossless" else [("", None)]:
            r = ours(level, keys, values, args.threads, loaded.name, prof)
            add(f"kvcodec {level}{suffix}", r["bits"], r["kv"], spread=level != "lossless" and not suffix,
                level=level, side_info_pct=r["side_pct"], encode_mb_s=r["enc_mbs"], decode_mb_s=r["dec_mbs"])
    if not args.no_baselines:
        for name, (bits, k, v) in baselines(keys, values):
            add(name, bits, (k, v))
    if args.sweep:
        for name, bits, kv in sweep_points(args.sweep_level, keys, values, args.sweep, loaded.name, profile):
            add(name, bits, kv, sweep=True)
    return rows


def plot(rows: list[dict], path: str, model: str) -> None:
    """Rate-quality plot: bits/element vs |ppl change| and vs greedy agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    texts = sorted({r["text"] for r in rows})
    markers = "osD^v<>"
    for ax, key, label in ((axes[0], "ppl_change_pct", "|perplexity change| (%)"),
                           (axes[1], "agree_pct", "greedy agreement (%)")):
        for ti, text in enumerate(texts):
            mine = sorted((r for r in rows if r["text"] == text and r["method"].startswith("kvcodec")
                           and r["method"] != "kvcodec lossless" and "no profile" not in r["method"]),
                          key=lambda r: r["bits_per_element"])
            ys = [abs(r[key]) if key == "ppl_change_pct" else r[key] for r in mine]
            ax.plot([r["bits_per_element"] for r in mine], ys, "-" + markers[ti % 7], color="C0",
                    label=f"kvcodec ({text})")
            for r in rows:
                if r["text"] != text or r["method"].startswith("kvcodec") or "lossless" in r["method"]:
                    continue
                y = abs(r[key]) if key == "ppl_change_pct" else r[key]
                ax.scatter(r["bits_per_element"], y, marker=markers[ti % 7], color="C3")
                if ti == 0:
                    ax.annotate(r["method"], (r["bits_per_element"], y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xlabel("bits per KV element (all side information)")
        ax.set_ylabel(label)
        if key == "ppl_change_pct":
            ax.set_yscale("symlog", linthresh=0.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{model}: rate vs quality (blue: kvcodec levels and sweep, red: baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(rows: list[dict]) -> str:
    headers = ["text", "method", "bits/el", "× fp16", "ppl change", "greedy agree", "KL (nats)", "floor",
               "side info", "enc MB/s", "dec MB/s"]
    spread = any("ppl_spread_pct" in r for r in rows)
    if spread:
        headers.insert(5, "ppl sd (sign flips)")
    out = []
    for r in rows:
        if r.get("sweep"):
            continue
        cells = [
            r["text"], r["method"], f"{r['bits_per_element']:.3f}", f"{r['ratio_vs_fp16']:.2f}",
            f"{r['ppl_change_pct']:+.2f}%", f"{r['agree_pct']:.1f}%", f"{r['kl_mean']:.1e}", r.get("floor", ""),
            f"{r['side_info_pct']:.2f}%" if "side_info_pct" in r else "",
            f"{r['encode_mb_s']:.0f}" if "encode_mb_s" in r else "",
            f"{r['decode_mb_s']:.0f}" if "decode_mb_s" in r else "",
        ]
        if spread:
            cells.insert(5, f"{r['ppl_spread_pct']:.2f}%" if "ppl_spread_pct" in r else "")
        out.append(cells)
    return markdown_table(headers, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", action="append", help="text file (repeatable)")
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help=f"encoder and decoder threads (MB/s: the fastest of {TIMED_RUNS} runs)")
    parser.add_argument("--model", help="model name (smollm2-135m, gemma3-270m), GGUF file or transformers "
                                        "directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--profile", help="codec profile file for the lossy rows (default: the model's shipped "
                                          "profile or one in $KVCODEC_PROFILE_PATH; without one, profile-less rows only)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    parser.add_argument("--sweep", type=float, nargs="*", default=[],
                        help="extra points for our curve: --sweep-level's lambda times each factor")
    parser.add_argument("--sweep-level", default="balanced", choices=[lv for lv in LEVELS if lv != "lossless"],
                        help="the level whose lambda --sweep scales (default: balanced)")
    parser.add_argument("--plot", help="write the rate-quality plot (PNG) here")
    parser.add_argument("--spread", type=int, default=0, metavar="N",
                        help="also score N copies of each of our lossy reconstructions with the error's sign "
                             "flipped at random per (layer, keys/values, head, 256 tokens), and report the "
                             "standard deviation of their perplexity changes: how far chance alone moves the "
                             "ppl change at that error size (QualityProbe.ppl_spread)")
    args = parser.parse_args(argv)
    if args.spread == 1 or args.spread < 0:
        parser.error(f"--spread: {args.spread}: need 0 (off) or at least 2 copies")
    texts = args.text or ["/usr/share/common-licenses/GPL-3"]
    for path in texts:
        if not Path(path).is_file():
            parser.error(f"--text: {path}: no such file")

    from kvcodec.client.model import load_model

    loaded = load_model(args.model)
    profile = model_profile(loaded, args.profile)
    rows = []
    for path in texts:
        print(f"{path}:", file=sys.stderr)
        rows += run_text(loaded, path, args, profile)
    if args.plot:
        plot(rows, args.plot, loaded.name)
    named = "none" if profile is None else f"{profile.model} sha256 {profile.digest.hex()[:16]}"
    about = (f"Machine: {machine()}; torch threads {torch.get_num_threads()}; codec threads {args.threads}, "
             f"MB/s the fastest of {TIMED_RUNS} runs\n"
             f"Model: {loaded.name}; profile: {named}; prefix {args.prefix} tokens, scored on the next {args.eval}; "
             f"floors (|ppl| %, agree %): {FLOORS}\n")
    if args.json:
        print(about, file=sys.stderr)
        print(json.dumps(rows, indent=2))
    else:
        print(about)
        print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
