"""Store fixtures: chunk streams, a real redis-server and moto's S3 server on loopback.

``chunk_stream(seed, tokens)`` gives real ``.kvc`` streams from
:func:`kvcodec.codec.encode` (small SmolLM2-shaped chunks); ``store`` is
parametrized over every backend so the conformance suite runs unchanged on
each. redis-server runs on a free loopback port (never the system's 6379),
moto's ThreadedMotoServer on another; both are stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import pytest

LAYERS, KV_HEADS, HEAD_DIM = 2, 1, 16
MODEL = "test-model"


# Conformance, tamper and CLI tests store real ``.kvc`` streams checked by the
# codec's verify(). Tests that need many megabytes quickly (disk full, Redis OOM,
# multipart, concurrency) store a checksummed stand-in and pass BULK_OPTIONS,
# which swaps in its verifier: the store's mechanics are the same.
USE_CODEC = True


def fake_stream(seed: int, size: int) -> bytes:
    """``b"TKVC" | u32 len | payload | u32 crc32(payload)``: a checksummed stand-in."""
    import random
    import struct
    import zlib

    payload = random.Random(seed).randbytes(size)
    return b"TKVC" + struct.pack("<I", size) + payload + struct.pack("<I", zlib.crc32(payload))


def fake_verify(blob: bytes) -> None:
    """Verifier for :func:`fake_stream`: raises the codec's own errors."""
    import struct
    import zlib

    from kvcodec.codec.errors import ChecksumMismatch, TruncatedStream, UnsupportedFormat

    if blob[:4] != b"TKVC":
        raise UnsupportedFormat(f"magic {bytes(blob[:4])!r} != b'TKVC'")
    if len(blob) < 12:
        raise TruncatedStream(f"{len(blob)} bytes")
    (size,) = struct.unpack_from("<I", blob, 4)
    if len(blob) != size + 12:
        raise TruncatedStream(f"length {len(blob)} != {size + 12}")
    (crc,) = struct.unpack_from("<I", blob, 8 + size)
    actual = zlib.crc32(blob[8 : 8 + size])
    if actual != crc:
        raise ChecksumMismatch(f"crc32 {actual:#010x} != stored {crc:#010x}")


@lru_cache(maxsize=256)
def chunk_stream(seed: int = 0, tokens: int = 8, level: str = "balanced") -> bytes:
    """A stream for a tiny random KV chunk (deterministic per seed)."""
    if not USE_CODEC:
        return fake_stream(seed, 64 * tokens)
    import torch

    from kvcodec.codec import encode

    gen = torch.Generator().manual_seed(seed)
    shape = (LAYERS, KV_HEADS, tokens, HEAD_DIM)
    keys = torch.randn(shape, generator=gen).half()
    values = torch.randn(shape, generator=gen).half()
    return encode(keys, values, level=level, model=MODEL)


BULK_OPTIONS = {"verifier": fake_verify}
VERIFIER_OPTIONS = {} if USE_CODEC else BULK_OPTIONS


def key_of(seed: int) -> str:
    """A deterministic 64-hex key for tests that do not derive keys."""
    import hashlib

    return hashlib.sha256(f"test-key-{seed}".encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P whose cluster-bus port P + 10000 is free too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """A redis-server process on a free loopback port, in its own directory."""

    def __init__(self, *extra: str, port: int | None = None, workdir: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = workdir or tempfile.mkdtemp(prefix="kvcodec-redis-")
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--protected-mode", "no", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def client(self):  # -> redis.Redis
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


class MotoS3:
    """moto's S3 server on loopback with test credentials."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def client(self):  # -> botocore S3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"kvc-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[list[RedisServer]]:
    """Three masters, no replicas, on loopback (redis-cli --cluster create)."""
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is not installed (apt-get install redis-tools)")
    nodes = [RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "2000", port=free_cluster_port())
             for _ in range(3)]
    try:
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(n.client().cluster("info").get("cluster_state") == "ok" for n in nodes):
                break
            time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


BACKENDS = ["memory", "local", "redis", "redis-cluster", "s3", "tiered"]


@pytest.fixture
def make_store(request, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """``make_store(kind, **options)`` opens a fresh, empty store of one backend."""
    from kvcodec.store import open_store

    opened = []

    def factory(kind: str, **options):
        options = {**VERIFIER_OPTIONS, **options}
        if kind == "memory":
            store = open_store("memory://", **options)
        elif kind == "local":
            store = open_store(str(tmp_path / f"local-{len(opened)}"), **options)
        elif kind == "redis":
            server = request.getfixturevalue("redis_server")
            server.client().flushall()
            store = open_store(server.url, **options)
        elif kind == "redis-cluster":
            nodes = request.getfixturevalue("redis_cluster")
            for node in nodes:
                node.client().flushall()
            store = open_store(f"redis+cluster://127.0.0.1:{nodes[0].port}", **options)
        elif kind == "s3":
            s3 = request.getfixturevalue("moto_s3")
            store = open_store(f"s3://{s3.new_bucket()}/chunks", endpoint_url=s3.endpoint, **options)
        elif kind == "tiered":
            store = open_store(str(tmp_path / f"tiered-{len(opened)}"),
                               memory_cache_bytes=1 << 20, **options)
        else:
            raise ValueError(kind)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture(params=BACKENDS)
def store(request, make_store):
    """One fresh store per backend (the conformance suite's parameter)."""
    return make_store(request.param)
