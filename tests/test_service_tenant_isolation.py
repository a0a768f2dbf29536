"""RELIABILITY cases 16, 19 and 27: every caller lives in a namespace no other caller reaches.

Tenants (auth on), the open namespace (auth off) and per-request salts are checked over real
gRPC servers sharing one store: for every entry in the store, every *other* caller asking for
it by its exact stored name — or by the client key its owner used — misses, and cannot
delete it.
"""

from __future__ import annotations

import hashlib
import re

import grpc
import pytest
from _service_fixtures import toy_context, toy_kv
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcodec.client.grpc_client import CacheClient
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.errors import ConfigError, RequestRejected, TenantDenied
from kvcodec.service.naming import Namespace

TOKENS = {"token-a": "team-a", "token-b": "team-b", "token-colon": "team-a:x"}


def _present(client, ctx, level="high"):
    return [e.present for c in client.lookup(ctx, levels=[level]).chunks for e in c.levels]


def _hits(client, keys):
    return [c.blob is not None for c in client.fetch_refs([pb.ChunkRef(key=k) for k in keys])]


def test_no_caller_reaches_another_namespace_even_by_the_stored_name(start_server):
    from kvcodec.service.server import open_server_store

    shared = open_server_store("memory://")
    authed = start_server(store=shared, auth_tokens=TOKENS)
    open_server = start_server(store=shared)
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=31)
    kv = toy_kv(ctx, 31)
    with CacheClient(authed.address, token="token-a") as a, \
            CacheClient(authed.address, token="token-b") as b, \
            CacheClient(authed.address, token="token-colon") as colon, \
            CacheClient(open_server.address) as anyone:
        a_keys = [r.key for r in a.put_kv(ctx, *kv, level="high")]
        stored = list(shared.keys())
        assert len(stored) == 2 and not set(stored) & set(a_keys)  # never the client key itself
        # the old mapping of the open namespace (identity) and of tenants, computed by an attacker
        legacy = [hashlib.sha256(b"kvcodec.tenant\x00team-a\x00" + bytes.fromhex(k)).hexdigest()
                  for k in a_keys]
        for other in (b, colon, anyone, anyone.salted("team-a"), a.salted("s")):
            for names in (a_keys, stored, legacy):
                assert _hits(other, names) == [False, False]
                assert other.delete(names).deleted == 0
            assert _present(other, ctx) == [False, False]
        assert _hits(a, a_keys) == [True, True] and sorted(shared.keys()) == sorted(stored)
        # the open namespace's entries are likewise out of every tenant's reach
        open_keys = [r.key for r in anyone.put_kv(ctx, *kv, level="high")]
        open_stored = sorted(set(shared.keys()) - set(stored))
        for tenant in (a, b):
            assert _hits(tenant, open_stored) == [False, False]
        assert _hits(anyone, open_keys) == [True, True]


def test_salt_narrows_a_namespace_and_never_widens_it(start_server):
    server = start_server("memory", auth_tokens=TOKENS)
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=32)
    with CacheClient(server.address, token="token-a", salt="user-1") as salted, \
            CacheClient(server.address, token="token-b") as b:
        a = salted.salted("")
        put = salted.put_kv(ctx, *toy_kv(ctx, 32), level="high")
        assert all(r.created for r in put)
        assert _present(salted, ctx) == [True, True]
        for other in (a, a.salted("user-2"), a.salted("user-1 "), b, b.salted("user-1")):
            assert _present(other, ctx) == [False, False]
            assert other.delete([r.key for r in put]).deleted == 0
        assert _present(a.salted("user-1"), ctx) == [True, True]
        assert all(c.kv is not None for c in a.salted("user-1").fetch_kv(ctx, level="high"))
        # unsalted content of the same tokens is a separate entry
        assert all(r.created for r in a.put_kv(ctx, *toy_kv(ctx, 32), level="high"))


def test_async_client_salts_too(start_server):
    import asyncio

    from kvcodec.client.grpc_client import AsyncCacheClient

    server = start_server("memory", auth_tokens=TOKENS)
    ctx = toy_context(tokens=32, chunk_tokens=32, seed=33)

    async def run():
        async with AsyncCacheClient(server.address, token="token-a") as a:
            await a.salted("user-1").put_kv(ctx, *toy_kv(ctx, 33), level="high")
            hit = await a.salted("user-1").lookup(ctx, levels=["high"])
            miss = await a.lookup(ctx, levels=["high"])
            return hit.chunks[0].levels[0].present, miss.chunks[0].levels[0].present

    assert asyncio.run(run()) == (True, False)


def test_salt_over_the_limit_or_not_utf8_is_refused_naming_the_header(start_server):
    server = start_server("memory")
    ctx = toy_context(tokens=32, chunk_tokens=32)
    with CacheClient(server.address, retries=0) as client:
        for value, message in ((b"\xff\xfe", "x-kvcodec-salt-bin: .* is not UTF-8"),
                               (b"s" * 1025, "x-kvcodec-salt-bin: 1025 bytes, at most 1024")):
            with pytest.raises(grpc.RpcError) as info:
                client.stub.Lookup(pb.LookupRequest(context=ctx.to_proto()), timeout=10,
                                   metadata=(("x-kvcodec-salt-bin", value),))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert re.search(message, info.value.details())
        with pytest.raises(ConfigError, match="salt: 2000 bytes, at most 1024"):
            client.salted("x" * 2000)


