"""RELIABILITY cases 17 and 23: one small request cannot buy a lot of work.

Every request is held to configured limits before work starts (RESOURCE_EXHAUSTED or
INVALID_ARGUMENT naming the field), and a deadline — the caller's, or the server's
``max_call_s`` — stops the work itself (key derivation, store batches), not only the reply.
Server-side time is read from the server's own latency histogram; the bounds are generous for
a busy 2-core machine, and the unbounded work they guard against takes tens of seconds.
"""

from __future__ import annotations

import time

import grpc
import pytest
from _service_fixtures import toy_context, toy_kv

from kvcodec.client.grpc_client import CacheClient, put_messages
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.errors import DeadlineExceeded, Overloaded, RequestRejected


def _big_context(tokens: int, chunk_tokens: int = 1) -> pb.Context:
    ctx = toy_context(tokens=1, chunk_tokens=chunk_tokens).to_proto()
    ctx.token_ids[:] = range(tokens)
    return ctx


def _server_seconds(server, method: str) -> float:
    return server.metrics.value("kvcodec_rpc_seconds_sum", method=method)


def _wait_idle(server, timeout: float = 30.0) -> float:
    """Seconds until no call is in flight on the server."""
    t0 = time.monotonic()
    while server.metrics.value("kvcodec_rpc_in_flight") > 0 and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_million_one_token_chunks_are_refused_up_front(start_server):
    server = start_server("memory")
    ctx = _big_context(1_000_000)  # ~3 MB on the wire
    with CacheClient(server.address, retries=0, timeout_s=20) as client:
        for call in (lambda: client.stub.Lookup(pb.LookupRequest(context=ctx), timeout=20),
                     lambda: client.stub.Plan(pb.PlanRequest(context=ctx), timeout=20),
                     lambda: list(client.stub.Get(pb.GetRequest(
                         context=ctx, chunks=[pb.ChunkRef(index=0)]), timeout=20)),
                     lambda: client.stub.Put(iter([pb.PutRequest(context=ctx), pb.PutRequest(
                         begin=pb.PutChunk(index=0, level="high", total_bytes=10), data=bytes(10))]),
                         timeout=20)):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1000000 tokens > max_context_tokens 524288" in info.value.details()
        assert client.health() == "SERVING"
    for method in ("Lookup", "Plan", "Get", "Put"):
        assert _server_seconds(server, method) < 5.0, method


def test_too_many_chunks_keys_or_refs_are_refused_naming_the_field(start_server):
    server = start_server("memory", max_chunks_per_request=100)
    keys = ["0" * 64] * 101
    with CacheClient(server.address, retries=0) as client:
        with pytest.raises(Overloaded, match="context.chunk_tokens: 404 tokens in chunks of 4 make "
                                             "101 chunks > max_chunks_per_request 100"):
            client.lookup(toy_context(tokens=404, chunk_tokens=4))
        with pytest.raises(Overloaded, match="keys: 101 entries > max_chunks_per_request 100"):
            client.lookup(keys=keys)
        with pytest.raises(Overloaded, match="keys: 101 entries > max_chunks_per_request 100"):
            client.delete(keys)
        with pytest.raises(Overloaded, match="chunks: 101 entries > max_chunks_per_request 100"):
            list(client.get_chunks([pb.ChunkRef(key=k) for k in keys]))
        with pytest.raises(RequestRejected, match=r"levels\[1\]: 'high' listed twice"):
            client.lookup(toy_context(), levels=["high", "high"])
        assert len(client.lookup(toy_context(tokens=400, chunk_tokens=4)).chunks) == 100


