"""Where the connector's chunks live: a chunk store opened in the engine, or a cache server.

Both backends answer the same three questions in batches — which chunks are
present (with their sizes), their verified streams, and storing one — so the
scheduler makes one call per request and the worker one per load:

* :class:`StoreBackend` — any store URL (``file://``, ``redis://``,
  ``redis+cluster://``, ``s3://``, tiers) opened in the engine process; a
  request's ``cache_salt`` is the store's tenant (its own namespace and keys).
* :class:`ServerBackend` — ``kvcodec serve`` through :class:`CacheClient`
  (TLS, bearer token); the server maps every key into the namespace
  ``(token's tenant, salt)``, the salt travelling with each call.

Keys name the salt as :meth:`ChunkBackend.key_tenant` says: the tenant of an
embedded store's keys, nothing on the server (whose namespaces do it).

Errors of either (store, gRPC, OS) surface as themselves; the connector turns
each into a miss or a recompute.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from kvcodec.client.vllm.settings import CHUNK_TOKENS, ConnectorSettings
from kvcodec.store.keys import ChunkKey, ModelLayout

__all__ = ["ChunkBackend", "StoreBackend", "ServerBackend", "LazyBackend", "open_backend"]

MAX_TENANT_HANDLES = 16


class ChunkBackend:
    """What the connector needs of a place that keeps chunks."""

    def key_tenant(self, salt: str) -> str:
        """The tenant a request's keys are derived with (its salt, on an embedded store)."""
        return salt

    def sizes(self, keys: Sequence[ChunkKey], salt: str = "") -> list[int | None]:
        """Stored size of each key's entry in one batch (None = absent, 0 = present, size unknown)."""
        raise NotImplementedError

    def fetch(self, keys: Sequence[ChunkKey], salt: str = "") -> list[bytes | None]:
        """Verified streams in one batch (None = missing or bad)."""
        raise NotImplementedError

    def save(self, key: ChunkKey, blob: bytes, token_ids: Sequence[int], salt: str = "") -> bool:
        """Store one chunk (create-only); ``token_ids`` runs from the prompt's start to the
        chunk's end. Returns True if written."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where the chunks go, for logs."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


class StoreBackend(ChunkBackend):
    """A chunk store opened in the engine (one handle per tenant, opened on first use).

    Args:
        url: store URL ("" = the embedded local store).
    """

    def __init__(self, url: str) -> None:
        from kvcodec.store import open_store

        self.url = url
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._handles[""] = open_store(url or None)

    def _store(self, tenant: str) -> Any:
        from kvcodec.store import open_store

        with self._lock:
            handle = self._handles.get(tenant)
            if handle is not None:
                self._handles.move_to_end(tenant)
                return handle
        handle = open_store(self.url or None, tenant=tenant)
        with self._lock:
            self._handles[tenant] = handle
            while len(self._handles) > MAX_TENANT_HANDLES:
                name, old = next((k, v) for k, v in self._handles.items() if k)
                del self._handles[name]
                old.close()
        return handle

    def sizes(self, keys: Sequence[ChunkKey], salt: str = "") -> list[int | None]:
        return self._store(salt).sizes(list(keys)) if keys else []

    def fetch(self, keys: Sequence[ChunkKey], salt: str = "") -> list[bytes | None]:
        return self._store(salt).get_many(list(keys)) if keys else []

    def save(self, key: ChunkKey, blob: bytes, token_ids: Sequence[int], salt: str = "") -> bool:
        return bool(self._store(salt).put(key, blob))

    def describe(self) -> str:
        return f"store {self._handles[''].scheme}:{self.url or '(default local store)'}"

    def close(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), OrderedDict()
        for handle in handles:
            handle.close()


class ServerBackend(ChunkBackend):
    """A kvcodec cache server (``kvcodec serve``).

    Keys are the client's (no tenant); the server maps them into the namespace of
    the bearer token's tenant narrowed by the request's salt (a header on every call).
    """

    def __init__(self, settings: ConnectorSettings, layout: ModelLayout) -> None:
        from kvcodec.client.grpc_client import CacheClient
        from kvcodec.client.grpc_messages import ModelLayout as ClientLayout

        self.address = settings.server
        self.layout = ClientLayout(**layout.__dict__)
        self.client = CacheClient(
            settings.server, token=settings.bearer_token() or None,
            root_certificates=settings.read_pem("tls_ca"), tls=settings.tls,
            client_cert=settings.read_pem("tls_cert"), client_key=settings.read_pem("tls_key"),
            server_name=settings.server_name or None, timeout_s=settings.load_timeout_s,
            retries=1)

    def key_tenant(self, salt: str) -> str:
        return ""

    def _client(self, salt: str) -> Any:
        return self.client.salted(salt) if salt else self.client

    def sizes(self, keys: Sequence[ChunkKey], salt: str = "") -> list[int | None]:
        if not keys:
            return []
        resp = self._client(salt).lookup(keys=[k.hex for k in keys])
        out: list[int | None] = []
        for status in resp.chunks:
            entry = status.levels[0] if status.levels else None
            out.append(entry.size_bytes if entry is not None and entry.present else None)
        return out

    def fetch(self, keys: Sequence[ChunkKey], salt: str = "") -> list[bytes | None]:
        from kvcodec.proto import kvcodec_pb2 as pb

        refs = [pb.ChunkRef(key=k.hex, index=k.index, level=k.spec.codec_profile if k.spec else "")
                for k in keys]
        blobs: list[bytes | None] = [None] * len(keys)
        for chunk in self._client(salt).get_chunks(refs):
            if chunk.blob is not None and _bound(keys[chunk.position], chunk.blob):
                blobs[chunk.position] = chunk.blob
        return blobs

    def save(self, key: ChunkKey, blob: bytes, token_ids: Sequence[int], salt: str = "") -> bool:
        from kvcodec.client.grpc_messages import CacheContext

        ctx = CacheContext(self.layout, list(token_ids), CHUNK_TOKENS)
        level = key.spec.codec_profile if key.spec else "balanced"
        results = self._client(salt).put_chunks(ctx, [(key.index, level, blob)])
        return bool(results and results[0].created)

    def describe(self) -> str:
        return f"kvcodec server {self.address}"

    def close(self) -> None:
        self.client.close()


class LazyBackend(ChunkBackend):
    """Opens the real backend on first use, and again (at most every ``retry_s``) after a
    failed open: a store that is down when the engine starts is a miss, not a crash."""

    def __init__(self, settings: ConnectorSettings, layout: ModelLayout, retry_s: float = 5.0) -> None:
        self.settings, self.layout, self.retry_s = settings, layout, retry_s
        self._inner: ChunkBackend | None = None
        self._failed_at = 0.0
        self._lock = threading.Lock()

    def _get(self) -> ChunkBackend:
        import time

        with self._lock:
            if self._inner is None:
                if self._failed_at and time.monotonic() - self._failed_at < self.retry_s:
                    raise ConnectionError(f"{self._where()}: unavailable (retrying every "
                                          f"{self.retry_s:g} s)")
                try:
                    self._inner = (ServerBackend(self.settings, self.layout) if self.settings.server
                                   else StoreBackend(self.settings.store))
                except Exception:
                    self._failed_at = time.monotonic()
                    raise
            return self._inner

    def _where(self) -> str:
        return self.settings.server or self.settings.store or "default local store"

    def key_tenant(self, salt: str) -> str:
        return "" if self.settings.server else salt

    def sizes(self, keys: Sequence[ChunkKey], salt: str = "") -> list[int | None]:
        return self._get().sizes(keys, salt)

    def fetch(self, keys: Sequence[ChunkKey], salt: str = "") -> list[bytes | None]:
        return self._get().fetch(keys, salt)

    def save(self, key: ChunkKey, blob: bytes, token_ids: Sequence[int], salt: str = "") -> bool:
        return self._get().save(key, blob, token_ids, salt)

    def describe(self) -> str:
        return self._inner.describe() if self._inner is not None else self._where()

    def close(self) -> None:
        with self._lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()


def _bound(key: ChunkKey, blob: bytes) -> bool:
    """Whether a stream from the server is the chunk its key names (layout, level, tokens)."""
    from kvcodec.codec import inspect
    from kvcodec.codec.errors import KVCodecError
    from kvcodec.store.base import check_binding
    from kvcodec.store.errors import IntegrityError

    try:
        check_binding(key, inspect(blob), key.tenant)  # server keys carry no tenant
    except (IntegrityError, KVCodecError):
        return False
    return True


def open_backend(settings: ConnectorSettings, layout: ModelLayout) -> ChunkBackend:
    """The backend the settings name (the cache server if ``server`` is set, else the store),
    opened on first use."""
    return LazyBackend(settings, layout)
