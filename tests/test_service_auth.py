"""RELIABILITY case 19 (auth) and tenant isolation over the wire; TLS with a self-signed cert."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from _service_fixtures import toy_context, toy_kv

from kvcodec.client.grpc_client import CacheClient
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.errors import AuthError, ServerUnavailable, TenantDenied

TOKENS = {"token-of-team-a": "team-a", "token-of-team-b": "team-b"}


def test_no_or_unknown_token_is_unauthenticated(start_server):
    server = start_server("memory", auth_tokens=TOKENS)
    ctx = toy_context()
    with CacheClient(server.address, retries=0) as anonymous:
        assert anonymous.health() == "SERVING"  # probes stay open for load balancers
        with pytest.raises(AuthError, match="UNAUTHENTICATED: authorization: missing bearer token"):
            anonymous.lookup(ctx)
    with CacheClient(server.address, token="guess") as wrong:
        with pytest.raises(AuthError, match="unknown bearer token"):
            wrong.stats()


def test_wrong_tenant_is_permission_denied(start_server):
    server = start_server("memory", auth_tokens=TOKENS)
    with CacheClient(server.address, token="token-of-team-a", tenant="team-b") as client:
        with pytest.raises(TenantDenied, match="PERMISSION_DENIED: x-kvcodec-tenant: token is not "
                                               "valid for tenant 'team-b'"):
            client.lookup(toy_context())


def test_tenants_see_only_their_namespace(start_server, backend):
    server = start_server(backend, auth_tokens=TOKENS)
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=21)
    keys, values = toy_kv(ctx, 21)
    with CacheClient(server.address, token="token-of-team-a", tenant="team-a") as a, \
            CacheClient(server.address, token="token-of-team-b") as b:
        put = a.put_kv(ctx, keys, values, level="high")
        assert all(r.created for r in put)
        assert all(e.present for c in a.lookup(ctx, levels=["high"]).chunks for e in c.levels)
        assert not any(e.present for c in b.lookup(ctx, levels=["high"]).chunks for e in c.levels)
        # even with A's keys in hand, B reads only its own namespace
        assert all(c.blob is None for c in b.fetch_refs([pb.ChunkRef(key=r.key) for r in put]))
        assert b.delete([r.key for r in put]).deleted == 0
        # B storing the same content creates B's own entries, A's stay intact
        assert all(r.created for r in b.put_kv(ctx, keys, values, level="high"))
        assert all(c.kv is not None for c in a.fetch_kv(ctx, level="high"))


def _self_signed(tmp_path, stem="tls"):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / f"{stem}.crt").write_bytes(cert_pem)
    (tmp_path / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_pem


def test_tls_with_token(start_server, tmp_path):
    cert = _self_signed(tmp_path)
    server = start_server("local", tls_cert=str(tmp_path / "tls.crt"),
                          tls_key=str(tmp_path / "tls.key"), auth_tokens=TOKENS)
    ctx = toy_context(tokens=32, chunk_tokens=32, seed=22)
    address = f"localhost:{server.port}"
    with CacheClient(address, root_certificates=cert, token="token-of-team-a") as client:
        assert client.health() == "SERVING"
        assert client.put_kv(ctx, *toy_kv(ctx, 22), level="high")[0].created
        assert client.fetch_kv(ctx, level="high")[0].kv is not None
    with CacheClient(address, retries=0, timeout_s=3) as plaintext:
        with pytest.raises(ServerUnavailable):
            plaintext.health()


def test_mutual_tls_requires_a_client_certificate(start_server, tmp_path):
    server_cert = _self_signed(tmp_path, "server")
    client_cert = _self_signed(tmp_path, "client")
    server = start_server("memory", tls_cert=str(tmp_path / "server.crt"),
                          tls_key=str(tmp_path / "server.key"),
                          tls_client_ca=str(tmp_path / "client.crt"))
    address = f"localhost:{server.port}"
    with CacheClient(address, root_certificates=server_cert, client_cert=client_cert,
                     client_key=(tmp_path / "client.key").read_bytes()) as client:
        assert client.stats()["store"]["backend"] == "memory"
    with CacheClient(address, root_certificates=server_cert, retries=0, timeout_s=3) as anonymous:
        with pytest.raises(ServerUnavailable):
            anonymous.stats()
