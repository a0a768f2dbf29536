"""``kvcodec encode | decode | inspect | verify``: the codec's commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from kvcodec.codec.levels import DEFAULT_LEVEL, LEVELS

MAX_INPUT_BYTES = 1 << 36  # refuse to slurp absurd files (64 GiB)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="compress a KV file (.safetensors) into a .kvc stream",
        description=(
            "Compress a KV file into a .kvc stream. Levels: lossless (bit-exact), "
            "high (near-lossless), balanced (default), compact (smallest)."
        ),
    )
    p.add_argument("input", help="KV file: safetensors with 'keys' and 'values' [layers, kv_heads, tokens, head_dim]")
    p.add_argument("output", help="where to write the .kvc stream")
    p.add_argument("--level", default=DEFAULT_LEVEL, choices=LEVELS, help="quality level (default: %(default)s)")
    p.add_argument("--token-block", type=int, default=256, help="tokens per substream (default: %(default)s)")
    p.add_argument("--profile", default="auto",
                   help="codec profile file, 'auto' (the shipped one for the KV file's model, default) or 'none'")
    p.add_argument("--json", action="store_true", help="print the stream's description as JSON")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decompress a .kvc stream into a KV file",
                       description="Decompress a .kvc stream into a KV file (safetensors).")
    p.add_argument("input", help=".kvc stream")
    p.add_argument("output", help="KV file to write (.safetensors)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="output dtype (default: the stream's)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decoder threads")
    p.add_argument("--profile", help="profile file of a transform-coded stream (shipped profiles are found by digest)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("inspect", help="describe a .kvc stream (sizes, level, bits per element)",
                       description="Describe a .kvc stream from its header and index.")
    p.add_argument("input", help=".kvc stream")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    _register_bench(sub)

    p = sub.add_parser("verify", help="check every checksum of a .kvc stream; exit 1 if any fails",
                       description="Check the header, index and every substream CRC, and that every substream decodes.")
    p.add_argument("input", nargs="+", help=".kvc stream(s)")
    p.add_argument("--quick", action="store_true", help="check CRCs only, do not decode")
    p.add_argument("--profile", help="profile file of transform-coded streams (shipped profiles are found by digest)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)


def _register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure size and speed of every level on a KV file or a synthetic chunk",
        description=(
            "Encode and decode a KV file (or a synthetic chunk of a given shape) at every level; "
            "print bits/element, ratio vs fp16, side information, max error and MB/s of fp16 KV "
            "on this machine. Quality on a real model: benchmarks/codec_bench.py."
        ),
    )
    p.add_argument("--kv", help="KV file to measure (default: a synthetic chunk)")
    p.add_argument("--shape", default="32,8,256,128",
                   help="synthetic layers,kv_heads,tokens,head_dim (default: 8B-shaped 256-token chunk)")
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    p.add_argument("--repeats", type=int, default=3, help="timing repeats; the median is reported")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decoder threads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench)


def read_input(path: str) -> bytes:
    """Read a whole input file, mapping OS errors to usage errors."""
    from kvcodec.cli import UsageError

    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise UsageError(f"{path}: not a regular file")
        if size > MAX_INPUT_BYTES:
            raise UsageError(f"{path}: {size} bytes is larger than the {MAX_INPUT_BYTES}-byte limit")
        return p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename: never half-written."""
    from kvcodec.cli import UsageError

    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{path}: directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def progress_bar(description: str, enabled: bool = True):
    """A rich progress bar on stderr; yields a ``callback(done, total)``."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _read_kv(path: str):
    from kvcodec.cli import UsageError
    from kvcodec.codec.kvfile import read_kv

    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    return read_kv(path)


def cmd_encode(args: argparse.Namespace) -> int:
    from kvcodec.cli import UsageError
    from kvcodec.codec.api import encode, inspect

    if not 1 <= args.token_block <= 4096:
        raise UsageError(f"--token-block: {args.token_block} is outside 1..4096")
    kv = _read_kv(args.input)
    with progress_bar(f"encoding ({args.level})") as cb:
        blob = encode(kv.keys, kv.values, level=args.level, model=kv.model,
                      first_position=kv.first_position, token_block=args.token_block, progress=cb,
                      profile=None if args.profile == "none" else args.profile)
    write_atomic(args.output, blob)
    info = inspect(blob)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(f"{args.output}: {info.total_bytes} bytes, {info.bits_per_element:.3f} bits/element, "
              f"{info.ratio_vs_fp16:.2f}x vs fp16 ({info.level})")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import torch

    from kvcodec.codec.api import decode, inspect
    from kvcodec.codec.kvfile import write_kv

    blob = read_input(args.input)
    info = inspect(blob)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with progress_bar("decoding") as cb:
        kv = decode(blob, dtype=dtype, progress=cb, threads=max(1, args.threads), profile=args.profile)
    target = Path(args.output)
    if not (target.parent if str(target.parent) else Path(".")).is_dir():
        from kvcodec.cli import UsageError

        raise UsageError(f"{args.output}: directory {target.parent} does not exist")
    write_kv(args.output, kv.keys, kv.values, model=info.model, first_position=info.first_position)
    print(f"{args.output}: {info.layers} layers x {info.kv_heads} kv heads x {info.tokens} tokens x "
          f"{info.head_dim} dims ({kv.keys.dtype})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from kvcodec.codec.api import inspect

    info = inspect(read_input(args.input))
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    rows = info.to_dict()
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from kvcodec.codec.api import verify
    from kvcodec.codec.errors import KVCodecError

    results = []
    for path in args.input:
        blob = read_input(path)
        try:
            info = verify(blob, full=not args.quick, threads=os.cpu_count() or 1, profile=args.profile)
            results.append({"path": path, "ok": True, "substreams": info.substreams})
        except KVCodecError as exc:
            results.append({"path": path, "ok": False, "error": str(exc), "kind": type(exc).__name__})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["ok"]:
                print(f"{r['path']}: ok ({r['substreams']} substreams)")
            else:
                print(f"{r['path']}: FAILED: {r['error']}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results) else 1


def _synthetic_kv(shape_text: str):
    """Laplace-distributed KV with a few large-magnitude key channels, fp16."""
    import torch

    from kvcodec.cli import UsageError

    try:
        shape = tuple(int(x) for x in shape_text.split(","))
    except ValueError:
        raise UsageError(f"--shape: {shape_text!r} is not four comma-separated integers") from None
    if len(shape) != 4 or min(shape) < 1 or shape[0] * shape[1] * shape[2] * shape[3] > 1 << 28:
        raise UsageError(f"--shape: {shape_text!r} must be 4 positive integers, at most 2**28 elements")
    gen = torch.Generator().manual_seed(0)
    lap = torch.distributions.Laplace(0.0, 1.0)
    keys = lap.sample(shape) * 0.8
    values = lap.sample(shape) * 0.3
    outliers = torch.randint(0, shape[3], (shape[0], shape[1], 4), generator=gen)
    keys.scatter_add_(3, outliers[:, :, None, :].expand(-1, -1, shape[2], -1), torch.full((*shape[:3], 4), 6.0))
    return keys.half(), values.half()


def cmd_bench(args: argparse.Namespace) -> int:
    import statistics
    import time

    from kvcodec.codec.api import decode, encode, inspect

    if args.kv:
        kv = _read_kv(args.kv)
        keys, values, model = kv.keys, kv.values, kv.model
    else:
        (keys, values), model = _synthetic_kv(args.shape), "synthetic"
    fp16_mb = (keys.numel() + values.numel()) * 2 / 1e6
    rows = []
    for level in args.levels:
        enc, dec = [], []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            blob = encode(keys, values, level=level, model=model)
            t1 = time.perf_counter()
            out = decode(blob, threads=max(1, args.threads))
            enc.append(t1 - t0)
            dec.append(time.perf_counter() - t1)
        info = inspect(blob)
        err = max(float((out.keys.float() - keys.float()).abs().max()),
                  float((out.values.float() - values.float()).abs().max()))
        rows.append({"level": level, "bits_per_element": info.bits_per_element,
                     "ratio_vs_fp16": info.ratio_vs_fp16,
                     "side_info_pct": 100 * info.side_info_bytes / info.total_bytes, "max_abs_error": err,
                     "encode_mb_s": fp16_mb / statistics.median(enc), "decode_mb_s": fp16_mb / statistics.median(dec)})
    if args.json:
        print(json.dumps({"shape": list(keys.shape), "fp16_mb": fp16_mb, "rows": rows}, indent=2))
        return 0
    print(f"KV {list(keys.shape)} ({fp16_mb:.1f} MB fp16), {os.cpu_count()} CPUs, decoder threads {args.threads}")
    print(f"{'level':<10}{'bits/el':>9}{'x fp16':>8}{'side %':>8}{'max err':>10}{'enc MB/s':>10}{'dec MB/s':>10}")
    for r in rows:
        print(f"{r['level']:<10}{r['bits_per_element']:>9.3f}{r['ratio_vs_fp16']:>8.2f}{r['side_info_pct']:>8.2f}"
              f"{r['max_abs_error']:>10.4f}{r['encode_mb_s']:>10.0f}{r['decode_mb_s']:>10.0f}")
    return 0
