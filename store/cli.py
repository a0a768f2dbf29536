"""``kvcodec store …``: put KV files into a chunk store, read and manage entries.

    kvcodec store [--url URL] [--tenant T] put KV.safetensors [--level L] [--json]
    kvcodec store get KEY OUT.kvc       exit 1 on a miss or a bad entry
    kvcodec store has KEY               exit 0 if present, 1 if not
    kvcodec store ls | rm KEY | stats [--json] | verify | gc --max-bytes N

The default URL is the embedded local store (``$KVCODEC_STORE`` or
``~/.cache/kvcodec/store``); S3 endpoints come from ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

URL_HELP = ("store URL: file:///path or a path, memory://, redis://host:port/db, rediss://…, "
            "redis+cluster://host:port, s3://bucket/prefix (default: $KVCODEC_STORE or "
            "~/.cache/kvcodec/store)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``store`` command and its sub-commands."""
    store = subparsers.add_parser(
        "store", help="a content-addressed store of encoded KV chunks",
        description="Split KV files into chunks keyed by SHA-256 of what they are "
                    "(model, layout, level, tokens, tenant), store them verified, read them back.")
    store.add_argument("--url", default=None, help=URL_HELP)
    store.add_argument("--tenant", default="", help="tenant namespace (salt) (default: none)")
    sub = store.add_subparsers(dest="store_command", metavar="COMMAND",
                               parser_class=subparsers._parser_class)
    _add_put(sub)
    p = sub.add_parser("get", help="write one chunk's .kvc stream to a file (exit 1 on a miss)")
    p.add_argument("key", help="chunk key (64 hex digits)")
    p.add_argument("output", help="file to write the .kvc stream to")
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("has", help="exit 0 if the key is stored, 1 if not")
    p.add_argument("key")
    p.set_defaults(func=cmd_has)
    p = sub.add_parser("ls", help="list stored keys")
    p.add_argument("--json", action="store_true", help="a JSON list")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("rm", help="delete entries (exit 1 if one was missing)")
    p.add_argument("key", nargs="+")
    p.set_defaults(func=cmd_rm)
    p = sub.add_parser("stats", help="counters and usage")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("verify", help="re-check every entry; bad ones are removed; exit 1 if any")
    p.add_argument("--keep", action="store_true", help="report bad entries but do not remove them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("gc", help="evict least-recently-used entries down to a byte budget")
    p.add_argument("--max-bytes", type=int, required=True, help="bytes to keep at most")
    p.set_defaults(func=cmd_gc)
    store.set_defaults(func=lambda args: _usage(store))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _add_put(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "put", help="split a KV file into chunks, encode and store them; print their keys",
        description="Split a KV file (with token_ids metadata) into fixed-size chunks, encode "
                    "each with the codec and store it; prints one key per chunk.")
    p.add_argument("input", help="KV file (.safetensors) with token_ids metadata")
    p.add_argument("--level", default="balanced", help="codec level (default: %(default)s)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (default: 256)")
    p.add_argument("--mode", choices=("prefix", "position_free"), default="prefix",
                   help="key mode: prefix-bound (chained) or position-free (default: prefix)")
    p.add_argument("--no-tail", action="store_true", help="drop the last, shorter chunk")
    p.add_argument("--model", default=None, help="model identity (default: the file's 'model')")
    p.add_argument("--model-fingerprint", default="", help="fingerprint of weights or config")
    p.add_argument("--tokenizer", default=None, help="tokenizer identity (default: the model)")
    p.add_argument("--json", action="store_true", help="print a JSON list of chunks")
    p.set_defaults(func=cmd_put)


def _open(args: argparse.Namespace) -> Any:
    from kvcodec.cli import UsageError
    from kvcodec.store import InvalidStoreURL, open_store

    try:
        return open_store(args.url, tenant=args.tenant)
    except InvalidStoreURL as exc:
        raise UsageError(f"--url: {exc}") from None


def _key(text: str) -> str:
    from kvcodec.cli import UsageError
    from kvcodec.store.keys import check_key

    try:
        return check_key(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _spec_for(args: argparse.Namespace, kv: Any) -> Any:
    from kvcodec.cli import DataError, UsageError
    from kvcodec.codec.levels import LEVELS
    from kvcodec.store import KeySpec

    if args.level not in LEVELS:
        raise UsageError(f"--level: {args.level!r} not one of {', '.join(LEVELS)}")
    if kv.token_ids is None:
        raise DataError(f"{args.input}: no token_ids metadata; keys need the chunk's tokens")
    if args.mode == "prefix" and kv.first_position != 0:
        raise UsageError(f"{args.input}: first_position {kv.first_position} != 0; prefix keys "
                         "chain from the first token (use --mode position_free)")
    model = args.model or kv.model
    if not model:
        raise UsageError(f"{args.input}: no model metadata; pass --model")
    layers, kv_heads, _, head_dim = kv.keys.shape
    return KeySpec(model=model, model_fingerprint=args.model_fingerprint,
                   tokenizer=args.tokenizer or model, layers=int(layers), kv_heads=int(kv_heads),
                   head_dim=int(head_dim), dtype=str(kv.keys.dtype), codec_profile=args.level,
                   tenant=args.tenant)


def cmd_put(args: argparse.Namespace) -> int:
    """Encode and store every chunk of a KV file; print the keys."""
    from kvcodec.cli import UsageError
    from kvcodec.codec import encode
    from kvcodec.codec.kvfile import read_kv

    if args.chunk_tokens < 1:
        raise UsageError(f"--chunk-tokens: {args.chunk_tokens} must be >= 1")
    if not Path(args.input).is_file():
        raise UsageError(f"{args.input}: no such file")
    kv = read_kv(args.input)
    spec = _spec_for(args, kv)
    keys = spec.chunk_keys(kv.token_ids, args.chunk_tokens, args.mode, include_tail=not args.no_tail)
    rows = []
    sink = kv.keys[:, :, 0] if kv.first_position == 0 else None  # every chunk's attention sink (patches)
    with _open(args) as store:
        for key in _progress(keys, "storing chunks"):
            end = key.token_start + key.token_count
            row = {"key": key.hex, "index": key.index, "token_start": key.token_start,
                   "token_count": key.token_count, "created": False, "bytes": None}
            if not store.has(key):
                blob = encode(kv.keys[:, :, key.token_start:end], kv.values[:, :, key.token_start:end],
                              level=args.level, model=spec.model,
                              first_position=kv.first_position + key.token_start, sink_keys=sink)
                row["created"], row["bytes"] = store.put(key, blob), len(blob)
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(row["key"])
    return 0


def _progress(items: list, label: str) -> Any:
    if not sys.stderr.isatty() or len(items) < 4:
        return items
    from rich.progress import track

    return track(items, description=label, console=None, transient=True)


def cmd_get(args: argparse.Namespace) -> int:
    """Write one entry's stream to a file; exit 1 on a miss."""
    from kvcodec.cli import DataError

    key = _key(args.key)
    with _open(args) as store:
        blob = store.get(key)
        if blob is None:
            raise DataError(f"key {key}: not in the store (or removed as a bad entry)")
    Path(args.output).write_bytes(blob)
    print(f"{key}: {len(blob)} bytes -> {args.output}", file=sys.stderr)
    return 0


def cmd_has(args: argparse.Namespace) -> int:
    """Exit 0 if the key is stored, else 1."""
    key = _key(args.key)
    with _open(args) as store:
        present = store.has(key)
    print("yes" if present else "no")
    return 0 if present else 1


def cmd_ls(args: argparse.Namespace) -> int:
    """List keys."""
    with _open(args) as store:
        keys = sorted(store.keys())
    print(json.dumps(keys) if args.json else "\n".join(keys))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete keys; exit 1 if any was missing."""
    keys = [_key(k) for k in args.key]
    with _open(args) as store:
        missing = [k for k in keys if not store.delete(k)]
    for key in missing:
        print(f"{key}: not in the store", file=sys.stderr)
    return 1 if missing else 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print counters and usage."""
    with _open(args) as store:
        stats = {**store.stats(), "health": store.health()}
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
    else:
        for name, value in stats.items():
            print(f"{name:18} {value}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-check every entry; exit 1 if any is bad."""
    with _open(args) as store:
        report = store.scrub(remove=not args.keep)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for bad in report["bad"]:
            print(f"BAD {bad['key']}: {bad['reason']}")
        print(f"{report['checked']} entries checked, {len(report['bad'])} bad"
              + ("" if args.keep or not report["bad"] else " (removed)"))
    return 1 if report["bad"] else 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Evict LRU entries down to --max-bytes."""
    from kvcodec.cli import UsageError

    if args.max_bytes < 0:
        raise UsageError(f"--max-bytes: {args.max_bytes} must be >= 0")
    with _open(args) as store:
        evicted = store.evict_to(args.max_bytes)
        left = store.stats().get("bytes")
    print(f"evicted {evicted} entries" + (f"; {left} bytes stored" if left is not None else ""))
    return 0
