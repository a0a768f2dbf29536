"""CacheBlend-style fusion vs a full prefill on RAG-like contexts built from real text.

Each case: a short system prompt, ``--chunks`` chunks of ``--chunk-tokens`` tokens taken from
different documents (each prefilled on its own, at positions from 0, as a chunk store would
hold it), then a short suffix and a scored continuation. Two kinds of case alternate:

- ``continue``: the suffix is the next tokens of the last chunk's document; the continuation
  is the text after it (local context).
- ``recall``: the suffix asks to quote the documents and starts a passage from an *earlier*
  chunk; the continuation is the rest of that passage (needs attention across chunks).

For each method (naive reuse = ratio 0, selective recompute at each ratio with a single check
layer and with the paper's gradual filter) it reports, averaged over the cases: perplexity
change of the continuation vs the full prefill, greedy agreement (argmax equal to the full
prefill's at each continuation position, teacher-forced), and blend time / full prefill time.

Usage:
    python benchmarks/blend_bench.py                       # default texts, table + plot
    python benchmarks/blend_bench.py --text a.txt --text b.txt --json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

PYLIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
DEFAULT_TEXTS = [
    Path("/usr/share/common-licenses/GPL-3"),
    Path("/usr/share/common-licenses/Apache-2.0"),
    Path("/usr/share/common-licenses/MPL-2.0"),
    Path("/usr/share/common-licenses/LGPL-2.1"),
    Path("/usr/share/common-licenses/GFDL-1.3"),
    Path("/usr/share/common-licenses/Artistic"),
    PYLIB / "pydoc_data/topics.py",
    PYLIB / "argparse.py",
    PYLIB / "textwrap.py",
    PYLIB / "email/architecture.rst",
]
RATIOS = (0.0, 0.05, 0.10, 0.15, 0.30, 1.0)
SYSTEM = "You are a helpful assistant. Answer using the documents below.\n\n"
RECALL = "\n\nQuote a passage from the documents above, word for word:\n"


@dataclass
class Case:
    """One RAG-like context and the continuation scored after it."""

    kind: str
    prefix: list[int]
    chunks: list[list[int]]
    suffix: list[int]
    continuation: list[int]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--text", action="append", type=Path, help="a text file (repeatable)")
    p.add_argument("--model", default=None, help="GGUF or model dir (default: SmolLM2)")
    p.add_argument("--cases", type=int, default=12, help="number of cases (default 12)")
    p.add_argument("--chunks", type=int, default=4, help="chunks per case (default 4)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (256)")
    p.add_argument("--continuation", type=int, default=48, help="scored tokens (48)")
    p.add_argument("--ratios", default=",".join(str(r) for r in RATIOS), help="comma list")
    p.add_argument("--schedules", default="single,gradual", help="single,gradual")
    p.add_argument("--check-layer", type=int, default=1)
    p.add_argument("--deviation", default="k", choices=("k", "v", "kv"))
    p.add_argument("--query-weight", type=float, default=1.0,
                   help="weight of suffix attention in the selection (0: deviation only)")
    p.add_argument("--repeats", type=int, default=1, help="timing repeats, min taken (1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: stable timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=Path(__file__).with_name("blend_quality.png"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    return p.parse_args(argv)




def _encode(tok, text: str) -> list[int]:
    return [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]


def build_cases(loaded, texts: list[Path], args: argparse.Namespace) -> list[Case]:
    """Draw ``args.cases`` cases, chunks from distinct documents, seeded."""
    tok = loaded.tokenizer
    docs = [_encode(tok, t.read_text(encoding="utf-8", errors="replace")) for t in texts]
    need = args.chunk_tokens + 16 + args.continuation
    docs = [d for d in docs if len(d) >= need]
    if len(docs) < 2:
        raise SystemExit(f"--text: need >= 2 texts of >= {need} tokens, got {len(docs)}")
    rng = random.Random(args.seed)
    prefix = _encode(tok, SYSTEM)
    cases = []
    for i in range(args.cases):
        picks = rng.sample(range(len(docs)), min(args.chunks, len(docs)))
        chunks, tails = [], []
        for d in picks:
            start = rng.randrange(0, len(docs[d]) - need + 1)
            chunks.append(docs[d][start : start + args.chunk_tokens])
            tails.append(docs[d][start + args.chunk_tokens : start + need])
        if i % 2 == 0:
            suffix, cont = tails[-1][:16], tails[-1][16:]
        else:
            src = chunks[rng.randrange(0, len(chunks) - 1)] if len(chunks) > 1 else chunks[0]
            at = rng.randrange(0, len(src) - 8 - args.continuation)
            suffix = _encode(tok, RECALL) + src[at : at + 8]
            cont = src[at + 8 : at + 8 + args.continuation]
        cases.append(Case(("continue", "recall")[i % 2], prefix, chunks, suffix, cont))
    return cases


def score(model, cache, logits_last, cont: list[int]):
    """Teacher-forced continuation: (nll per token, argmax per position)."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(cont)
    out = model(ids[None, :-1], past_key_values=cache, use_cache=True)
    logits = torch.cat([logits_last[None].float(), out.logits[0].float()])
    return F.cross_entropy(logits, ids, reduction="none"), logits.argmax(-1)


