"""``kvcodec client --server ADDR health|put|get|lookup|plan|stats|delete``.

For operators and scripts. Contexts are given as a KV file (``kvcodec
prefill`` writes one with ``token_ids``) or a JSON list of token ids plus the
model layout flags. ``health`` exits 0 only when the server reports SERVING.
``--json`` prints machine-readable output.

Examples::

    kvcodec client --server 127.0.0.1:50051 health
    kvcodec client --server HOST:50051 put doc.safetensors --level balanced
    kvcodec client --server HOST:50051 plan doc.safetensors --budget-ms 200 --json
    kvcodec client --server HOST:50051 get doc.safetensors -o fetched.safetensors
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any


def _mapped(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn service errors (server refused, unreachable, auth) into exit code 1."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from kvcodec.cli import DataError
        from kvcodec.service.errors import ServiceError

        try:
            return func(args)
        except ServiceError as exc:
            raise DataError(str(exc)) from None

    return run


def register(subparsers: Any) -> None:
    """Add ``kvcodec client``."""
    p = subparsers.add_parser("client", help="talk to a kvcodec cache server",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="server address")
    p.add_argument("--token", default=os.environ.get("KVCODEC_TOKEN"),
                   help="bearer token (default $KVCODEC_TOKEN)")
    p.add_argument("--salt", default=None,
                   help="narrow the namespace to (tenant, SALT), as vLLM's cache_salt does")
    p.add_argument("--ca", metavar="PEM", help="CA certificate to trust (TLS on)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default 30)")
    p.add_argument("--json", action="store_true", help="JSON output")
    sub = p.add_subparsers(dest="client_command", metavar="ACTION", required=True)
    sub.add_parser("health", help="exit 0 only if the server is SERVING").set_defaults(func=_mapped(_health))
    sub.add_parser("stats", help="server and store statistics").set_defaults(func=_mapped(_stats))
    for name, func, text in (("put", _put, "encode a KV file's chunks and store them"),
                             ("get", _get, "fetch a context's chunks (and write a KV file)"),
                             ("lookup", _lookup, "which chunks exist, at which levels"),
                             ("plan", _plan, "the controller's per-chunk decision")):
        sp = sub.add_parser(name, help=text)
        _context_args(sp)
        sp.set_defaults(func=_mapped(func))
        if name in ("put", "get"):
            sp.add_argument("--level", default="balanced", help="codec level (default balanced)")
        if name == "get":
            sp.add_argument("-o", "--output", help="write the fetched KV to this KV file")
        if name == "plan":
            sp.add_argument("--budget-ms", type=float, default=0.0, help="TTFT budget")
            sp.add_argument("--floor", default="balanced", help="quality floor (default balanced)")
            sp.add_argument("--prefill-tps", type=float, default=0.0, help="prefill tokens/s")
            sp.add_argument("--no-blend", action="store_true", help="never propose BLEND")
    dl = sub.add_parser("delete", help="delete chunks by key")
    dl.add_argument("keys", nargs="+", metavar="KEY")
    dl.set_defaults(func=_mapped(_delete))


def _context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kvfile", nargs="?", help="KV file with token_ids metadata")
    p.add_argument("--tokens", help="JSON file (or '-') with a list of token ids, instead of a KV file")
    p.add_argument("--model", help="model name (default: the KV file's)")
    p.add_argument("--fingerprint", default="", help="model fingerprint")
    p.add_argument("--tokenizer", default="", help="tokenizer identity")
    p.add_argument("--layout", metavar="L,H,D", help="layers,kv_heads,head_dim (default: the KV file's)")
    p.add_argument("--dtype", default=None, help="KV dtype (default: the KV file's, else float16)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--position-free", action="store_true", help="position-free chunk keys")


def _client(args: argparse.Namespace) -> Any:
    from kvcodec.client.grpc_client import CacheClient

    ca = None
    if args.ca:
        try:
            ca = open(args.ca, "rb").read()
        except OSError as exc:
            from kvcodec.cli import UsageError

            raise UsageError(f"--ca: cannot read {args.ca}: {exc.strerror}") from None
    return CacheClient(args.server, token=args.token, root_certificates=ca, timeout_s=args.timeout,
                       salt=args.salt)


def _context(args: argparse.Namespace) -> tuple[Any, Any]:
    """(CacheContext, KVFile or None) from the arguments."""
    from kvcodec.cli import UsageError
    from kvcodec.client.grpc_client import CacheContext, ModelLayout

    kv = None
    if args.kvfile:
        from kvcodec.codec.kvfile import read_kv

        if not os.path.exists(args.kvfile):
            raise UsageError(f"kvfile: {args.kvfile} does not exist")
        kv = read_kv(args.kvfile)
        tokens = kv.token_ids
        if tokens is None and not args.tokens:
            raise UsageError(f"kvfile: {args.kvfile} has no token_ids metadata (use --tokens)")
    if args.tokens:
        try:
            text = sys.stdin.read() if args.tokens == "-" else open(args.tokens).read()
            tokens = [int(t) for t in json.loads(text)]
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"--tokens: not a readable JSON list of token ids ({exc})") from None
    elif kv is None:
        raise UsageError("context: give a KV file or --tokens")
    if args.layout:
        try:
            layers, heads, dim = (int(x) for x in args.layout.split(","))
        except ValueError:
            raise UsageError(f"--layout: {args.layout!r} is not L,H,D") from None
    elif kv is not None:
        layers, heads, _, dim = (int(x) for x in kv.keys.shape)
    else:
        raise UsageError("--layout: required without a KV file")
    model = args.model or (kv.model if kv is not None else "")
    if not model:
        raise UsageError("--model: required (the KV file names no model)")
    dtype = args.dtype or (str(kv.keys.dtype).replace("torch.", "") if kv is not None else "float16")
    layout = ModelLayout(model, args.fingerprint, args.tokenizer, layers, heads, dim, dtype)
    mode = "position_free" if args.position_free else "prefix"
    return CacheContext(layout, tokens, args.chunk_tokens, mode), kv


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _health(args: argparse.Namespace) -> int:
    from kvcodec.service.errors import ServiceError

    with _client(args) as client:
        try:
            status = client.health(timeout_s=min(args.timeout, 10.0))
        except ServiceError as exc:
            status = f"UNREACHABLE ({exc})"
    _out(args, {"status": status}, status)
    return 0 if status == "SERVING" else 1


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
    print(json.dumps(stats, indent=2))
    return 0


def _put(args: argparse.Namespace) -> int:
    from kvcodec.cli import UsageError

    ctx, kv = _context(args)
    if kv is None:
        raise UsageError("put: needs a KV file")
    with _client(args) as client:
        results = client.put_kv(ctx, kv.keys, kv.values, level=args.level)
    rows = [{"index": r.index, "key": r.key, "created": r.created, "bytes": r.stored_bytes}
            for r in results]
    _out(args, rows, "\n".join(f"chunk {r['index']}: {r['key']} "
                               f"{'stored' if r['created'] else 'already present'} ({r['bytes']} B)"
                               for r in rows))
    return 0


def _get(args: argparse.Namespace) -> int:
    from kvcodec.cli import DataError

    ctx, _ = _context(args)
    with _client(args) as client:
        chunks = client.fetch_kv(ctx, level=args.level)
    missing = [c.position for c in chunks if c.kv is None]
    rows = [{"index": c.position, "key": c.key, "found": c.kv is not None,
             "bytes": len(c.blob or b"")} for c in chunks]
    _out(args, rows, "\n".join(f"chunk {r['index']}: {'hit' if r['found'] else 'MISS'} "
                               f"{r['bytes']} B" for r in rows))
    if missing:
        raise DataError(f"chunks {missing} missing at level {args.level}")
    if args.output:
        import torch

        from kvcodec.codec.kvfile import write_kv

        keys = torch.cat([c.kv.keys for c in chunks], dim=2)
        values = torch.cat([c.kv.values for c in chunks], dim=2)
        write_kv(args.output, keys, values, model=ctx.layout.model, token_ids=list(ctx.token_ids))
    return 0


def _lookup(args: argparse.Namespace) -> int:
    ctx, _ = _context(args)
    with _client(args) as client:
        resp = client.lookup(ctx)
    rows = [{"index": c.index, "tokens": c.token_count,
             "levels": {e.level: e.size_bytes for e in c.levels if e.present}} for c in resp.chunks]
    _out(args, rows, "\n".join(f"chunk {r['index']} ({r['tokens']} tokens): "
                               + (", ".join(f"{k} {v} B" for k, v in r["levels"].items()) or "none")
                               for r in rows))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from kvcodec.proto import kvcodec_pb2 as pb

    ctx, _ = _context(args)
    with _client(args) as client:
        plan = client.plan(ctx, args.budget_ms, args.floor, not args.no_blend, args.prefill_tps)
    rows = [{"index": d.index, "action": pb.Action.Name(d.action).removeprefix("ACTION_"),
             "level": d.level, "expected_bytes": d.expected_bytes,
             "expected_ms": round(d.expected_ms, 3), "reason": d.reason} for d in plan.decisions]
    data = {"decisions": rows, "expected_ttft_ms": plan.expected_ttft_ms,
            "within_budget": plan.within_budget, "explanation": plan.explanation}
    _out(args, data, "\n".join([f"chunk {r['index']}: {r['reason']}" for r in rows]
                               + [plan.explanation]))
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.delete(args.keys)
    _out(args, {"deleted": resp.deleted, "missing": list(resp.missing)},
         f"deleted {resp.deleted}" + (f"; missing {', '.join(resp.missing)}" if resp.missing else ""))
    return 0
