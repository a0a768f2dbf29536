"""Chunk-store throughput and latency per backend.

For two chunk shapes — SmolLM2-135M (30 layers x 3 kv heads x 64 dims) and an
8B-class model (32 x 8 x 128), 256 tokens each, fp16, encoded at level
``balanced`` — store one real encoded chunk under many distinct keys and time
put / get one at a time and in batches (put_many / get_many). Every get is
verified as in production (envelope SHA-256 + the codec's CRC check).

Backends: memory, local directory (default), tiered (memory LRU in front of a
local directory), Redis (a redis-server started here on a free loopback port,
no persistence) and S3 (moto's server on loopback — a Python mock, so its
numbers say little about real S3).

    python benchmarks/store_bench.py [--n 24] [--batch 8] [--backends memory,local,redis]

Encoded chunks are cached under ~/.cache/kvcodec/bench (encoding the 8B chunk
takes about a minute on this CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SHAPES = {"smollm2-135m": (30, 3, 64), "8b-class": (32, 8, 128)}
TOKENS = 256
CACHE = Path.home() / ".cache" / "kvcodec" / "bench"




def chunk_blob(name: str) -> bytes:
    """One real encoded 256-token chunk of the given shape (cached on disk)."""
    layers, heads, dim = SHAPES[name]
    path = CACHE / f"{name}-{TOKENS}-balanced.kvc"
    import torch

    from kvcodec.codec import KVCodecError, encode, verify

    if path.exists():
        blob = path.read_bytes()
        try:
            verify(blob, full=False)
            return blob
        except KVCodecError:  # written by an older format version: encode again
            pass

    gen = torch.Generator().manual_seed(0)
    shape = (layers, heads, TOKENS, dim)
    keys = torch.randn(shape, generator=gen).half()
    values = torch.randn(shape, generator=gen).half()
    print(f"encoding a {name} chunk {shape} (once)...", file=sys.stderr, flush=True)
    blob = encode(keys, values, level="balanced", model=name)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return blob


def keys_for(tag: str, n: int) -> list[str]:
    return [hashlib.sha256(f"{tag}-{i}-{time.time_ns()}".encode()).hexdigest() for i in range(n)]


def timed(fn, calls) -> list[float]:
    lat = []
    for args in calls:
        t = time.perf_counter()
        fn(*args)
        lat.append(time.perf_counter() - t)
    return lat


def row(backend: str, shape: str, op: str, lat: list[float], per_call: int, size: int) -> dict:
    total = sum(lat)
    return {"backend": backend, "shape": shape, "op": op,
            "mb_s": per_call * len(lat) * size / total / 1e6,
            "p50_ms": statistics.median(lat) * 1e3 / per_call,
            "p99_ms": sorted(lat)[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 / per_call}


def bench_store(store, backend: str, shape: str, blob: bytes, n: int, batch: int) -> list[dict]:
    out = []
    single = keys_for(shape + "s", n)
    out.append(row(backend, shape, "put", timed(store.put, [(k, blob) for k in single]), 1, len(blob)))
    out.append(row(backend, shape, "get", timed(store.get, [(k,) for k in single]), 1, len(blob)))
    assert store.get(single[0]) == blob
    many = keys_for(shape + "b", n - n % batch or batch)
    groups = [many[i : i + batch] for i in range(0, len(many), batch)]
    out.append(row(backend, shape, f"put_many x{batch}",
                   timed(store.put_many, [([(k, blob) for k in g],) for g in groups]), batch, len(blob)))
    out.append(row(backend, shape, f"get_many x{batch}",
                   timed(store.get_many, [(g,) for g in groups]), batch, len(blob)))
    store.evict_to(0)
    return out


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per operation, the round with the median throughput."""
    out = []
    for same_op in zip(*rounds):
        ranked = sorted(same_op, key=lambda r: r["mb_s"])
        out.append(ranked[len(ranked) // 2])
    return out


def open_backend(name: str, tmp: Path, servers: dict):
    from kvcodec.store import open_store

    if name == "memory":
        return open_store("memory://")
    if name == "local":
        return open_store(str(tmp / "local"))
    if name == "tiered":
        return open_store(str(tmp / "tiered"), memory_cache_bytes=1 << 30)
    if name == "redis":
        if "redis" not in servers:
            from _store_fixtures import RedisServer

            servers["redis"] = RedisServer("--maxmemory", "0")
        return open_store(servers["redis"].url, timeout_s=30)
    if name == "s3":
        if "s3" not in servers:
            from _store_fixtures import MotoS3

            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            servers["s3"] = MotoS3()
        s3 = servers["s3"]
        return open_store(f"s3://{s3.new_bucket()}/bench", endpoint_url=s3.endpoint, timeout_s=60)
    raise SystemExit(f"unknown backend {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24, help="chunks per measurement")
    parser.add_argument("--batch", type=int, default=8, help="batch size for *_many")
    parser.add_argument("--backends", default="memory,local,tiered,redis,s3")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat each measurement; report the median round by MB/s")
    args = parser.parse_args(argv)
    started = machine()
    blobs = {s: chunk_blob(s) for s in args.shapes.split(",")}
    rows, servers = [], {}
    with tempfile.TemporaryDirectory(prefix="kvc-bench-") as tmp:
        try:
            for backend in args.backends.split(","):
                for shape, blob in blobs.items():
                    store = open_backend(backend, Path(tmp), servers)
                    rounds = [bench_store(store, backend, shape, blob, args.n, args.batch)
                              for _ in range(args.rounds)]
                    rows.extend(median_rows(rounds))
                    store.close()
                    print(f"done {backend} {shape}", file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()
    print(f"Machine: {started}")
    print("Chunks: 256 tokens, fp16, level balanced: "
          + ", ".join(f"{s} {len(b) / 1e6:.2f} MB" for s, b in blobs.items())
          + f"; n={args.n} per op, batch={args.batch}; median of {args.rounds} rounds; "
          "latency per chunk\n")
    print("| backend | chunk | op | MB/s | p50 ms | p99 ms |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['shape']} | {r['op']} | {r['mb_s']:.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