def timed(fn, repeats: int):
    """Run ``fn`` ``repeats`` times: (last result, min wall s, min CPU s)."""
    walls, cpus, res = [], [], None
    for _ in range(max(1, repeats)):
        w, c = time.perf_counter(), time.process_time()
        res = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return res, min(walls), min(cpus)


def full_prefill(model, ids: list[int]):
    """Full prefill of the fused context: (cache, last logits)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(torch.tensor(ids)[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1]


def methods(args: argparse.Namespace) -> list[dict]:
    """The blend configurations measured: naive, no-re-rotation, then each schedule x ratio."""
    ratios = sorted({float(r) for r in args.ratios.split(",") if r.strip()})
    out = [
        {"method": "naive", "schedule": "-", "ratio": 0.0},
        {"method": "raw (no re-rotation)", "schedule": "-", "ratio": 0.0, "fix_positions": False},
    ]
    for sched in [s.strip() for s in args.schedules.split(",") if s.strip()]:
        for r in ratios:
            if r <= 0 or (r >= 1 and sched != "single"):
                continue
            out.append({"method": "blend", "schedule": sched, "ratio": r})
    if args.query_weight > 0 and 0.15 in ratios:  # ablation: deviation-only selection
        for sched in [s.strip() for s in args.schedules.split(",") if s.strip()]:
            out.append({"method": "blend, deviation only", "schedule": sched, "ratio": 0.15,
                        "query_weight": 0.0})
    return out


def run_case(loaded, case: Case, configs: list[dict], args: argparse.Namespace) -> list[dict]:
    """Measure every configuration on one case against its full prefill."""
    import torch

    from kvcodec.client.blend import blend
    from kvcodec.client.model import prefill

    model = loaded.model
    chunk_kv = [(c, *prefill(loaded, c)) for c in case.chunks]
    ids = case.prefix + [t for c in case.chunks for t in c] + case.suffix
    with torch.no_grad():
        (cache, last), t_full, c_full = timed(lambda: full_prefill(model, ids), args.repeats)
        nll_f, am_f = score(model, cache, last, case.continuation)
        rows = []
        for cfg in configs:
            sched = cfg["schedule"] if cfg["schedule"] != "-" else "single"
            res, t_blend, c_blend = timed(lambda: blend(
                loaded, case.prefix, chunk_kv, case.suffix, cfg["ratio"], schedule=sched,
                check_layer=args.check_layer, deviation=args.deviation,
                fix_positions=cfg.get("fix_positions", True),
                query_weight=cfg.get("query_weight", args.query_weight),
            ), args.repeats)
            nll, am = score(model, res.cache, res.logits_last, case.continuation)
            rows.append({
                **{k: cfg[k] for k in ("method", "schedule", "ratio")}, "kind": case.kind,
                "nll": float(nll.sum()), "nll_full": float(nll_f.sum()), "n": int(nll.numel()),
                "case_ppl_change_pct": 100.0 * math.expm1(float(nll.mean() - nll_f.mean())),
                "agree_pct": 100.0 * float((am == am_f).float().mean()),
                "time_fraction": t_blend / t_full, "cpu_fraction": c_blend / c_full,
                "blend_s": t_blend, "full_s": t_full,
                "tokens": len(ids), "recomputed_tokens": int(res.selected.numel()),
            })
    return rows


def _pooled_ppl_change(group: list[dict]) -> float:
    """Change of the perplexity over all scored tokens of the group, in %."""
    n = sum(g["n"] for g in group)
    return 100.0 * math.expm1((sum(g["nll"] for g in group) - sum(g["nll_full"] for g in group)) / n)


def aggregate(per_case: list[list[dict]]) -> list[dict]:
    """Average each configuration's metrics over the cases (ppl pooled over all tokens)."""
    keys = ("agree_pct", "time_fraction", "cpu_fraction", "blend_s", "full_s", "tokens",
            "recomputed_tokens")
    rows = []
    for i, first in enumerate(per_case[0]):
        group = [case[i] for case in per_case]
        row = {k: first[k] for k in ("method", "schedule", "ratio")}
        row["ppl_change_pct"] = _pooled_ppl_change(group)
        row.update({k: sum(g[k] for g in group) / len(group) for k in keys})
        changes = sorted(g["case_ppl_change_pct"] for g in group)
        row["case_ppl_change_mean_pct"] = sum(changes) / len(changes)
        row["case_ppl_change_median_pct"] = changes[len(changes) // 2]
        for kind in sorted({g["kind"] for g in group}):
            sub = [g for g in group if g["kind"] == kind]
            row[f"ppl_change_pct_{kind}"] = _pooled_ppl_change(sub)
            row[f"agree_pct_{kind}"] = sum(g["agree_pct"] for g in sub) / len(sub)
        row["cases"] = len(group)
        rows.append(row)
    return rows


def print_table(rows: list[dict], args: argparse.Namespace, n_texts: int) -> None:
    print(f"# blend_bench on {machine()}, torch threads {args.threads}")
    print(f"# {rows[0]['cases']} cases from {n_texts} texts: {args.chunks} chunks x "
          f"{args.chunk_tokens} tokens, ~{rows[0]['tokens']:.0f} context tokens, "
          f"{args.continuation} scored; check layer {args.check_layer}, deviation "
          f"{args.deviation}, query weight {args.query_weight}; full prefill "
          f"{rows[0]['full_s']:.2f} s")
    print("| method | schedule | recompute | ppl change | continue / recall | per-case median "
          "| greedy agree | continue / recall | time / full | CPU / full |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['schedule']} | {100 * r['ratio']:.0f}% "
              f"| {r['ppl_change_pct']:+.2f}% "
              f"| {r.get('ppl_change_pct_continue', 0):+.1f}% / "
              f"{r.get('ppl_change_pct_recall', 0):+.1f}% "
              f"| {r['case_ppl_change_median_pct']:+.2f}% | {r['agree_pct']:.1f}% "
              f"| {r.get('agree_pct_continue', 0):.1f}% / {r.get('agree_pct_recall', 0):.1f}% "
              f"| {r['time_fraction']:.3f} | {r['cpu_fraction']:.3f} |")


def write_plot(rows: list[dict], path: Path) -> None:
    """ppl change, agreement and time fraction vs recompute ratio, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    naive = next(r for r in rows if r["method"] == "naive")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("ppl_change_pct", "ppl change vs full prefill (%)", 2.0),
              ("agree_pct", "greedy agreement (%)", 90.0),
              ("time_fraction", "blend time / full prefill time", 0.30))
    for ax, (key, label, target) in zip(axes, panels):
        for sched in ("single", "gradual"):
            pts = [naive] + [r for r in rows if r["schedule"] == sched and r["method"] == "blend"]
            if len(pts) > 1:
                ax.plot([100 * p["ratio"] for p in pts], [p[key] for p in pts], "o-", label=sched)
        ax.axhline(target, color="grey", ls="--", lw=1, label="target")
        if key == "ppl_change_pct":
            ax.axhline(-target, color="grey", ls="--", lw=1)
        ax.axvline(15, color="grey", ls=":", lw=1)
        ax.set_xlabel("recompute ratio (%)")
        ax.set_title(label, fontsize=10)
        ax.set_xscale("symlog", linthresh=5)
    axes[0].set_yscale("symlog", linthresh=2)
    axes[0].legend()
    fig.suptitle(f"CacheBlend fusion, SmolLM2-135M, {naive['cases']} RAG-like cases "
                 f"({machine()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns an exit code."""
    args = parse_args(argv)
    import torch

    from kvcodec.client.model import load_model

    torch.set_num_threads(args.threads)
    texts = args.text or [t for t in DEFAULT_TEXTS if t.is_file()]
    missing = [str(t) for t in texts if not t.is_file()]
    if missing:
        print(f"--text: not a file: {', '.join(missing)}", file=sys.stderr)
        return 2
    loaded = load_model(args.model)
    cases = build_cases(loaded, texts, args)
    configs = methods(args)
    with torch.no_grad():  # warm-up: first calls pay allocator and kernel set-up
        loaded.model(torch.tensor(cases[0].prefix + cases[0].chunks[0])[None])
    per_case = []
    for i, case in enumerate(cases):
        t = time.perf_counter()
        per_case.append(run_case(loaded, case, configs, args))
        print(f"case {i + 1}/{len(cases)} ({case.kind}) {time.perf_counter() - t:.1f}s",
              file=sys.stderr, flush=True)
    rows = aggregate(per_case)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, args, len(texts))
    if not args.no_plot:
        write_plot(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
