"""The chunk-store interface every backend implements.

:class:`ChunkStore` holds the semantics shared by all backends — key checks,
the entry envelope (store/envelope.py), stream verification on write and on
read, tenant namespaces, counters — and calls a handful of raw operations a
backend provides (``_read_many``, ``_write_new``, ``_write_many``,
``_remove``, ``_exists``, ``_list``, ``_usage``, ``_evict_to``, ``_ping``).
The conformance suite (tests/test_store_conformance.py) runs unchanged on each.

Example::

    store = open_store("file:///var/cache/kvcodec")
    store.put(key.hex, blob)       # True: written; False: already there
    store.get(key.hex)             # the verified stream, or None
"""

from __future__ import annotations

import abc
import functools
import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvcodec.store.envelope import unwrap, wrap
from kvcodec.store.errors import IntegrityError, KeyMismatch, StoreError
from kvcodec.store.keys import ChunkKey, canonical_dtype, check_key

__all__ = ["ChunkStore", "Verifier", "resolve_verifier", "KeyLike"]

log = logging.getLogger("kvcodec.store")

Verifier = Callable[[bytes], Any]
KeyLike = str | ChunkKey


def resolve_verifier(verifier: Verifier | str | None) -> Verifier | None:
    """``"auto"`` → :func:`kvcodec.codec.verify` with ``full=False`` (header, index
    and every substream CRC, without decoding); ``"full"`` also decodes every
    substream; a callable is used as is; None turns stream checks off (the
    envelope's SHA-256 check stays)."""
    if verifier in ("auto", "full"):
        from kvcodec.codec import verify

        return functools.partial(verify, full=verifier == "full")
    if verifier is None or callable(verifier):
        return verifier
    raise ValueError(f"verifier: expected 'auto', 'full', a callable or None, got {verifier!r}")


def _verifier_name(verifier: Verifier | None) -> str | None:
    if verifier is None:
        return None
    inner = getattr(verifier, "func", verifier)
    return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', '?')}"


def _stream_errors() -> tuple[type[BaseException], ...]:
    from kvcodec.codec.errors import KVCodecError

    return (KVCodecError, IntegrityError, ValueError)


def check_binding(key: ChunkKey, info: Any, tenant: str) -> None:
    """Raise :class:`KeyMismatch` unless a stream's info matches its key's spec."""
    short = key.hex[:12] + "…"
    if key.tenant != tenant:
        raise KeyMismatch(f"key {short}: tenant {key.tenant!r} != store tenant {tenant!r}")
    spec = key.spec
    if spec is None or info is None:
        return
    expected = {
        "layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
        "tokens": key.token_count, "level": spec.codec_profile, "dtype": spec.dtype,
    }
    for name, want in expected.items():
        if not hasattr(info, name):
            continue
        got = getattr(info, name)
        if name == "dtype":
            got = canonical_dtype(str(got).replace("torch.", ""))
        if got != want:
            raise KeyMismatch(f"key {short}: stream {name} {got!r} != key's {want!r}")
    model = getattr(info, "model", "")
    if model and model != spec.model:
        raise KeyMismatch(f"key {short}: stream model {model!r} != key's {spec.model!r}")


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
PARALLEL_MIN_ITEMS = 2


