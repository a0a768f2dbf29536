"""RELIABILITY case 12 over the wire: the store goes down and comes back.

Health turns NOT_SERVING, Get fails fast with UNAVAILABLE (after the client's
retries), Plan falls back to recomputing every chunk; after the restart the
server serves again without being restarted itself.
"""

from __future__ import annotations

import time

import pytest
from _service_fixtures import toy_context, toy_kv
from _store_fixtures import RedisServer

from kvcodec.client.grpc_client import CacheClient
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.errors import ServerUnavailable
from kvcodec.service.server import open_server_store


def _wait_health(client, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.health() == want:
            return True
        time.sleep(0.1)
    return False


def test_redis_outage_and_recovery(start_server):
    redis = RedisServer()
    try:
        store = open_server_store(redis.url, timeout_s=1.0, connect_timeout_s=0.5, max_attempts=1)
        server = start_server(store=store, health_interval_s=0.2)
        ctx = toy_context(tokens=64, chunk_tokens=32, seed=71)
        with CacheClient(server.address, retries=1, backoff_s=0.05, timeout_s=10) as client:
            client.put_kv(ctx, *toy_kv(ctx, 71), level="high")
            redis.kill()
            assert _wait_health(client, "NOT_SERVING")
            with pytest.raises(ServerUnavailable):
                client.fetch_kv(ctx, level="high")
            plan = client.plan(ctx, prefill_tokens_per_s=1.0)
            assert [d.action for d in plan.decisions] == [pb.ACTION_LOAD_TEXT] * 2
            assert plan.explanation.startswith("store unavailable")
            redis.start()  # same port, empty (no persistence): entries are gone, service is back
            assert _wait_health(client, "SERVING")
            assert all(c.blob is None for c in client.fetch_kv(ctx, level="high"))
            client.put_kv(ctx, *toy_kv(ctx, 71), level="high")
            assert all(c.kv is not None for c in client.fetch_kv(ctx, level="high"))
    finally:
        redis.stop()
