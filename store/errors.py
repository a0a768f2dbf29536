"""Errors raised by the chunk store.

Every failure of a store operation is a :class:`StoreError`; exceptions of the
backends (OSError, sqlite3, redis-py, botocore) are mapped to these at the
backend boundary::

    StoreError
    ├── InvalidKey          a key is not 64 lowercase hex digits (a SHA-256)
    ├── InvalidStoreURL     a store URL or option cannot be understood
    ├── IntegrityError      an entry or an upload failed verification
    │   └── KeyMismatch     the stream does not match its key (layout, level, tenant)
    ├── StoreUnavailable    the backend cannot be reached or timed out
    └── StoreFull           no room: ENOSPC, Redis OOM under noeviction, capacity

Reads never raise :class:`IntegrityError`: a bad entry is removed, counted in
``stats()["bad_entries"]`` and returned as a miss. Writes raise it when the
uploaded stream is corrupt or does not match its key.

Messages name the field and the value, e.g.
``entry 3fa1…: payload sha256 9c1e… != recorded 0b44…``.
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "InvalidKey",
    "InvalidStoreURL",
    "IntegrityError",
    "KeyMismatch",
    "StoreUnavailable",
    "StoreFull",
]


class StoreError(Exception):
    """Root of every error the store raises."""


class InvalidKey(StoreError, ValueError):
    """A chunk key is not 64 lowercase hexadecimal digits."""


class InvalidStoreURL(StoreError, ValueError):
    """A store URL (or an option given with it) cannot be understood."""


class IntegrityError(StoreError):
    """An entry or an uploaded stream failed verification."""


class KeyMismatch(IntegrityError):
    """A stream does not match the metadata its key was derived from."""


class StoreUnavailable(StoreError):
    """The backend could not be reached within the configured timeouts."""


class StoreFull(StoreError):
    """The backend has no room for the entry (disk full, Redis OOM, capacity)."""
