"""Redis backend (redis-py): ``redis://``, ``rediss://``, ``redis+cluster://``.

Each entry is one Redis string ``<key_prefix><namespace>:<key>`` holding the
envelope and stream. A write is ``SET … NX [EX ttl]`` — a single atomic
command, so an entry is never half-present (even if the server dies), and
create-only without a round trip. Batches are pipelined (``transaction=False``),
which redis-py's cluster client splits per node, so ``get_many``/``put_many``
cost one round trip per node. Install ``hiredis`` (in the ``store`` extra): redis-py's
pure-Python reply parser reads multi-megabyte values 3-4x slower than it writes them.

Failure mapping: connection errors and timeouts → :class:`StoreUnavailable`
(after redis-py's bounded retries); ``OOM command not allowed`` (``maxmemory``
with ``noeviction``) → :class:`StoreFull` while reads keep working; entries
evicted under an eviction policy are ordinary misses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kvcodec.store.base import ChunkStore, Verifier
from kvcodec.store.errors import InvalidStoreURL, StoreError, StoreFull, StoreUnavailable

__all__ = ["RedisChunkStore"]

PIPELINE_BATCH = 64


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    import redis.exceptions as rex

    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError) as exc:
        raise StoreUnavailable(f"redis: {what}: {exc}") from None
    except rex.ResponseError as exc:
        if isinstance(exc, rex.OutOfMemoryError) or str(exc).startswith("OOM"):
            raise StoreFull(f"redis: {what}: {exc}") from None
        if "cluster is down" in str(exc).lower() or "CLUSTERDOWN" in str(exc):
            raise StoreUnavailable(f"redis: {what}: {exc}") from None
        raise StoreError(f"redis: {what}: {exc}") from None
    except rex.RedisError as exc:  # cluster down, auth, …
        if "OOM" in str(exc) or "maxmemory" in str(exc):
            raise StoreFull(f"redis: {what}: {exc}") from None
        raise StoreUnavailable(f"redis: {what}: {type(exc).__name__}: {exc}") from None


def _client(url: str, timeout_s: float, connect_timeout_s: float, max_attempts: int) -> Any:
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), max(0, max_attempts - 1))
    common = {"socket_timeout": timeout_s, "socket_connect_timeout": connect_timeout_s,
              "retry": retry}
    if scheme.endswith("+cluster"):
        from redis.cluster import RedisCluster

        plain = urlunsplit(parts._replace(scheme=scheme.split("+")[0]))
        return RedisCluster.from_url(plain, **common)
    return redis.Redis.from_url(url, retry_on_timeout=True, **common)


class RedisChunkStore(ChunkStore):
    """Chunks as Redis strings, single server or cluster.

    Args:
        url: ``redis://host:port/db``, ``rediss://…`` (TLS), ``unix://…`` or
            ``redis+cluster://host:port`` (any node of the cluster).
        ttl_s: expire entries this many seconds after writing (0 = never).
        key_prefix: prefix of every Redis key.
        timeout_s, connect_timeout_s: socket timeouts per attempt.
        max_attempts: attempts per command (bounded exponential backoff).
        tenant, verifier: see :class:`ChunkStore`.

    Raises:
        InvalidStoreURL: a URL redis-py cannot parse.
    """

    scheme = "redis"

    def __init__(self, url: str, *, ttl_s: int = 0, key_prefix: str = "kvc:",
                 timeout_s: float = 5.0, connect_timeout_s: float = 2.0, max_attempts: int = 3,
                 tenant: str = "", verifier: Verifier | str | None = "auto") -> None:
        super().__init__(tenant=tenant, verifier=verifier)
        self.url, self.ttl_s, self.key_prefix = url, int(ttl_s), key_prefix
        self.cluster = urlsplit(url).scheme.lower().endswith("+cluster")
        try:
            with _mapped("connect"):
                self._r = _client(url, timeout_s, connect_timeout_s, max_attempts)
        except ValueError as exc:
            raise InvalidStoreURL(f"url: {url!r}: {exc}") from None
        self._head = f"{key_prefix}{self.namespace}:"

    def _name(self, hexkey: str) -> str:
        return self._head + hexkey

    def _pipelined(self, ops: Iterable[tuple[str, tuple, dict]], what: str) -> list[Any]:
        out: list[Any] = []
        batch = list(ops)
        with _mapped(what):
            for start in range(0, len(batch), PIPELINE_BATCH):
                pipe = self._r.pipeline(transaction=False)
                for method, args, kwargs in batch[start : start + PIPELINE_BATCH]:
                    getattr(pipe, method)(*args, **kwargs)
                out.extend(pipe.execute())
        return out

    def _read_many(self, hexes: Sequence[str]) -> list[bytes | None]:
        if len(hexes) == 1:
            with _mapped("get"):
                return [self._r.get(self._name(hexes[0]))]
        return self._pipelined((("get", (self._name(h),), {}) for h in hexes), "get_many")

    def _write_new(self, hexkey: str, blob: bytes) -> bool:
        return self._write_many([(hexkey, blob)])[0]

    def _write_many(self, items: Iterable[tuple[str, bytes]]) -> list[bool]:
        ex = self.ttl_s or None
        ops = [("set", (self._name(h), b), {"nx": True, "ex": ex}) for h, b in items]
        if len(ops) == 1:
            with _mapped("put"):
                return [bool(self._r.set(*ops[0][1], **ops[0][2]))]
        return [bool(r) for r in self._pipelined(ops, "put_many")]

    def _remove(self, hexkey: str) -> bool:
        with _mapped("delete"):
            return bool(self._r.delete(self._name(hexkey)))

    def _sizes(self, hexes: Sequence[str]) -> list[int | None]:
        out: list[int | None] = []
        with _mapped("sizes"):
            for start in range(0, len(hexes), PIPELINE_BATCH):
                pipe = self._r.pipeline(transaction=False)
                for hexkey in hexes[start : start + PIPELINE_BATCH]:
                    pipe.strlen(self._name(hexkey))
                # a key of another type answers WRONGTYPE: a miss for that key alone
                out.extend(pipe.execute(raise_on_error=False))
        return [n if isinstance(n, int) and n > 0 else None for n in out]

    def _exists(self, hexkey: str) -> bool:
        with _mapped("exists"):
            return bool(self._r.exists(self._name(hexkey)))

    def _list(self) -> Iterator[str]:
        with _mapped("scan"):
            names = list(self._r.scan_iter(match=self._head + "*", count=1000))
        cut = len(self._head)
        return iter(sorted({(n.decode() if isinstance(n, bytes) else n)[cut:] for n in names}))

    def _usage(self) -> dict[str, Any]:
        from redis.utils import HIREDIS_AVAILABLE

        if self.cluster:
            return {"cluster": True, "ttl_s": self.ttl_s, "hiredis": HIREDIS_AVAILABLE}
        with _mapped("info"):
            info = self._r.info("memory")
        return {"used_memory": info.get("used_memory"), "maxmemory": info.get("maxmemory"),
                "maxmemory_policy": info.get("maxmemory_policy"), "ttl_s": self.ttl_s,
                "hiredis": HIREDIS_AVAILABLE}

    def _evict_to(self, max_bytes: int) -> int:
        hexes = list(self._list())
        sizes = self._pipelined((("strlen", (self._name(h),), {}) for h in hexes), "strlen")
        try:
            idle = self._pipelined((("object", ("idletime", self._name(h)), {}) for h in hexes),
                                   "object idletime")
        except StoreError:  # LFU policies refuse IDLETIME: evict in key order
            idle = [0] * len(hexes)
        total = sum(int(s or 0) for s in sizes)
        evicted = 0
        for _, size, hexkey in sorted(zip(idle, sizes, hexes), key=lambda t: -int(t[0] or 0)):
            if total <= max_bytes:
                break
            if self._remove(hexkey):
                total -= int(size or 0)
                evicted += 1
        return evicted

    def _ping(self) -> Any:
        with _mapped("ping"):
            return {"ping": bool(self._r.ping()), "cluster": self.cluster}

    def close(self) -> None:
        """Close the connection pool."""
        with contextlib.suppress(Exception):
            self._r.close()
