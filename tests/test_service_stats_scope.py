"""Stats and the other RPCs leak nothing across tenants: a tenant sees its own figures only,
store-wide figures need an admin token, bandwidth estimates never cross tenants, store errors
do not reach clients with backend detail, and /metrics carries no tenant names."""

from __future__ import annotations

import json
import urllib.request

import pytest
from _service_fixtures import toy_context, toy_kv
from _store_fixtures import free_port

from kvcodec.client.grpc_client import CacheClient
from kvcodec.service.errors import ServerUnavailable, TenantDenied

TOKENS = {"token-a": "team-a", "token-b": "team-b"}
ADMIN = "token-of-the-operator"


def _walk_keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _walk_keys(v)


def test_a_tenant_sees_only_its_own_figures(start_server):
    server = start_server("local", auth_tokens=TOKENS, auth_admin_tokens=[ADMIN])
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=41)
    with CacheClient(server.address, token="token-a", client_id="client-of-a") as a, \
            CacheClient(server.address, token="token-b", client_id="client-of-b") as b:
        a.put_kv(ctx, *toy_kv(ctx, 41), level="high")
        a.fetch_kv(ctx, level="high")
        theirs, mine = b.stats(), a.stats()
    assert theirs["scope"] == "tenant" and theirs["tenant"] == "team-b"
    assert theirs["server"]["chunks_put"] == 0 and theirs["server"]["chunk_hits"] == 0
    assert not {"entries", "bytes", "hits", "puts", "detail"} & set(_walk_keys(theirs))
    assert "team-a" not in json.dumps(theirs) and "client-of-a" not in json.dumps(theirs)
    assert mine["server"]["chunks_put"] == 2 and mine["server"]["chunk_hits"] == 2
    assert mine["server"]["bytes_sent"] > 0 and mine["store"] == {"backend": "file"}


def test_store_wide_figures_need_an_admin_token_which_reads_nothing_else(start_server):
    server = start_server("local", auth_tokens=TOKENS, auth_admin_tokens=[ADMIN])
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=42)
    with CacheClient(server.address, token="token-a") as a, \
            CacheClient(server.address, token=ADMIN, retries=0) as admin:
        a.put_kv(ctx, *toy_kv(ctx, 42), level="high")
        wide = admin.stats()
        assert wide["scope"] == "store" and wide["store"]["entries"] == 2
        assert wide["tenants"]["team-a"]["chunks_put"] == 2 and wide["store_health"]["ok"]
        for call in (lambda: admin.lookup(ctx), lambda: admin.fetch_kv(ctx, level="high"),
                     lambda: admin.delete(["0" * 64])):
            with pytest.raises(TenantDenied, match="an admin token may call only Stats"):
                call()


def test_without_auth_stats_is_the_open_namespace_unless_admin(start_server):
    server = start_server("memory", auth_admin_tokens=[ADMIN])
    ctx = toy_context(tokens=32, chunk_tokens=32, seed=43)
    with CacheClient(server.address) as anyone, CacheClient(server.address, token=ADMIN) as admin:
        anyone.put_kv(ctx, *toy_kv(ctx, 43), level="high")
        stats = anyone.stats()
        assert stats["scope"] == "tenant" and stats["tenant"] is None
        assert "entries" not in stats["store"] and stats["server"]["chunks_put"] == 1
        assert admin.stats()["store"]["entries"] == 1


def test_bandwidth_estimates_never_cross_tenants(start_server):
    """Plan answers with the bandwidth estimate it used: with one EWMA per client id, tenant B
    naming A's client id read A's measured link speed and could move it."""
    server = start_server("memory", auth_tokens=TOKENS)
    ctx = toy_context(tokens=32, chunk_tokens=32, seed=44)
    default = server.config.default_bandwidth_bytes_per_s
    with CacheClient(server.address, token="token-a", client_id="shared-id") as a, \
            CacheClient(server.address, token="token-b", client_id="shared-id") as b:
        a.measured.bandwidth_bytes_per_s = 3e6
        assert a.plan(ctx).bandwidth_bytes_per_s == pytest.approx(3e6)
        assert b.plan(ctx).bandwidth_bytes_per_s == pytest.approx(default)
        b.measured.bandwidth_bytes_per_s = 1e3
        b.plan(ctx)
        a.measured.bandwidth_bytes_per_s = 0.0
        assert a.plan(ctx).bandwidth_bytes_per_s == pytest.approx(3e6)
        assert list(b.stats()["bandwidth_bytes_per_s"]) == ["shared-id"]


def test_over_long_client_id_is_refused_naming_the_field(start_server):
    from kvcodec.service.errors import RequestRejected

    server = start_server("memory")
    with CacheClient(server.address, client_id="c" * 129, retries=0) as client:
        with pytest.raises(RequestRejected, match="client.client_id: 129 characters, at most 128"):
            client.plan(toy_context())


def test_store_errors_reach_clients_without_backend_detail(start_server):
    from kvcodec.service.server import open_server_store

    port = free_port()  # nothing listens there
    store = open_server_store(f"redis://127.0.0.1:{port}/0", timeout_s=0.5,
                              connect_timeout_s=0.2, max_attempts=1)
    server = start_server(store=store)
    with CacheClient(server.address, retries=0, timeout_s=10) as client:
        with pytest.raises(ServerUnavailable) as info:
            client.lookup(keys=["0" * 64])
    assert "store unavailable (details in the server log)" in str(info.value)
    assert str(port) not in str(info.value) and "127.0.0.1" not in str(info.value)


def test_metrics_endpoint_names_no_tenant(start_server):
    port = free_port()
    server = start_server("memory", auth_tokens=TOKENS, metrics_port=port)
    ctx = toy_context(tokens=32, chunk_tokens=32, seed=45)
    with CacheClient(server.address, token="token-a", client_id="client-of-a") as a:
        a.put_kv(ctx, *toy_kv(ctx, 45), level="high")
        a.fetch_kv(ctx, level="high")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "kvcodec_chunk_hits_total 1.0" in text
    assert "team-a" not in text and "client-of-a" not in text and "token-a" not in text
