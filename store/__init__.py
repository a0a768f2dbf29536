"""kvcodec.store: a content-addressed store of encoded KV chunks.

Keys (store/keys.py) name what a chunk is — model, tokenizer, layout, codec
profile, tokens, reuse mode, tenant — as a SHA-256, so every process and
machine meeting the same content finds the same chunk. Backends behind one
interface (store/base.py): local directory (default), memory, Redis, S3, and a
tiered front. Every read is verified before bytes are returned.

Example::

    from kvcodec.store import open_store, KeySpec

    store = open_store("file:///var/cache/kvcodec")
    spec = KeySpec(model="smollm2-135m", layers=30, kv_heads=3, head_dim=64)
    for key in spec.chunk_keys(token_ids):
        blob = store.get(key.hex)
"""

from kvcodec.store.base import ChunkStore
from kvcodec.store.errors import (
    IntegrityError,
    InvalidKey,
    InvalidStoreURL,
    KeyMismatch,
    StoreError,
    StoreFull,
    StoreUnavailable,
)
from kvcodec.store.keys import ChunkKey, KeySpec, chunk_token_ids, config_fingerprint
from kvcodec.store.url import open_store

__all__ = [
    "open_store",
    "ChunkStore",
    "ChunkKey",
    "KeySpec",
    "chunk_token_ids",
    "config_fingerprint",
    "StoreError",
    "InvalidKey",
    "InvalidStoreURL",
    "IntegrityError",
    "KeyMismatch",
    "StoreUnavailable",
    "StoreFull",
]