def test_headers_that_decide_the_namespace_may_not_repeat(start_server):
    server = start_server("memory", auth_tokens=TOKENS)
    request = pb.LookupRequest(context=toy_context().to_proto())
    cases = [((("authorization", "Bearer token-a"), ("authorization", "Bearer token-b")),
              grpc.StatusCode.UNAUTHENTICATED, "authorization: sent more than once"),
             ((("authorization", "Bearer token-a"), ("x-kvcodec-salt-bin", b"1"),
               ("x-kvcodec-salt-bin", b"2")),
              grpc.StatusCode.INVALID_ARGUMENT, "x-kvcodec-salt-bin: sent more than once"),
             ((("authorization", "Bearer token-a"), ("x-kvcodec-tenant", "team-b"),
               ("x-kvcodec-tenant", "team-a")),
              grpc.StatusCode.INVALID_ARGUMENT, "x-kvcodec-tenant: sent more than once")]
    with CacheClient(server.address, retries=0) as client:
        for metadata, code, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                client.stub.Lookup(request, timeout=10, metadata=metadata)
            assert info.value.code() == code and info.value.details().startswith(message)


def test_tenant_header_without_auth_is_refused_not_ignored(start_server):
    server = start_server("memory")
    with CacheClient(server.address, tenant="team-a", retries=0) as client:
        with pytest.raises(TenantDenied, match="PERMISSION_DENIED: x-kvcodec-tenant: auth is off"):
            client.lookup(toy_context())


def test_namespace_record_follows_format_md():
    """The 'Server namespaces' record of FORMAT.md, rebuilt with hashlib, and its vector."""
    key = "98a31b57baf9aefe484519e5ba0b89fe7973ca474da496f1a1dcface668ad3aa"

    def s(text: str) -> bytes:
        return len(text.encode()).to_bytes(4, "little") + text.encode()

    record = b"kvcodec.namespace\x00" + (1).to_bytes(2, "little") + b"\x01" + s("acme") + s("")
    assert Namespace("acme").store_key(key) == hashlib.sha256(record + bytes.fromhex(key)).hexdigest()
    assert Namespace("acme").store_key(key) == VECTORS[("acme", "")]
    assert Namespace("acme", "user-1").store_key(key) == VECTORS[("acme", "user-1")]
    assert Namespace(None).store_key(key) == VECTORS[(None, "")]


VECTORS = {  # FORMAT.md, "Server namespaces"
    (None, ""): "4bf47c03991852e525c41c2561cc70bc7fbeda6276854a8f76db7bf034ae0b39",
    ("acme", ""): "6887e4d56ca17a23582aeeaeb86d7b1904a818231f8100cff26bccf392f38bd5",
    ("acme", "user-1"): "05aa3768434cf8f772d09b054fdcd8467135ef0a16f14361be64193c458db864",
}

_names = st.one_of(st.none(), st.text(max_size=6), st.sampled_from(["", "a", "a\x00", "\x00a"]))


@settings(max_examples=300, deadline=None)
@given(t1=_names, s1=st.text(max_size=6), t2=_names, s2=st.text(max_size=6),
       k1=st.binary(min_size=32, max_size=32), k2=st.binary(min_size=32, max_size=32))
def test_distinct_namespace_and_key_pairs_never_share_a_store_key(t1, s1, t2, s2, k1, k2):
    if (t1, s1, k1) == (t2, s2, k2):
        return
    assert Namespace(t1, s1).store_key(k1.hex()) != Namespace(t2, s2).store_key(k2.hex())


def test_separator_lookalikes_are_separate_namespaces():
    key = "ab" * 32
    names = [Namespace(None), Namespace(None, "a"), Namespace("a"), Namespace("a", "b"),
             Namespace("ab"), Namespace("a:b"), Namespace("a", ":b"), Namespace("a\x00", "b")]
    assert len({n.store_key(key) for n in names}) == len(names)


def test_check_salt_refuses_bytes_that_are_not_utf8():
    from kvcodec.service.naming import salt_from_header

    assert salt_from_header(None) == "" and salt_from_header(b"caf\xc3\xa9") == "café"
    with pytest.raises(RequestRejected, match="not UTF-8"):
        salt_from_header(b"\xc3")


def test_client_cli_salt(start_server, tmp_path, capsys):
    from kvcodec.cli import main
    from kvcodec.codec.kvfile import write_kv

    server = start_server("memory")
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=34)
    kvfile = tmp_path / "doc.safetensors"
    write_kv(kvfile, *toy_kv(ctx, 34), model=ctx.layout.model, token_ids=list(ctx.token_ids))
    common = [str(kvfile), "--level", "high", "--chunk-tokens", "32", "--fingerprint",
              ctx.layout.model_fingerprint, "--tokenizer", ctx.layout.tokenizer]
    client = ["client", "--server", server.address]
    assert main([*client, "--salt", "user-1", "put", *common]) == 0
    assert main([*client, "get", *common]) == 1  # another namespace: a miss
    assert main([*client, "--salt", "user-2", "get", *common]) == 1
    assert main([*client, "--salt", "user-1", "get", *common]) == 0
    assert "chunks [0, 1] missing" in capsys.readouterr().err
