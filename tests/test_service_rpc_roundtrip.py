"""End-to-end RPCs against a real server on loopback, on local, Redis and S3 stores."""

from __future__ import annotations

import pytest
import torch
from _service_fixtures import toy_context, toy_kv

from kvcodec.client.grpc_client import CacheClient
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.errors import RequestRejected


def test_put_lookup_get_decode_delete(start_server, backend):
    server = start_server(backend)
    ctx = toy_context(tokens=80, chunk_tokens=32)
    keys, values = toy_kv(ctx)
    with CacheClient(server.address) as client:
        results = client.put_kv(ctx, keys, values, level="lossless")
        assert [r.created for r in results] == [True, True, True]
        assert [r.key for r in results] == [k.hex for k in ctx.keys("lossless")]
        again = client.put_kv(ctx, keys, values, level="lossless")
        assert [r.created for r in again] == [False, False, False]

        look = client.lookup(ctx, levels=["lossless", "compact"])
        assert [c.token_count for c in look.chunks] == [32, 32, 16]
        for status in look.chunks:
            by_level = {e.level: e for e in status.levels}
            assert by_level["lossless"].present and by_level["lossless"].size_bytes > 0
            assert not by_level["compact"].present

        fetched = client.fetch_kv(ctx, level="lossless")
        got_k = torch.cat([c.kv.keys for c in fetched], dim=2)
        got_v = torch.cat([c.kv.values for c in fetched], dim=2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)

        misses = client.fetch_kv(ctx, level="compact")
        assert all(c.blob is None and c.kv is None for c in misses)

        deleted = client.delete([results[0].key, "0" * 64])
        assert deleted.deleted == 1 and list(deleted.missing) == ["0" * 64]
        stats = client.stats()
        assert stats["server"]["chunk_hits"] >= 3 and stats["store_health"]["ok"]


def test_server_encodes_raw_kv_and_plan_prefers_stored_kv(start_server):
    server = start_server("local")
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=3)
    keys, values = toy_kv(ctx, seed=3)
    with CacheClient(server.address) as client:
        client.put_kv(ctx, keys, values, level="high", encode_on_server=True)
        fetched = client.fetch_kv(ctx, level="high")
        got = torch.cat([c.kv.keys for c in fetched], dim=2).float()
        assert (got - keys.float()).abs().max() < 0.2  # lossy level, bounded error
        plan = client.plan(ctx, quality_floor="balanced", prefill_tokens_per_s=100.0)
        assert [d.action for d in plan.decisions] == [pb.ACTION_LOAD_KV] * 2
        assert all(d.level == "high" and d.expected_bytes > 0 and d.reason for d in plan.decisions)
        strict = client.plan(ctx, quality_floor="lossless", prefill_tokens_per_s=100.0)
        assert [d.action for d in strict.decisions] == [pb.ACTION_LOAD_TEXT] * 2


def _encoded(ctx, seed=0, level="balanced"):
    from kvcodec.client.grpc_client import encode_chunks

    keys, values = toy_kv(ctx, seed)
    return encode_chunks(ctx, keys, values, level)


def test_put_refuses_content_that_does_not_match_its_key(start_server):
    server = start_server("local")
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=5)
    other = toy_context(tokens=64, chunk_tokens=32, seed=6)
    chunks = _encoded(ctx)
    with CacheClient(server.address) as client:
        # chunk 1's stream claimed as chunk 0: first_position 32 != 0 (prefix mode)
        with pytest.raises(RequestRejected, match="first_position 32 != the chunk's token_start 0"):
            client.put_chunks(ctx, [(0, "balanced", chunks[1][2])])
        # a key derived from other tokens
        from kvcodec.client.grpc_client import put_messages

        msgs = list(put_messages(ctx, chunks[:1]))
        msgs[1].begin.key = other.keys("balanced")[0].hex
        with pytest.raises(Exception, match="does not match its content"):
            client.stub.Put(iter(msgs), timeout=10)
        # a stream at another level than claimed
        compact = _encoded(ctx, level="compact")
        with pytest.raises(RequestRejected, match="level"):
            client.put_chunks(ctx, [(0, "balanced", compact[0][2])])
        # a corrupted stream
        bad = bytearray(chunks[0][2])
        bad[len(bad) // 2] ^= 0x40
        with pytest.raises(RequestRejected, match="chunk 0: stream rejected"):
            client.put_chunks(ctx, [(0, "balanced", bytes(bad))])
        assert not any(e.present for c in client.lookup(ctx, levels=["balanced"]).chunks
                       for e in c.levels)


def test_bad_requests_name_the_field(start_server):
    server = start_server("memory")
    ctx = toy_context()
    with CacheClient(server.address) as client:
        with pytest.raises(RequestRejected, match=r"keys\[0\]: 'nothex'"):
            client.lookup(keys=["nothex"])
        with pytest.raises(RequestRejected, match="level: 'ultra' not one of"):
            client.lookup(ctx, levels=["ultra"])
        with pytest.raises(RequestRejected, match=r"chunks\[0\].index: 9 >= 3 chunks"):
            list(client.get_chunks([pb.ChunkRef(index=9, level="balanced")], ctx))
        with pytest.raises(RequestRejected, match="quality_floor"):
            client.plan(ctx, quality_floor="perfect")


def test_streams_coded_with_a_custom_transform_profile_round_trip(start_server, tmp_path, monkeypatch):
    """A profile from `kvcodec calibrate` in KVCODEC_PROFILE_PATH: the client encodes with its
    transform, the server verifies such streams (it needs the profile to decode them)."""
    import numpy as np

    from kvcodec.codec import inspect
    from kvcodec.codec.profile import PROFILE_PATH_ENV, Profile
    from kvcodec.codec.transform import Rope, fit_bases

    ctx = toy_context(tokens=64, chunk_tokens=32, seed=4)
    keys, values = toy_kv(ctx, seed=4)
    lay = ctx.layout
    weights = np.ones((lay.layers, 2, lay.kv_heads))
    prof = Profile(lay.model, lay.layers, lay.kv_heads, lay.head_dim, weights, {"balanced": 0.3})
    prof.rope_inv_freq = (1.0 / 10000 ** (np.arange(0, lay.head_dim, 2) / lay.head_dim)).astype(np.float32)
    prof.bases = fit_bases([(keys, values)], weights, lay.head_dim, Rope(prof.rope_inv_freq))
    prof.save(tmp_path / "svc.json")
    monkeypatch.setenv(PROFILE_PATH_ENV, str(tmp_path))
    server = start_server("local")
    with CacheClient(server.address) as client:
        assert all(r.created for r in client.put_kv(ctx, keys, values, level="balanced"))
        fetched = client.fetch_kv(ctx, level="balanced")
        assert all(inspect(c.blob).transform for c in fetched)
        got = torch.cat([c.kv.keys for c in fetched], dim=2).float()
        assert (got - keys.float()).abs().mean() < 0.2 * keys.float().abs().mean()
