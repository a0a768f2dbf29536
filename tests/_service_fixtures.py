"""Service fixtures: real cache servers on loopback ports over real stores.

``start_server(backend, **config)`` starts a :class:`CacheServer` on a free
127.0.0.1 port over a fresh store of one backend — ``local`` (a tmp dir),
``memory``, ``redis`` (the store engineer's redis-server fixture) or ``s3``
(moto's server) — and stops it after the test. ``toy_context``/``toy_kv`` give
small contexts and random fp16 KV so the real codec stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SERVICE_BACKENDS = ["local", "redis", "s3"]


def toy_layout(model: str = "svc-test"):  # -> ModelLayout
    from kvcodec.client.grpc_client import ModelLayout

    return ModelLayout(model=model, model_fingerprint="f" * 16, tokenizer="toy-tok",
                       layers=2, kv_heads=2, head_dim=16, dtype="float16")


def toy_context(tokens: int = 96, chunk_tokens: int = 32, seed: int = 0, mode: str = "prefix",
                model: str = "svc-test"):  # -> CacheContext
    import random

    from kvcodec.client.grpc_client import CacheContext

    rng = random.Random(seed)
    return CacheContext(toy_layout(model), [rng.randrange(50_000) for _ in range(tokens)],
                        chunk_tokens, mode)


def toy_kv(ctx: Any, seed: int = 0) -> tuple[Any, Any]:
    import torch

    lay = ctx.layout
    gen = torch.Generator().manual_seed(seed)
    shape = (lay.layers, lay.kv_heads, len(ctx.token_ids), lay.head_dim)
    return torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half()


def open_backend(kind: str, request: Any, tmp_path: Path) -> Any:
    """A fresh, empty store of ``kind`` opened as the server opens its store."""
    from kvcodec.service.server import open_server_store

    if kind == "memory":
        return open_server_store("memory://")
    if kind == "local":
        return open_server_store(str(tmp_path / "store"))
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        server.client().flushall()
        return open_server_store(server.url)
    if kind == "s3":
        s3 = request.getfixturevalue("moto_s3")
        return open_server_store(f"s3://{s3.new_bucket()}/chunks", endpoint_url=s3.endpoint)
    raise ValueError(kind)


@pytest.fixture
def start_server(request: Any, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``start_server(backend="local", store=None, **config) -> CacheServer`` (started)."""
    from kvcodec.service.config import build_config
    from kvcodec.service.server import CacheServer

    servers: list[Any] = []

    def factory(backend: str = "local", store: Any = None, **overrides: Any) -> Any:
        overrides = {"listen": "127.0.0.1:0", "calibrate": False, "grace_s": 1.0, **overrides}
        config = build_config(None, overrides, environ={})
        server = CacheServer(config, store if store is not None else
                             open_backend(backend, request, tmp_path)).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop(0)


@pytest.fixture(params=SERVICE_BACKENDS)
def backend(request: Any) -> str:
    """Each store backend the service tests run against."""
    return str(request.param)
