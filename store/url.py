"""Store URLs → store objects.

=============================  ==========================================
``memory://``                  :class:`~kvcodec.store.memory.MemoryChunkStore`
``file:///path``, ``/path``    :class:`~kvcodec.store.local.LocalChunkStore`
(empty / None)                 local store at ``$KVCODEC_STORE`` or ``~/.cache/kvcodec/store``
``redis://host:port/db``       :class:`~kvcodec.store.redis_store.RedisChunkStore`
``rediss://…``                 the same over TLS
``redis+cluster://host:port``  the same on Redis Cluster (redis-py's RedisCluster)
``s3://bucket/prefix``         :class:`~kvcodec.store.s3.S3ChunkStore` (endpoint: ``AWS_ENDPOINT_URL``)
=============================  ==========================================

Options come as keyword arguments or as URL query parameters
(``file:///data/kv?capacity_bytes=10000000000``). ``memory_cache_bytes=N`` puts a
byte-bounded in-memory LRU in front of any backend, ``disk_cache=PATH`` a local
store in front of a remote one (both write-through, see store/tiered.py).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from kvcodec.store.base import ChunkStore
from kvcodec.store.errors import InvalidStoreURL

__all__ = ["open_store"]

_INT_OPTIONS = {"capacity_bytes", "ttl_s", "memory_cache_bytes", "multipart_threshold",
                "multipart_chunk_bytes", "max_attempts", "disk_cache_bytes"}
_FLOAT_OPTIONS = {"timeout_s", "connect_timeout_s", "sweep_age_s"}
_BOOL_OPTIONS = {"fsync"}
_STR_OPTIONS = {"tenant", "endpoint_url", "region", "disk_cache", "checksum_algorithm", "key_prefix"}


def _query_options(query: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _INT_OPTIONS | _FLOAT_OPTIONS | _BOOL_OPTIONS | _STR_OPTIONS:
            raise InvalidStoreURL(f"url: unknown option {name!r}")
        try:
            if name in _INT_OPTIONS:
                options[name] = int(value)
            elif name in _FLOAT_OPTIONS:
                options[name] = float(value)
            elif name in _BOOL_OPTIONS:
                options[name] = value.lower() in ("1", "true", "yes", "on")
            else:
                options[name] = value
        except ValueError:
            raise InvalidStoreURL(f"url: option {name}={value!r} is not a valid value") from None
    return options


def _open_backend(url: str, options: dict[str, Any]) -> ChunkStore:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from kvcodec.store.memory import MemoryChunkStore

        return MemoryChunkStore(**options)
    if scheme in ("", "file"):
        from kvcodec.store.local import LocalChunkStore

        path = unquote(parts.path) if scheme == "file" else url.split("?", 1)[0]
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise InvalidStoreURL(f"url: file URL host {parts.netloc!r} (use file:///absolute/path)")
        return LocalChunkStore(path or None, **options)
    if scheme in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        from kvcodec.store.redis_store import RedisChunkStore

        return RedisChunkStore(url.split("?", 1)[0], **options)
    if scheme == "s3":
        from kvcodec.store.s3 import S3ChunkStore

        if not parts.netloc:
            raise InvalidStoreURL(f"url: {url!r} has no bucket (s3://bucket/prefix)")
        return S3ChunkStore(parts.netloc, parts.path.lstrip("/"), **options)
    raise InvalidStoreURL(
        f"url: scheme {parts.scheme!r} not supported "
        "(memory://, file:///path, redis://, rediss://, redis+cluster://, s3://)"
    )


def open_store(url: str | os.PathLike[str] | None = None, **options: Any) -> ChunkStore:
    """Open a chunk store from a URL (see the module docstring).

    Args:
        url: store URL or a plain path; None/empty opens the default local store.
        **options: backend options (``tenant``, ``verifier``, ``capacity_bytes``,
            ``ttl_s``, ``endpoint_url``, …) plus ``memory_cache_bytes`` and
            ``disk_cache`` for tiering.

    Returns:
        A :class:`ChunkStore`.

    Raises:
        InvalidStoreURL: an unknown scheme or option.
        StoreUnavailable: the backend cannot be reached.
    """
    text = os.fspath(url) if url is not None else ""
    if "?" in text and urlsplit(text).scheme:
        options = {**_query_options(urlsplit(text).query), **options}
    memory_bytes = int(options.pop("memory_cache_bytes", 0) or 0)
    disk_cache = options.pop("disk_cache", None)
    disk_bytes = int(options.pop("disk_cache_bytes", 0) or 0)
    try:
        store = _open_backend(text, options)
    except TypeError as exc:
        raise InvalidStoreURL(f"url: {text!r}: {exc}") from None
    if not memory_bytes and not disk_cache:
        return store
    from kvcodec.store.local import LocalChunkStore
    from kvcodec.store.memory import MemoryChunkStore
    from kvcodec.store.tiered import TieredChunkStore

    common = {k: options[k] for k in ("tenant", "verifier") if k in options}
    tiers: list[ChunkStore] = []
    if memory_bytes:
        tiers.append(MemoryChunkStore(memory_bytes, **common))
    if disk_cache:
        tiers.append(LocalChunkStore(disk_cache, disk_bytes, **common))
    return TieredChunkStore([*tiers, store])
