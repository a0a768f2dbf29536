"""Carrying out plans on the client (LOAD_KV / LOAD_TEXT / BLEND) with a tiny real Llama."""

from __future__ import annotations

import torch

from kvcodec.client.grpc_client import CacheClient, CacheContext, ModelLayout, encode_chunks
from kvcodec.client.model import prefill
from kvcodec.client.plan_exec import run_plan
from kvcodec.proto import kvcodec_pb2 as pb


def _setup(tiny_llama, seed=0):
    layout = ModelLayout.from_loaded(tiny_llama, dtype="float32")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (96,), generator=gen).tolist()
    return layout, ids, CacheContext(layout, ids, chunk_tokens=32)


def test_mixed_plan_rebuilds_the_exact_prefix_kv(start_server, tiny_llama):
    server = start_server("local")
    layout, ids, ctx = _setup(tiny_llama)
    full_k, full_v = prefill(tiny_llama, ids)
    stored = encode_chunks(ctx, full_k, full_v, "lossless")[:2]  # chunks 0 and 1 only
    with CacheClient(server.address) as client:
        client.put_chunks(ctx, stored)
        plan = client.plan(ctx, quality_floor="exact", prefill_tokens_per_s=1.0)
        assert [d.action for d in plan.decisions] == [pb.ACTION_LOAD_KV] * 2 + [pb.ACTION_LOAD_TEXT]
        out = run_plan(client, tiny_llama, ctx, plan)
    assert out.actions == ["LOAD_KV", "LOAD_KV", "LOAD_TEXT"]
    assert torch.allclose(out.keys, full_k, atol=1e-4) and torch.allclose(out.values, full_v, atol=1e-4)
    assert not out.suffix_done and out.timings["prefill"] > 0


def test_trailing_position_free_chunk_is_blended(start_server, tiny_llama):
    server = start_server("local")
    layout, ids, ctx = _setup(tiny_llama, seed=1)
    full_k, full_v = prefill(tiny_llama, ids[:64])
    alone_k, alone_v = prefill(tiny_llama, ids[64:])  # chunk 2 computed on its own, from 0
    free = CacheContext(layout, ids, chunk_tokens=32, mode="position_free")
    question = [5, 6, 7, 8]
    with CacheClient(server.address) as client:
        client.put_chunks(ctx, encode_chunks(CacheContext(layout, ids[:64], 32), full_k, full_v,
                                             "lossless"))
        blob = encode_chunks(CacheContext(layout, ids[64:], 32, "position_free"), alone_k, alone_v,
                             "lossless")[0][2]
        client.put_chunks(free, [(2, "lossless", blob)])
        plan = client.plan(ctx, quality_floor="balanced", prefill_tokens_per_s=1.0, allow_blend=True)
        assert [d.action for d in plan.decisions] == [pb.ACTION_LOAD_KV] * 2 + [pb.ACTION_BLEND]
        assert "recompute" in plan.decisions[2].reason
        out = run_plan(client, tiny_llama, ctx, plan, suffix_ids=question)
    assert out.actions == ["LOAD_KV", "LOAD_KV", "BLEND"] and out.suffix_done
    assert out.keys.shape[2] == 96 + len(question) and out.logits_last.shape == (128,)
    assert torch.allclose(out.keys[:, :, :64], full_k, atol=1e-4)


def test_chunk_evicted_after_plan_is_recomputed(start_server, tiny_llama):
    server = start_server("local")
    layout, ids, ctx = _setup(tiny_llama, seed=2)
    full_k, full_v = prefill(tiny_llama, ids)
    with CacheClient(server.address) as client:
        results = client.put_chunks(ctx, encode_chunks(ctx, full_k, full_v, "lossless"))
        plan = client.plan(ctx, quality_floor="exact", prefill_tokens_per_s=1.0)
        client.delete([results[1].key])
        out = run_plan(client, tiny_llama, ctx, plan)
    assert out.actions == ["LOAD_KV", "LOAD_KV->LOAD_TEXT", "LOAD_KV"]
    assert torch.allclose(out.keys, full_k, atol=1e-4)


def test_adaptive_run_redecides_per_chunk(start_server, tiny_llama):
    server = start_server("local")
    layout, ids, ctx = _setup(tiny_llama, seed=3)
    full_k, full_v = prefill(tiny_llama, ids)
    with CacheClient(server.address) as client:
        client.put_chunks(ctx, encode_chunks(ctx, full_k, full_v, "lossless")[:2])
        plan = client.plan(ctx, quality_floor="exact", prefill_tokens_per_s=1.0)
        out = run_plan(client, tiny_llama, ctx, plan, adaptive=True, quality_floor="exact")
        assert out.actions == ["LOAD_KV", "LOAD_KV", "LOAD_TEXT"]
        assert torch.allclose(out.keys, full_k, atol=1e-4)
        fast = client.plan(ctx, quality_floor="exact", prefill_tokens_per_s=1e9)  # recompute wins
        out = run_plan(client, tiny_llama, ctx, fast, adaptive=True, quality_floor="exact")
        assert out.actions == ["LOAD_TEXT"] * 3
