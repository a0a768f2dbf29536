"""From request messages to store keys: namespaces, tenant names, request limits.

Clients name chunks by keys they can compute themselves
(:meth:`kvcodec.store.KeySpec.chunk_keys` with an empty tenant) or by a
``Context`` from which the server derives the same keys. The server then maps
each client key into the caller's :class:`Namespace` — the pair (tenant, salt),
the tenant coming from the caller's bearer token (none with auth off) and the
salt from the request's ``x-kvcodec-salt-bin`` header (vLLM's ``cache_salt``)::

    store_key = SHA-256("kvcodec.namespace\\0" || u16 version=1 || u8 kind
                        || u32 len || tenant || u32 len || salt || 32-byte client key)

``kind`` is 0 for the open namespace of a server without auth (tenant empty)
and 1 for an authenticated tenant. Every variable field is length-prefixed, so
no two (kind, tenant, salt, key) tuples share a record: a tenant never reaches
another tenant's entries (even with a leaked key), nor the open namespace's,
nor they its; a salt only narrows its caller's namespace. No replica needs any
state to resolve a key. FORMAT.md ("Server namespaces") is the normative
description and carries a test vector.

Tenant names are identifiers an operator configures (:func:`tenant_name_problem`):
non-empty, at most 128 UTF-8 bytes, in Unicode NFC, printable and without
whitespace; names that differ only by case or compatibility form are refused
together as ambiguous (:func:`ambiguous_tenants`).
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.errors import Overloaded, RequestRejected

NAMESPACE_DOMAIN = b"kvcodec.namespace\x00"
NAMESPACE_VERSION = 1
KIND_OPEN, KIND_TENANT = 0, 1
MAX_TENANT_BYTES = 128
MAX_SALT_BYTES = 1024
SALT_HEADER = "x-kvcodec-salt-bin"
MODES = {pb.KEY_MODE_PREFIX: "prefix", pb.KEY_MODE_POSITION_FREE: "position_free"}
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_MAX_CONTEXT_TOKENS = 1 << 19
DEFAULT_MAX_CHUNKS = 4096
DERIVE_CHECK_EVERY = 64  # chunks derived between two deadline checks


def _field(raw: bytes) -> bytes:
    return struct.pack("<I", len(raw)) + raw


@dataclass(frozen=True)
class Namespace:
    """Where a caller's keys live in the shared store: ``(tenant, salt)``.

    Args:
        tenant: the authenticated tenant, or None for the open namespace of a
            server without auth.
        salt: narrows the namespace per request ("" = none).
    """

    tenant: str | None
    salt: str = ""
    _prefix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = KIND_OPEN if self.tenant is None else KIND_TENANT
        record = (NAMESPACE_DOMAIN + struct.pack("<HB", NAMESPACE_VERSION, kind)
                  + _field((self.tenant or "").encode("utf-8")) + _field(self.salt.encode("utf-8")))
        object.__setattr__(self, "_prefix", record)

    @property
    def label(self) -> str:
        """The tenant's name for logs and Stats ("" for the open namespace)."""
        return self.tenant or ""

    def store_key(self, key: str) -> str:
        """Map a client key (64 hex digits, already checked) into this namespace."""
        return hashlib.sha256(self._prefix + bytes.fromhex(key)).hexdigest()


def store_key(namespace: Namespace, key: str) -> str:
    """``namespace.store_key(key)``."""
    return namespace.store_key(key)


