"""The asyncio client against a real server; retries with backoff on UNAVAILABLE."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from _service_fixtures import toy_context, toy_kv
from _store_fixtures import free_port

from kvcodec.client.grpc_client import AsyncCacheClient, CacheClient
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.errors import DeadlineExceeded, ServerUnavailable


def test_async_client_round_trip_and_plan(start_server):
    server = start_server("local")
    ctx = toy_context(tokens=96, chunk_tokens=32, seed=51)
    keys, values = toy_kv(ctx, 51)

    async def run():
        async with AsyncCacheClient(server.address) as client:
            assert await client.health() == "SERVING"
            results = await client.put_kv(ctx, keys, values, level="high")
            assert [r.created for r in results] == [True] * 3
            fetched = await client.fetch_kv(ctx, level="high")
            plan = await client.plan(ctx, prefill_tokens_per_s=100.0)
            stats = await client.stats()
            return fetched, plan, stats, client.measured

    fetched, plan, stats, measured = asyncio.run(run())
    got = torch.cat([c.kv.keys for c in fetched], dim=2).float()
    assert (got - keys.float()).abs().max() < 0.2
    assert [d.action for d in plan.decisions] == [pb.ACTION_LOAD_KV] * 3
    assert measured.decode_elements_per_s["high"] > 0  # measured while streaming
    assert stats["server"]["chunk_hits"] == 3


def test_many_concurrent_async_fetches(start_server):
    server = start_server("memory")
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=52)

    async def run():
        async with AsyncCacheClient(server.address) as client:
            await client.put_kv(ctx, *toy_kv(ctx, 52), level="compact")
            return await asyncio.gather(*(client.fetch_kv(ctx, level="compact") for _ in range(16)))

    batches = asyncio.run(run())
    assert len(batches) == 16 and all(c.kv is not None for b in batches for c in b)


def test_sync_client_retries_until_server_is_up(start_server):
    port = free_port()
    started = {}

    def late_start():
        time.sleep(0.6)
        started["server"] = start_server("memory", listen=f"127.0.0.1:{port}")

    thread = threading.Thread(target=late_start)
    thread.start()
    try:
        with CacheClient(f"127.0.0.1:{port}", retries=8, backoff_s=0.1, timeout_s=20) as client:
            assert client.stats()["store"]["backend"] == "memory"
    finally:
        thread.join()


def test_async_client_gives_up_after_retries():
    async def run():
        async with AsyncCacheClient(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.01,
                                    timeout_s=5) as client:
            await client.stats()

    with pytest.raises(ServerUnavailable, match="UNAVAILABLE"):
        asyncio.run(run())


def test_deadline_spans_retries():
    t0 = time.monotonic()
    with CacheClient(f"127.0.0.1:{free_port()}", retries=50, backoff_s=0.2, timeout_s=1.0) as client:
        with pytest.raises((ServerUnavailable, DeadlineExceeded)):
            client.stats()
    assert time.monotonic() - t0 < 3.0