def test_one_byte_pieces_are_refused_and_the_minimum_is_served(start_server):
    server = start_server("memory", min_piece_bytes=4096)
    ctx = toy_context(tokens=32, chunk_tokens=32, seed=61)
    with CacheClient(server.address, retries=0) as client:
        client.put_kv(ctx, *toy_kv(ctx, 61), level="lossless")
        for piece in (1, 4095):
            request = pb.GetRequest(context=ctx.to_proto(), chunks=[pb.ChunkRef(index=0,
                                    level="lossless")], piece_bytes=piece)
            with pytest.raises(grpc.RpcError) as info:
                list(client.stub.Get(request, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == f"piece_bytes: {piece} < min_piece_bytes 4096"
        request.piece_bytes = 4096
        pieces = list(client.stub.Get(request, timeout=10))
        assert len(pieces) == -(-pieces[0].total_bytes // 4096) and pieces[-1].last


def test_a_reply_that_cannot_fit_is_refused_before_the_work(start_server):
    server = start_server("memory", max_message_bytes=256 * 1024, piece_bytes=128 * 1024)
    ctx = toy_context(tokens=4096, chunk_tokens=2)  # 2048 chunks x 4 levels
    with CacheClient(server.address, retries=0) as client:
        with pytest.raises(Overloaded, match=r"reply: Lookup of 2048 chunks at 4 levels would take "
                                             r"up to \d+ bytes > max_message_bytes 262144"):
            client.lookup(ctx)
        with pytest.raises(Overloaded, match="reply: Plan of 2048 chunks"):
            client.plan(ctx)
        assert len(client.lookup(ctx, levels=["high"]).chunks) == 2048  # ~240 KB: fits
    assert _server_seconds(server, "Plan") < 5.0


@pytest.mark.parametrize("method,chunks", [("Lookup", 400_000), ("Plan", 80_000)])
def test_the_callers_deadline_stops_key_derivation(start_server, method, chunks):
    """Deriving the keys of 400,000 one-token chunks and probing them (Plan: 80,000 at 4
    levels in 2 modes) takes tens of seconds here and several even on a fast idle machine;
    with a 1 s deadline the handler must stop within a few seconds, not run to the end."""
    server = start_server("memory", max_chunks_per_request=1_000_000,
                          max_context_tokens=1_000_000, max_message_bytes=128 << 20)
    ctx = _big_context(chunks)
    with CacheClient(server.address, retries=0, max_message_bytes=128 << 20) as client:
        request = pb.LookupRequest(context=ctx, levels=["high"]) if method == "Lookup" else \
            pb.PlanRequest(context=ctx, allow_blend=True)
        with pytest.raises(grpc.RpcError) as info:
            getattr(client.stub, method)(request, timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_idle(server)
        assert _server_seconds(server, method) < 6.0
        assert server.metrics.value("kvcodec_rpc_cancelled_total", method=method) == 1


def test_max_call_s_stops_a_call_without_a_deadline(start_server):
    server = start_server("memory", max_chunks_per_request=1_000_000,
                          max_context_tokens=1_000_000, max_message_bytes=64 << 20, max_call_s=0.5)
    ctx = _big_context(400_000)
    with CacheClient(server.address, retries=0, max_message_bytes=64 << 20) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Lookup(pb.LookupRequest(context=ctx, levels=["high"]))  # no deadline
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "max_call_s: Lookup stopped after 0.5 s, the server's " \
                                       "limit per call"
    assert _server_seconds(server, "Lookup") < 6.0


def test_the_deadline_stops_store_batches(start_server):
    """Lookup of present chunks reads and verifies each one; the deadline is checked between
    store batches, so a Lookup of many stored chunks stops at its deadline too."""
    server = start_server("memory")
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=62)
    with CacheClient(server.address, retries=0) as client:
        keys = [r.key for r in client.put_kv(ctx, *toy_kv(ctx, 62), level="lossless")]
        many = (keys * 2048)[:4096]
        present = client.lookup(keys=many)
        full = _server_seconds(server, "Lookup")
        assert all(c.levels[0].present for c in present.chunks)
        with pytest.raises(DeadlineExceeded):
            client.lookup(keys=many, timeout_s=full / 10)
        _wait_idle(server)
        assert _server_seconds(server, "Lookup") - full < full / 2
