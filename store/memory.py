"""An in-process, byte-bounded LRU chunk store (``memory://``).

Used on its own (tests, a single process) and as the front tier of
:class:`~kvcodec.store.tiered.TieredChunkStore`. Recency is the order of an
``OrderedDict`` (a hit moves the entry to the end); when the stored bytes
exceed ``capacity_bytes`` the oldest entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from kvcodec.store.base import ChunkStore, Verifier
from kvcodec.store.errors import StoreFull

__all__ = ["MemoryChunkStore"]


class MemoryChunkStore(ChunkStore):
    """Chunks in a dict, bounded by ``capacity_bytes`` (0 = unbounded), LRU eviction.

    Args:
        capacity_bytes: byte budget over stored entries (envelope included).
        tenant: see :class:`ChunkStore`.
        verifier: see :class:`ChunkStore`.
    """

    scheme = "memory"

    def __init__(self, capacity_bytes: int = 0, *, tenant: str = "",
                 verifier: Verifier | str | None = "auto") -> None:
        super().__init__(tenant=tenant, verifier=verifier)
        self.capacity_bytes = int(capacity_bytes)
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def _name(self, hexkey: str) -> tuple[str, str]:
        return (self.namespace, hexkey)

    def _read_many(self, hexes: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._lock:
            for h in hexes:
                blob = self._entries.get(self._name(h))
                if blob is not None:
                    self._entries.move_to_end(self._name(h))
                out.append(blob)
        return out

    def _write_new(self, hexkey: str, blob: bytes) -> bool:
        if self.capacity_bytes and len(blob) > self.capacity_bytes:
            raise StoreFull(f"memory: entry of {len(blob)} bytes exceeds capacity {self.capacity_bytes}")
        with self._lock:
            name = self._name(hexkey)
            if name in self._entries:
                self._entries.move_to_end(name)
                return False
            self._entries[name] = blob
            self._bytes += len(blob)
            evicted = self._shrink(self.capacity_bytes) if self.capacity_bytes else 0
        self._count(evictions=evicted)
        return True

    def _shrink(self, max_bytes: int) -> int:
        evicted = 0
        while self._bytes > max_bytes and self._entries:
            _, blob = self._entries.popitem(last=False)
            self._bytes -= len(blob)
            evicted += 1
        return evicted

    def _remove(self, hexkey: str) -> bool:
        with self._lock:
            blob = self._entries.pop(self._name(hexkey), None)
            if blob is None:
                return False
            self._bytes -= len(blob)
            return True

    def _exists(self, hexkey: str) -> bool:
        with self._lock:
            return self._name(hexkey) in self._entries

    def _list(self) -> Iterator[str]:
        with self._lock:
            names = list(self._entries)
        return iter([h for ns, h in names if ns == self.namespace])

    def _usage(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes,
                    "capacity_bytes": self.capacity_bytes}

    def _evict_to(self, max_bytes: int) -> int:
        with self._lock:
            return self._shrink(max_bytes)

    def _ping(self) -> Any:
        return {"entries": len(self._entries)}