def _parallel(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """Map ``fn`` over a batch on a shared thread pool (hashlib and zlib release the GIL
    on large buffers, so verifying a batch of chunks scales with cores)."""
    global _POOL
    if len(items) < PARALLEL_MIN_ITEMS:
        return [fn(item) for item in items]
    with _POOL_LOCK:
        if _POOL is None:
            workers = min(8, os.cpu_count() or 1)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvcodec-verify")
    return list(_POOL.map(fn, items))


class ChunkStore(abc.ABC):
    """A content-addressed store of verified ``.kvc`` chunk streams.

    Args:
        tenant: namespace (salt) this handle serves; entries of other tenants
            are invisible to it and cannot be overwritten by it.
        verifier: stream check run on every put and get (default: the codec's
            ``verify``); None keeps only the envelope's SHA-256 check.
    """

    scheme = "abstract"

    def __init__(self, *, tenant: str = "", verifier: Verifier | str | None = "auto") -> None:
        self.tenant = tenant
        self._verify = resolve_verifier(verifier)
        self._counts: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self.namespace = "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:16] if tenant else "_"

    # ----------------------------------------------------------- public API
    def put(self, key: KeyLike, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless present (create-only).

        Returns:
            True if written, False if an entry was already there.

        Raises:
            InvalidKey: ``key`` is not 64 lowercase hex digits.
            IntegrityError: ``data`` fails stream verification.
            KeyMismatch: ``data`` (or a ChunkKey's tenant) does not match the key.
            StoreFull, StoreUnavailable: the backend refused or is down.
        """
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Sequence[tuple[KeyLike, bytes]]) -> list[bool]:
        """Store several entries in one batch; all are verified before any is written."""
        def prepare(item: tuple[KeyLike, bytes]) -> tuple[str, bytes]:
            hexkey, payload = self._checked_upload(*item)
            return hexkey, wrap(hexkey, payload, self.tenant)

        blobs = _parallel(prepare, list(items))
        created = self._write_many(blobs) if blobs else []
        self._count(puts=sum(created), put_existing=len(created) - sum(created))
        return created

    def get(self, key: KeyLike) -> bytes | None:
        """The verified stream stored under ``key``, or None (a miss or a bad entry).

        A bad entry (envelope, SHA-256, stream CRC or, for a :class:`ChunkKey`,
        layout mismatch) is removed, logged, counted in ``stats()["bad_entries"]``
        and returned as None: its bytes never reach the caller.

        Raises:
            InvalidKey: ``key`` is not 64 lowercase hex digits.
            StoreUnavailable: the backend did not answer within its bounded
                retries and timeouts — callers treat it as a miss (recompute).
        """
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        """Verified streams for several keys in one batch (None where missing or bad)."""
        hexes = [check_key(k) for k in keys]
        blobs = self._read_many(hexes) if hexes else []
        out = _parallel(lambda t: self._accept(*t), list(zip(keys, hexes, blobs)))
        hits = sum(1 for b in out if b is not None)
        self._count(hits=hits, misses=len(out) - hits)
        return out

    def has(self, key: KeyLike) -> bool:
        """Whether an entry exists (not verified; ``get`` verifies)."""
        return self._exists(check_key(key))

    def sizes(self, keys: Sequence[KeyLike]) -> list[int | None]:
        """Stored sizes of several entries in one batch (pipelined on Redis).

        Not verified (``get`` verifies). Used to ask which chunks of a context
        exist before deciding to load them.

        Returns:
            Per key: the entry's stored bytes, 0 when present but the backend
            cannot tell the size cheaply, None when absent.

        Raises:
            InvalidKey: a key is not 64 lowercase hex digits.
            StoreUnavailable: the backend did not answer.
        """
        hexes = [check_key(k) for k in keys]
        return self._sizes(hexes) if hexes else []

    def delete(self, key: KeyLike) -> bool:
        """Remove an entry; True if one was there."""
        return self._remove(check_key(key))

    def keys(self) -> Iterator[str]:
        """Iterate the keys of this tenant's entries (hex)."""
        return self._list()

    def scrub(self, remove: bool = True) -> dict[str, Any]:
        """Re-check every entry; bad ones are removed unless ``remove`` is False.

        Returns:
            ``{"checked": n, "bad": [{"key": hex, "reason": str}, ...]}``.
        """
        checked, bad = 0, []
        for hexkey in list(self._list()):
            blob = self._read_many([hexkey])[0]
            if blob is None:
                continue
            checked += 1
            reason = self._problem(hexkey, hexkey, blob)[1]
            if reason is not None:
                bad.append({"key": hexkey, "reason": reason})
                if remove:
                    self._discard(hexkey, reason)
        return {"checked": checked, "bad": bad}

    def evict_to(self, max_bytes: int) -> int:
        """Evict least-recently-used entries until at most ``max_bytes`` remain.

        Returns:
            Number of entries evicted.
        """
        evicted = self._evict_to(int(max_bytes))
        self._count(evictions=evicted)
        return evicted

    def stats(self) -> dict[str, Any]:
        """Counters (hits, misses, puts, put_existing, bad_entries, evictions) and usage."""
        with self._count_lock:
            counts = dict(self._counts)
        out: dict[str, Any] = {"backend": self.scheme, "tenant": self.tenant,
                               "stream_verifier": _verifier_name(self._verify)}
        for name in ("hits", "misses", "puts", "put_existing", "bad_entries", "evictions"):
            out[name] = counts.get(name, 0)
        out.update(self._usage())
        return out

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "status": "ok"|"degraded", "backend": ..., "detail": ...}``; never raises."""
        try:
            detail = self._ping()
            return {"ok": True, "status": "ok", "backend": self.scheme, "detail": detail}
        except Exception as exc:  # health must report, not raise
            return {"ok": False, "status": "degraded", "backend": self.scheme, "detail": str(exc)}

    def close(self) -> None:
        """Release connections and files."""

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- helpers
    def _count(self, **deltas: int) -> None:
        with self._count_lock:
            for name, value in deltas.items():
                self._counts[name] += value

    def _checked_upload(self, key: KeyLike, data: bytes) -> tuple[str, bytes]:
        hexkey = check_key(key)
        payload = bytes(data)
        info = self._verify_stream(hexkey, payload, where="upload")
        if isinstance(key, ChunkKey):
            check_binding(key, info, self.tenant)
        return hexkey, payload

    def _verify_stream(self, hexkey: str, payload: bytes, where: str) -> Any:
        if self._verify is None:
            return None
        try:
            return self._verify(payload)
        except _stream_errors() as exc:
            raise IntegrityError(f"{where} {hexkey[:12]}…: stream rejected: {exc}") from None

    def _problem(self, key: KeyLike, hexkey: str, blob: bytes) -> tuple[bytes | None, str | None]:
        try:
            payload = unwrap(blob, hexkey, self.tenant)
            info = self._verify_stream(hexkey, payload, where="entry")
            if isinstance(key, ChunkKey):
                check_binding(key, info, self.tenant)
        except IntegrityError as exc:
            return None, str(exc)
        return payload, None

    def _accept(self, key: KeyLike, hexkey: str, blob: bytes | None) -> bytes | None:
        if blob is None:
            return None
        payload, reason = self._problem(key, hexkey, blob)
        if reason is not None:
            self._discard(hexkey, reason)
        return payload

    def _discard(self, hexkey: str, reason: str) -> None:
        log.warning("kvcodec store (%s): removing bad entry: %s", self.scheme, reason)
        self._count(bad_entries=1)
        try:
            self._remove(hexkey)
        except StoreError as exc:
            log.warning("kvcodec store (%s): could not remove %s: %s", self.scheme, hexkey, exc)

    # ------------------------------------------------ backend raw operations
    @abc.abstractmethod
    def _read_many(self, hexes: Sequence[str]) -> list[bytes | None]:
        """Raw stored blobs (None where absent)."""

    @abc.abstractmethod
    def _write_new(self, hexkey: str, blob: bytes) -> bool:
        """Write ``blob`` unless the entry exists; True if written."""

    def _write_many(self, items: Iterable[tuple[str, bytes]]) -> list[bool]:
        return [self._write_new(h, b) for h, b in items]

    @abc.abstractmethod
    def _remove(self, hexkey: str) -> bool:
        """Delete an entry; True if it existed."""

    @abc.abstractmethod
    def _exists(self, hexkey: str) -> bool:
        """Whether an entry exists."""

    @abc.abstractmethod
    def _list(self) -> Iterator[str]:
        """This tenant's keys."""

    def _sizes(self, hexes: Sequence[str]) -> list[int | None]:
        return _parallel(lambda h: 0 if self._exists(h) else None, list(hexes))

    def _usage(self) -> dict[str, Any]:
        return {}

    def _evict_to(self, max_bytes: int) -> int:
        raise StoreError(f"{self.scheme}: eviction is not supported")

    def _ping(self) -> Any:
        return None
