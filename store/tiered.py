"""A tiered store: caches in front of a backing store, write-through.

``TieredChunkStore([MemoryChunkStore(1 << 30), LocalChunkStore(path), redis])``
reads tier by tier (fastest first); a hit in a lower tier is copied into the
tiers above it. Writes go to the backing (last) tier first — it decides
create-only and verification — and then into every cache. Each tier verifies
its own reads, so a bad entry in any tier is removed there and the read falls
through to the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from kvcodec.store.base import ChunkStore, KeyLike
from kvcodec.store.envelope import wrap
from kvcodec.store.errors import StoreError
from kvcodec.store.keys import check_key

__all__ = ["TieredChunkStore"]

log = logging.getLogger("kvcodec.store")


class TieredChunkStore(ChunkStore):
    """Read-through, write-through tiers over one backing store.

    Args:
        tiers: caches first, the backing store last; all serve one tenant.

    Raises:
        ValueError: fewer than two tiers or mixed tenants.
    """

    scheme = "tiered"

    def __init__(self, tiers: Sequence[ChunkStore]) -> None:
        if len(tiers) < 2:
            raise ValueError(f"tiers: need a cache and a backing store, got {len(tiers)}")
        if len({t.tenant for t in tiers}) != 1:
            raise ValueError("tiers: all tiers must serve the same tenant")
        super().__init__(tenant=tiers[-1].tenant, verifier=None)
        self.tiers = list(tiers)
        self.backing = self.tiers[-1]

    def put_many(self, items: Sequence[tuple[KeyLike, bytes]]) -> list[bool]:
        """Verify once, write to the backing store, then the same bytes into the caches."""
        checked = [self.backing._checked_upload(k, d) for k, d in items]
        blobs = [(h, wrap(h, p, self.tenant)) for h, p in checked]
        created = self.backing._write_many(blobs) if blobs else []
        self.backing._count(puts=sum(created), put_existing=len(created) - sum(created))
        for cache in self.tiers[:-1]:
            try:
                cache._write_many(blobs)
            except StoreError as exc:
                log.warning("kvcodec store: cache tier %s refused a write: %s", cache.scheme, exc)
        self._count(puts=sum(created), put_existing=len(created) - sum(created))
        return created

    def _fill(self, caches: Sequence[ChunkStore], items: list[tuple[str, bytes]]) -> None:
        """Copy already-verified payloads into caches; a full cache is not an error."""
        for cache in caches:
            try:
                cache._write_many([(h, wrap(h, p, cache.tenant)) for h, p in items])
            except StoreError as exc:
                log.warning("kvcodec store: cache tier %s refused a fill: %s", cache.scheme, exc)

    def get_many(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        """Look up tier by tier; hits in lower tiers are promoted upwards."""
        out: list[bytes | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for depth, tier in enumerate(self.tiers):
            if not pending:
                break
            found = tier.get_many([keys[i] for i in pending])
            hits = [(i, b) for i, b in zip(pending, found) if b is not None]
            for i, blob in hits:
                out[i] = blob
            if hits and depth:
                self._fill(self.tiers[:depth], [(check_key(keys[i]), b) for i, b in hits])
            pending = [i for i, b in zip(pending, found) if b is None]
        self._count(hits=len(keys) - len(pending), misses=len(pending))
        return out

    def has(self, key: KeyLike) -> bool:
        """Whether any tier holds the key."""
        return any(t.has(key) for t in self.tiers)

    def delete(self, key: KeyLike) -> bool:
        """Delete from every tier; True if any held it."""
        return any([t.delete(key) for t in self.tiers])

    def keys(self) -> Iterator[str]:
        """The backing store's keys."""
        return self.backing.keys()

    def scrub(self, remove: bool = True) -> dict[str, Any]:
        """Scrub every tier; reports are merged."""
        reports = [t.scrub(remove) for t in self.tiers]
        return {"checked": sum(r["checked"] for r in reports),
                "bad": [b for r in reports for b in r["bad"]]}

    def evict_to(self, max_bytes: int) -> int:
        """Evict every tier down to ``max_bytes`` (each tier on its own budget)."""
        return sum(t.evict_to(max_bytes) for t in self.tiers)

    def stats(self) -> dict[str, Any]:
        """Own hit/miss counters plus each tier's stats under ``tiers``."""
        out = super().stats()
        out["tiers"] = [t.stats() for t in self.tiers]
        out["bad_entries"] = sum(t["bad_entries"] for t in out["tiers"])
        return out

    def health(self) -> dict[str, Any]:
        """The backing store's health, with every tier's report."""
        reports = [t.health() for t in self.tiers]
        return {**reports[-1], "backend": self.scheme, "tiers": reports}

    def close(self) -> None:
        """Close every tier."""
        for tier in self.tiers:
            tier.close()

    # Raw operations are not used: every public method is delegated above.
    def _read_many(self, hexes: Sequence[str]) -> list[bytes | None]:
        raise NotImplementedError

    def _write_new(self, hexkey: str, blob: bytes) -> bool:
        raise NotImplementedError

    def _remove(self, hexkey: str) -> bool:
        return self.delete(hexkey)

    def _exists(self, hexkey: str) -> bool:
        return self.has(hexkey)

    def _list(self) -> Iterator[str]:
        return self.keys()

    def _usage(self) -> dict[str, Any]:
        return self.backing._usage()