def tenant_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a tenant (None if it can).

    A tenant name is non-empty, at most 128 UTF-8 bytes, in Unicode NFC, and
    made of printable characters other than whitespace (no control, format or
    separator characters).
    """
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    if not name:
        return "empty (every tenant needs a name of its own)"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{name[:40]!r} is not valid Unicode"
    if size > MAX_TENANT_BYTES:
        return f"{name[:40]!r}… is {size} bytes, at most {MAX_TENANT_BYTES}"
    bad = next((c for c in name if not c.isprintable() or c.isspace()), None)
    if bad is not None:
        what = " ".join(filter(None, (f"U+{ord(bad):04X}", unicodedata.name(bad, ""))))
        return f"{name!r} contains {what} (control, format or whitespace characters are not allowed)"
    if not unicodedata.is_normalized("NFC", name):
        return f"{name!r} is not in Unicode NFC form (write {unicodedata.normalize('NFC', name)!r})"
    return None


def ambiguous_tenants(names: Iterable[str]) -> tuple[str, str] | None:
    """Two distinct names that are one name to a reader (equal after NFKC and case folding)."""
    seen: dict[str, str] = {}
    for name in sorted(set(names)):
        folded = unicodedata.normalize("NFKC", name).casefold()
        if folded in seen:
            return seen[folded], name
        seen[folded] = name
    return None


def salt_from_header(value: object) -> str:
    """The salt carried by the ``x-kvcodec-salt-bin`` header ("" when absent).

    Raises:
        RequestRejected: over 1024 bytes or not UTF-8, naming the header.
    """
    if value is None:
        return ""
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(raw) > MAX_SALT_BYTES:
        raise RequestRejected(f"{SALT_HEADER}: {len(raw)} bytes, at most {MAX_SALT_BYTES}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestRejected(f"{SALT_HEADER}: {raw[:40]!r} is not UTF-8") from None


def check_level(level: str) -> str:
    """Return ``level`` if it is a codec level name.

    Raises:
        RequestRejected: naming the value and the known levels.
    """
    from kvcodec.codec import LEVELS

    if level not in LEVELS:
        raise RequestRejected(f"level: {level[:40]!r} not one of {', '.join(LEVELS)}")
    return level


def check_levels(levels: Iterable[str], field: str = "levels") -> list[str]:
    """Distinct codec levels, in order (refuses unknown and repeated ones).

    Raises:
        RequestRejected: naming the entry.
    """
    out: list[str] = []
    for i, level in enumerate(levels):
        try:
            check_level(level)
        except RequestRejected as exc:
            raise RequestRejected(f"{field}[{i}]: {exc}") from None
        if level in out:
            raise RequestRejected(f"{field}[{i}]: {level!r} listed twice")
        out.append(level)
    return out


def check_client_key(key: str, field: str = "key") -> str:
    """Return ``key`` if it is 64 lowercase hex digits.

    Raises:
        RequestRejected: naming the field and (a prefix of) the value.
    """
    from kvcodec.store.errors import InvalidKey
    from kvcodec.store.keys import check_key

    try:
        return check_key(key)
    except InvalidKey:
        raise RequestRejected(f"{field}: {key[:80]!r} is not 64 lowercase hex digits") from None


def check_count(field: str, count: int, limits: Any) -> None:
    """Refuse a request naming more chunks or keys than ``max_chunks_per_request``.

    Raises:
        Overloaded: naming the field, the count and the limit.
    """
    limit = limits.max_chunks_per_request
    if count > limit:
        raise Overloaded(f"{field}: {count} entries > max_chunks_per_request {limit}")


def context_chunks(ctx: pb.Context, limits: Any) -> int:
    """How many chunks ``ctx`` has, checked against the limits before any key is derived.

    Raises:
        RequestRejected: no tokens or an unknown mode.
        Overloaded: more than ``max_context_tokens`` tokens or ``max_chunks_per_request`` chunks.
    """
    tokens = len(ctx.token_ids)
    if not tokens:
        raise RequestRejected("context.token_ids: empty")
    if tokens > limits.max_context_tokens:
        raise Overloaded(f"context.token_ids: {tokens} tokens > max_context_tokens "
                         f"{limits.max_context_tokens}")
    if ctx.mode not in MODES:
        raise RequestRejected(f"context.mode: unknown value {ctx.mode}")
    per_chunk = ctx.chunk_tokens or DEFAULT_CHUNK_TOKENS
    chunks = -(-tokens // per_chunk)
    if chunks > limits.max_chunks_per_request:
        raise Overloaded(f"context.chunk_tokens: {tokens} tokens in chunks of {per_chunk} make "
                         f"{chunks} chunks > max_chunks_per_request {limits.max_chunks_per_request}")
    return chunks


def model_spec(ctx: pb.Context, level: str):  # -> kvcodec.store.KeySpec
    """Build the store's KeySpec for a context at ``level`` (tenant "").

    Raises:
        RequestRejected: a missing or invalid model field.
    """
    from kvcodec.store import KeySpec

    m = ctx.model
    try:
        return KeySpec(model=m.model, model_fingerprint=m.model_fingerprint, tokenizer=m.tokenizer,
                       layers=m.layers, kv_heads=m.kv_heads, head_dim=m.head_dim,
                       dtype=m.dtype or "float16", codec_profile=level, tenant="")
    except ValueError as exc:
        raise RequestRejected(f"context.model.{exc}") from None


@dataclass(frozen=True)
class _DefaultLimits:
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS
    max_chunks_per_request: int = DEFAULT_MAX_CHUNKS


def context_keys(ctx: pb.Context, level: str, *, mode: str | None = None, limits: Any = None,
                 alive: Callable[[], None] | None = None) -> list:  # list[ChunkKey]
    """Keys of every chunk of ``ctx`` at ``level``.

    Args:
        ctx: the request's context.
        level: codec level (enters the key as the codec profile).
        mode: override the context's key mode ("prefix" / "position_free").
        limits: anything with ``max_context_tokens`` and ``max_chunks_per_request``
            (a ServerConfig); None = the defaults.
        alive: called every 64 chunks; raises to stop a derivation whose call ended.

    Returns:
        One ``kvcodec.store.ChunkKey`` per chunk (client keys, tenant "", with
        their spec, so ``check_binding`` can match a stream against them).

    Raises:
        RequestRejected: no tokens, bad chunk size or model field.
        Overloaded: more tokens or chunks than the limits allow.
    """
    check_level(level)
    context_chunks(ctx, limits or _DefaultLimits())
    spec = model_spec(ctx, level)
    keys = []
    try:
        for key in spec.iter_chunk_keys(ctx.token_ids, ctx.chunk_tokens or DEFAULT_CHUNK_TOKENS,
                                        mode or MODES[ctx.mode]):
            keys.append(key)
            if alive is not None and len(keys) % DERIVE_CHECK_EVERY == 0:
                alive()
    except ValueError as exc:
        raise RequestRejected(f"context: {exc}") from None
    return keys
