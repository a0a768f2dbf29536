"""Scale-out and RELIABILITY case 21: replicas over one Redis; a bounded mixed load."""

from __future__ import annotations

import random
import statistics
import threading
import time

from _service_fixtures import open_backend, toy_context, toy_kv

from kvcodec.client.grpc_client import CacheClient, encode_chunks
from kvcodec.proto import kvcodec_pb2 as pb


def test_two_replicas_over_one_redis(start_server, request, tmp_path):
    store_a = open_backend("redis", request, tmp_path)
    from kvcodec.service.server import open_server_store

    store_b = open_server_store(request.getfixturevalue("redis_server").url)
    a, b = start_server(store=store_a), start_server(store=store_b)
    ctx = toy_context(tokens=96, chunk_tokens=32, seed=41)
    keys, values = toy_kv(ctx, 41)
    with CacheClient(a.address) as ca, CacheClient(b.address) as cb:
        assert all(r.created for r in ca.put_kv(ctx, keys, values, level="high"))
        assert all(e.present for c in cb.lookup(ctx, levels=["high"]).chunks for e in c.levels)
        from_b = cb.fetch_kv(ctx, level="high")
        from_a = ca.fetch_kv(ctx, level="high")
        assert all(x.blob == y.blob for x, y in zip(from_a, from_b))
        assert [r.created for r in cb.put_kv(ctx, keys, values, level="high")] == [False] * 3
        cb.delete([from_b[0].key])
        assert ca.fetch_kv(ctx, level="high")[0].blob is None


def _worker(address, contexts, acked, lock, latencies, errors, stop_at, seed):
    rng = random.Random(seed)
    with CacheClient(address, timeout_s=30) as client:
        while time.monotonic() < stop_at:
            ctx, chunks = rng.choice(contexts)
            t0 = time.perf_counter()
            try:
                if rng.random() < 0.4:
                    results = client.put_chunks(ctx, chunks)
                    with lock:
                        acked.update(r.key for r in results)
                    kind = "put"
                else:
                    refs = [pb.ChunkRef(index=i, level="high") for i in range(len(chunks))]
                    list(client.get_chunks(refs, ctx))
                    kind = "get"
            except Exception as exc:  # recorded, asserted empty below
                errors.append(repr(exc))
                continue
            latencies.setdefault(kind, []).append(time.perf_counter() - t0)


def test_bounded_mixed_load_loses_no_acknowledged_write(start_server, backend):
    server = start_server(backend, max_workers=16, max_concurrent_rpcs=64)
    contexts = []
    for seed in range(12):
        ctx = toy_context(tokens=64, chunk_tokens=32, seed=100 + seed)
        contexts.append((ctx, encode_chunks(ctx, *toy_kv(ctx, seed), level="high")))
    acked: set[str] = set()
    lock, errors, latencies = threading.Lock(), [], {}
    stop_at = time.monotonic() + 3.0
    threads = [threading.Thread(target=_worker, args=(server.address, contexts, acked, lock,
                                                      latencies, errors, stop_at, i))
               for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert acked, "no write was acknowledged"
    with CacheClient(server.address) as client:
        present = {e.key for c in client.lookup(keys=sorted(acked)).chunks for e in c.levels
                   if e.present}
    assert present == acked
    for kind, values in sorted(latencies.items()):
        q = statistics.quantiles(values, n=100)
        print(f"{backend} {kind}: n={len(values)} p50={q[49] * 1e3:.1f} ms p99={q[98] * 1e3:.1f} ms")
    assert sum(len(v) for v in latencies.values()) > 12
