"""The embedded local store (the default): one directory, no server.

Layout under ``root``::

    objects/<namespace>/<key[:2]>/<key>   one file per entry (envelope + stream)
    tmp/<pid>.<key[:16]>.<random>.tmp     writes in progress
    index.sqlite3                         sizes and recency (store/local_index.py)

Writes go to ``tmp/`` and are published with ``os.link`` onto the final name:
the link is atomic and fails if the name exists, which makes writes
create-only without a lock; a killed writer leaves only a temp file, swept at
the next open (files whose writer process is gone, or older than an hour).
Files are never rewritten in place. ``fsync`` is off by default: a file torn
by power loss fails its envelope SHA-256 and reads as a clean miss.

Capacity: when the bytes recorded in the index exceed ``capacity_bytes`` the
least recently used entries (by the index's ``atime``) are deleted.
``ENOSPC``/``EDQUOT`` raise :class:`StoreFull`; reads keep working.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kvcodec.store.base import ChunkStore, Verifier
from kvcodec.store.errors import StoreError, StoreFull
from kvcodec.store.local_index import LocalIndex

__all__ = ["LocalChunkStore", "default_root"]

_KEY_NAME = re.compile(r"[0-9a-f]{64}")
EVICT_BATCH = 64


def default_root() -> Path:
    """``$KVCODEC_STORE`` if set (a path), else ``~/.cache/kvcodec/store``."""
    env = os.environ.get("KVCODEC_STORE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcodec" / "store"


def _map_os_error(exc: OSError, what: str) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"file: {what}: no space left ({exc.strerror})")
    return StoreError(f"file: {what}: {exc.strerror or exc}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalChunkStore(ChunkStore):
    """Chunks as files in a directory, with an LRU byte capacity.

    Args:
        root: the store directory (created if missing).
        capacity_bytes: byte budget (0 = unbounded); LRU eviction above it.
        fsync: fsync each file before publishing it (durability across power loss).
        sweep_age_s: temp files older than this are swept even if their
            writer process still exists.
        tenant, verifier: see :class:`ChunkStore`.

    Raises:
        StoreError: the directory or its index cannot be opened.
    """

    scheme = "file"

    def __init__(self, root: str | os.PathLike[str] | None = None, capacity_bytes: int = 0, *,
                 fsync: bool = False, sweep_age_s: float = 3600.0, tenant: str = "",
                 verifier: Verifier | str | None = "auto") -> None:
        super().__init__(tenant=tenant, verifier=verifier)
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.capacity_bytes = int(capacity_bytes)
        self.fsync = fsync
        self._objects, self._tmp = self.root / "objects", self.root / "tmp"
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(exist_ok=True)
        except OSError as exc:
            raise _map_os_error(exc, f"cannot create {self.root}") from None
        self._index = LocalIndex(self.root / "index.sqlite3")
        self.swept = self._sweep_temp(sweep_age_s)
        self._index.reconcile(self._scan())

    # ------------------------------------------------------------ layout
    def _name(self, hexkey: str, namespace: str | None = None) -> str:
        return f"{namespace or self.namespace}/{hexkey}"

    def _path(self, name: str) -> Path:
        namespace, hexkey = name.split("/")
        return self._objects / namespace / hexkey[:2] / hexkey

    def _sweep_temp(self, max_age_s: float) -> int:
        swept, now = 0, time.time()
        for entry in os.scandir(self._tmp):
            pid_text = entry.name.split(".", 1)[0]
            try:
                stale = (not pid_text.isdigit() or not _pid_alive(int(pid_text))
                         or now - entry.stat().st_mtime > max_age_s)
                if stale:
                    os.unlink(entry.path)
                    swept += 1
            except FileNotFoundError:
                continue
        return swept

    def _scan(self) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        for ns_dir in os.scandir(self._objects):
            if not ns_dir.is_dir():
                continue
            for shard in os.scandir(ns_dir.path):
                if not shard.is_dir():
                    continue
                for entry in os.scandir(shard.path):
                    if _KEY_NAME.fullmatch(entry.name):
                        st = entry.stat()
                        found[f"{ns_dir.name}/{entry.name}"] = (st.st_size, st.st_mtime_ns)
        return found

    # --------------------------------------------------------- raw operations
    def _read_many(self, hexes: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for hexkey in hexes:
            name = self._name(hexkey)
            try:
                with open(self._path(name), "rb") as f:
                    out.append(f.read())
            except FileNotFoundError:
                out.append(None)
                continue
            except OSError as exc:
                raise _map_os_error(exc, f"read {hexkey[:12]}…") from None
            self._index.touch(name)
        return out

    def _write_new(self, hexkey: str, blob: bytes) -> bool:
        if self.capacity_bytes and len(blob) > self.capacity_bytes:
            raise StoreFull(f"file: entry of {len(blob)} bytes exceeds capacity {self.capacity_bytes}")
        name = self._name(hexkey)
        final = self._path(name)
        if final.exists():
            return False
        tmp = self._tmp / f"{os.getpid()}.{hexkey[:16]}.{secrets.token_hex(6)}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(blob)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
        except OSError as exc:
            raise _map_os_error(exc, f"write {hexkey[:12]}…") from None
        finally:
            tmp.unlink(missing_ok=True)
        try:
            self._index.add(name, len(blob))
        except StoreError:  # e.g. the index hit ENOSPC: do not leave an unaccounted entry
            final.unlink(missing_ok=True)
            raise
        if self.capacity_bytes:
            self._count(evictions=self._shrink(self.capacity_bytes))
        return True

    def _shrink(self, max_bytes: int) -> int:
        evicted = 0
        while self._index.totals()[0] > max_bytes:
            victims = self._index.oldest(EVICT_BATCH)
            if not victims:
                break
            for name, _size in victims:
                self._unlink(name)
                evicted += 1
                if self._index.totals()[0] <= max_bytes:
                    break
        return evicted

    def _unlink(self, name: str) -> bool:
        try:
            os.unlink(self._path(name))
            existed = True
        except FileNotFoundError:
            existed = False
        except OSError as exc:
            raise _map_os_error(exc, f"delete {name}") from None
        self._index.remove(name)
        return existed

    def _remove(self, hexkey: str) -> bool:
        return self._unlink(self._name(hexkey))

    def _exists(self, hexkey: str) -> bool:
        return self._path(self._name(hexkey)).exists()

    def _sizes(self, hexes: Sequence[str]) -> list[int | None]:
        out: list[int | None] = []
        for hexkey in hexes:
            try:
                info = os.stat(self._path(self._name(hexkey)))
            except FileNotFoundError:
                out.append(None)
                continue
            except OSError as exc:
                raise _map_os_error(exc, f"stat {hexkey[:12]}…") from None
            out.append(info.st_size if stat.S_ISREG(info.st_mode) else None)
        return out

    def _list(self) -> Iterator[str]:
        ns_dir = self._objects / self.namespace
        if not ns_dir.is_dir():
            return
        for shard in sorted(os.scandir(ns_dir), key=lambda e: e.name):
            if shard.is_dir():
                for entry in os.scandir(shard.path):
                    if _KEY_NAME.fullmatch(entry.name):
                        yield entry.name

    def _usage(self) -> dict[str, Any]:
        total, count = self._index.totals()
        return {"entries": count, "bytes": total, "capacity_bytes": self.capacity_bytes,
                "root": str(self.root), "temp_files_swept": self.swept}

    def _evict_to(self, max_bytes: int) -> int:
        return self._shrink(max_bytes)

    def _ping(self) -> Any:
        st = os.statvfs(self.root)
        if not os.access(self._tmp, os.W_OK):
            raise StoreError(f"file: {self._tmp} is not writable")
        return {"free_bytes": st.f_bavail * st.f_frsize}

    def close(self) -> None:
        """Flush buffered recency stamps and close the index."""
        self._index.close()
