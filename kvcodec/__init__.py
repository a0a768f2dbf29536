"""kvcodec: compress, store and serve LLM KV caches.

The package is one namespace with a sub-package per stage::

    kvcodec.codec    quantize + entropy-code KV tensors into a checksummed bitstream
    kvcodec.store    content-addressed chunk stores (local directory, Redis, S3, memory)
    kvcodec.proto    the gRPC API (package ``kvcodec.v1``)
    kvcodec.service  the cache-server daemon and its load/recompute controller
    kvcodec.client   the Python client, the transformers bridge and CacheBlend fusion

The most used entry points are re-exported lazily here::

    import kvcodec
    blob = kvcodec.encode(keys, values, level="balanced")
    kv = kvcodec.decode(blob)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "encode": "kvcodec.codec",
    "decode": "kvcodec.codec",
    "decode_layer": "kvcodec.codec",
    "inspect": "kvcodec.codec",
    "verify": "kvcodec.codec",
    "KVCodecError": "kvcodec.codec.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcodec' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
