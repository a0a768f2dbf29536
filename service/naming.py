"""From request messages to store keys.

Clients name chunks by keys they can compute themselves
(:meth:`kvcodec.store.KeySpec.chunk_keys` with an empty tenant) or by a
``Context`` from which the server derives the same keys. The server then maps
each client key into the caller's tenant namespace::

    store_key = key                                        tenant ""
    store_key = SHA-256("kvcodec.tenant\\0" + tenant + "\\0" + key bytes)   otherwise

so a tenant can never reach another tenant's entries, even with a leaked key,
and no replica needs any state to resolve a key.
"""

from __future__ import annotations

import hashlib
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.errors import RequestRejected

TENANT_DOMAIN = b"kvcodec.tenant\x00"
MODES = {pb.KEY_MODE_PREFIX: "prefix", pb.KEY_MODE_POSITION_FREE: "position_free"}
DEFAULT_CHUNK_TOKENS = 256
MAX_CONTEXT_TOKENS = 4 << 20


def check_level(level: str) -> str:
    """Return ``level`` if it is a codec level name.

    Raises:
        RequestRejected: naming the value and the known levels.
    """
    from kvcodec.codec import LEVELS

    if level not in LEVELS:
        raise RequestRejected(f"level: {level!r} not one of {', '.join(LEVELS)}")
    return level


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


def store_key(tenant: str, key: str) -> str:
    """Map a client key into ``tenant``'s namespace (identity for tenant "")."""
    if not tenant:
        return key
    record = TENANT_DOMAIN + tenant.encode("utf-8") + b"\x00" + bytes.fromhex(key)
    return hashlib.sha256(record).hexdigest()


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


def context_keys(ctx: pb.Context, level: str, *, mode: str | None = None) -> list:  # list[ChunkKey]
    """Keys of every chunk of ``ctx`` at ``level``.

    Args:
        ctx: the request's context.
        level: codec level (enters the key as the codec profile).
        mode: override the context's key mode ("prefix" / "position_free").

    Returns:
        One ``kvcodec.store.ChunkKey`` per chunk (client keys, tenant "", with
        their spec, so ``check_binding`` can match a stream against them).

    Raises:
        RequestRejected: no tokens, too many, bad chunk size or model field.
    """
    check_level(level)
    if not ctx.token_ids:
        raise RequestRejected("context.token_ids: empty")
    if len(ctx.token_ids) > MAX_CONTEXT_TOKENS:
        raise RequestRejected(f"context.token_ids: {len(ctx.token_ids)} tokens > {MAX_CONTEXT_TOKENS}")
    if ctx.mode not in MODES:
        raise RequestRejected(f"context.mode: unknown value {ctx.mode}")
    spec = model_spec(ctx, level)
    try:
        return spec.chunk_keys(list(ctx.token_ids), ctx.chunk_tokens or DEFAULT_CHUNK_TOKENS,
                               mode or MODES[ctx.mode])
    except ValueError as exc:
        raise RequestRejected(f"context: {exc}") from None
