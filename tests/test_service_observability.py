"""Prometheus metrics over HTTP, server reflection, health per service."""

from __future__ import annotations

import urllib.request

import grpc
from _service_fixtures import toy_context, toy_kv
from _store_fixtures import free_port

from kvcodec.client.grpc_client import CacheClient


def test_metrics_endpoint_counts_hits_misses_bytes_and_decisions(start_server):
    port = free_port()
    server = start_server("memory", metrics_port=port)
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=61)
    with CacheClient(server.address) as client:
        client.put_kv(ctx, *toy_kv(ctx, 61), level="high")
        client.fetch_kv(ctx, level="high")
        client.fetch_kv(ctx, level="compact")
        client.plan(ctx)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["kvcodec_chunk_hits_total"] == 2
    assert samples["kvcodec_chunk_misses_total"] == 2
    assert samples["kvcodec_bytes_sent_total"] > 0 and samples["kvcodec_bytes_received_total"] > 0
    assert samples['kvcodec_decisions_total{action="LOAD_KV"}'] == 2
    assert samples['kvcodec_chunks_stored_total{created="true"}'] == 2
    assert samples['kvcodec_rpc_total{code="OK",method="Get"}'] == 2
    assert 'kvcodec_rpc_seconds_bucket{le="0.005",method="Put"}' in samples


def test_reflection_lists_the_services(start_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = start_server("memory")
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in response.list_services_response.service}
    assert {"kvcodec.v1.KVCache", "grpc.health.v1.Health"} <= names


def test_health_per_service_and_shutdown(start_server):
    server = start_server("memory")
    with CacheClient(server.address) as client:
        assert client.health("kvcodec.v1.KVCache") == "SERVING"
        server.health.enter_graceful_shutdown()
        assert client.health("kvcodec.v1.KVCache") == "NOT_SERVING"
