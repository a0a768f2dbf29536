"""Reproduce ANCHORS.md's baseline rows with QualityProbe and time score().

    .venv/bin/python benchmarks/quality_probe_bench.py [--text FILE] [--prefix 1536] [--eval 512]

Prints a table (method, bits/element, ppl change, greedy agreement, KL, seconds per
score() call) naming the machine. ANCHORS.md (first 2,048 tokens of GPL-3):
exact ppl 23.37; 8-bit per-token g64 +0.01% / 99.8%; 4-bit per-token g64 +0.48% / 93.0%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402




def methods(keys, values):
    """(name, bits/element, reconstruction) rows to score."""
    import torch

    from kvcodec.client.quality import per_token_baseline, per_token_bits_per_element

    yield "exact KV (fp32 as computed)", 32.0, (keys, values)
    yield "fp16 cast", 16.0, (keys.half(), values.half())
    yield "bf16 cast", 16.0, (keys.bfloat16(), values.bfloat16())
    for bits in (8, 4):
        bpe = per_token_bits_per_element(bits)
        yield f"{bits}-bit per-token g64", bpe, per_token_baseline(keys, values, bits=bits)
        yield (
            f"{bits}-bit per-token g64, fp16 min/scale",
            bpe,
            per_token_baseline(keys, values, bits=bits, param_dtype=torch.float16),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="score() calls timed on the exact KV")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)

    from kvcodec.client.model import load_model
    from kvcodec.client.quality import QualityProbe

    t0 = time.perf_counter()
    loaded = load_model(args.model, threads=args.threads)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = QualityProbe.from_text(loaded, args.text, args.prefix, args.eval)
    t_probe = time.perf_counter() - t0
    keys, values = probe.exact_kv
    times, cpu = [], []
    for _ in range(args.repeat):
        c0 = time.process_time()
        times.append(probe.score(keys, values).seconds)
        cpu.append(time.process_time() - c0)
    rows = []
    for name, bpe, (k, v) in methods(keys, values):
        r = probe.score(k, v)
        rows.append({"method": name, "bits_per_element": bpe, **r.to_dict()})
    if args.json:
        print(json.dumps({"machine": machine(), "rows": rows, "score_seconds": times, "score_cpu_seconds": cpu}, indent=1))
        return 0
    print(f"# QualityProbe on {loaded.name}: {args.text}, prefix {args.prefix} + eval {args.eval} tokens")
    print(f"# machine: {machine()}")
    print(f"# load_model {t_load:.2f} s, probe build {t_probe:.2f} s, ppl_ref {probe.ppl_ref:.3f}")
    print(
        f"# score() on the exact KV: median {statistics.median(times):.2f} s wall, "
        f"{statistics.median(cpu):.2f} s CPU (all threads), min wall {min(times):.2f} s, {len(times)} calls"
    )
    print("| method | bits/el | ppl | ppl change | greedy agree | KL mean (nats) | score s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['bits_per_element']:.2f} | {r['ppl']:.3f} | {r['ppl_change_pct']:+.3f}% "
            f"| {r['agree_pct']:.1f}% | {r['kl_mean']:.2e} | {r['seconds']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
