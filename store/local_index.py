"""The recency and size index of the local store: one SQLite file.

Table ``entries(name, size, atime)`` holds one row per stored file (``name``
is ``<namespace>/<key>``); triggers keep ``totals(bytes, count)`` exact in the
same transaction, so several processes sharing a directory agree on usage.
``atime`` is a nanosecond wall-clock stamp written on insert and on reads;
reads are buffered in memory and flushed in batches (and before any
eviction), so a hit costs no SQLite write. Files are the truth: the index is
rebuilt from them at open (:meth:`LocalIndex.reconcile`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from kvcodec.store.errors import StoreError, StoreFull, StoreUnavailable

__all__ = ["LocalIndex"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries(name TEXT PRIMARY KEY, size INTEGER NOT NULL,
                                   atime INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_atime ON entries(atime);
CREATE TABLE IF NOT EXISTS totals(id INTEGER PRIMARY KEY CHECK (id = 0),
                                  bytes INTEGER NOT NULL, count INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN
  UPDATE totals SET bytes = bytes + NEW.size, count = count + 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN
  UPDATE totals SET bytes = bytes - OLD.size, count = count - 1 WHERE id = 0; END;
"""
TOUCH_BATCH = 256
INIT_TIMEOUT_S = 30.0  # how long opening the index waits for another process creating it


def map_sqlite_error(exc: sqlite3.Error, path: Path) -> StoreError:
    """Map a sqlite3 error to the store's tree (disk full → StoreFull)."""
    text = str(exc)
    if "full" in text:
        return StoreFull(f"file: index {path}: {text}")
    if "locked" in text or "busy" in text:
        return StoreUnavailable(f"file: index {path}: {text}")
    return StoreError(f"file: index {path}: {text}")


class LocalIndex:
    """Thread-safe access to the SQLite index (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._touches: dict[str, int] = {}
        try:
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False,
                                       isolation_level=None)
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, path) from None
        # Two processes opening a new store at once: switching to WAL takes an exclusive lock
        # and SQLite reports "database is locked" at once instead of waiting, so retry.
        deadline = time.monotonic() + INIT_TIMEOUT_S
        delay = 0.005
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() > deadline:
                    self._db.close()
                    raise map_sqlite_error(exc, path) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
            except sqlite3.Error as exc:
                self._db.close()
                raise map_sqlite_error(exc, path) from None

    def _run(self, sql: str, params: Iterable[object] = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self.path) from None

    def add(self, name: str, size: int) -> None:
        """Record a new file (no-op if already recorded)."""
        with self._lock:
            self._run("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)", (name, size, time.time_ns()))

    def remove(self, name: str) -> None:
        """Forget a file."""
        with self._lock:
            self._touches.pop(name, None)
            self._run("DELETE FROM entries WHERE name = ?", (name,))

    def touch(self, name: str) -> None:
        """Note a read; flushed in batches of TOUCH_BATCH."""
        with self._lock:
            self._touches[name] = time.time_ns()
            if len(self._touches) >= TOUCH_BATCH:
                self._flush_locked()

    def flush(self) -> None:
        """Write buffered read stamps."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._touches:
            return
        rows = [(t, n) for n, t in self._touches.items()]
        self._touches.clear()
        try:
            self._db.executemany("UPDATE entries SET atime = MAX(atime, ?) WHERE name = ?", rows)
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self.path) from None

    def totals(self) -> tuple[int, int]:
        """(bytes, count) over all namespaces."""
        with self._lock:
            row = self._run("SELECT bytes, count FROM totals WHERE id = 0")
        return (int(row[0][0]), int(row[0][1])) if row else (0, 0)

    def oldest(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` least recently used (name, size) rows."""
        with self._lock:
            self._flush_locked()
            rows = self._run("SELECT name, size FROM entries ORDER BY atime LIMIT ?", (limit,))
        return [(str(n), int(s)) for n, s in rows]

    def reconcile(self, on_disk: dict[str, tuple[int, int]]) -> None:
        """Make the index match the files: ``on_disk`` maps name → (size, mtime_ns)."""
        with self._lock:
            known = {n for (n,) in self._run("SELECT name FROM entries")}
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM entries WHERE name = ?",
                                     [(n,) for n in known - on_disk.keys()])
                self._db.executemany(
                    "INSERT OR IGNORE INTO entries VALUES (?, ?, ?)",
                    [(n, s, t) for n, (s, t) in on_disk.items() if n not in known],
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK") if self._db.in_transaction else None
                raise map_sqlite_error(exc, self.path) from None

    def close(self) -> None:
        """Flush and close the connection."""
        with self._lock:
            try:
                self._flush_locked()
            finally:
                self._db.close()
