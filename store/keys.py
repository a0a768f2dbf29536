"""Chunk keys: SHA-256 names for encoded KV chunks.

A chunk key names *what a chunk is*, so any process or machine that meets the
same content derives the same key (never Python's ``hash``; no dependence on
``PYTHONHASHSEED``, the platform or the process). Two records are hashed, both
in a canonical, versioned, length-prefixed little-endian encoding (FORMAT.md,
"Chunk keys", is the normative description and carries test vectors):

1. the *spec digest*: SHA-256 over the model identity (name and a fingerprint
   of its weights or config), tokenizer identity, KV layout (layers, kv heads,
   head dim, dtype), codec profile, tenant namespace and an optional salt
   that narrows it further (vLLM's ``cache_salt``: one tenant's requests
   with different salts never share a chunk);
2. per chunk: SHA-256 over the mode, the spec digest, a parent digest and the
   chunk's token ids. In ``prefix`` mode the parent is the previous chunk's
   key, so a key commits to every preceding token (as prefix caches do); in
   ``position_free`` mode the parent is all zeros, so the same tokens share a
   key wherever they occur (CacheBlend-style reuse).

Example::

    spec = KeySpec(model="smollm2-135m", model_fingerprint="9f2c…", tokenizer="smollm2",
                   layers=30, kv_heads=3, head_dim=64, dtype="float16",
                   codec_profile="balanced")
    keys = spec.chunk_keys(token_ids, chunk_tokens=256)
    keys[0].hex  # 64 lowercase hex digits
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvcodec.store.errors import InvalidKey

__all__ = [
    "KEY_VERSION",
    "DEFAULT_CHUNK_TOKENS",
    "ModelLayout",
    "KeySpec",
    "ChunkKey",
    "chunk_token_ids",
    "check_key",
    "config_fingerprint",
    "canonical_dtype",
]

KEY_VERSION = 1
DEFAULT_CHUNK_TOKENS = 256
SPEC_DOMAIN = b"kvcodec.key.spec\x00"
CHUNK_DOMAIN = b"kvcodec.key.chunk\x00"
MODE_CODES = {"prefix": 1, "position_free": 2}
ZERO_DIGEST = bytes(32)
MAX_TOKEN_ID = 2**32 - 1
_U32 = next(code for code in "IL" if array(code).itemsize == 4)  # array typecode of a u32
_HEX_KEY = re.compile(r"[0-9a-f]{64}")
_DTYPES = {
    "float16": "float16", "fp16": "float16", "half": "float16", "torch.float16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32", "torch.float32": "float32",
}

Mode = Literal["prefix", "position_free"]


def check_key(key: object) -> str:
    """Return ``key`` as a hex string if it is a valid chunk key.

    Args:
        key: a :class:`ChunkKey` or a string of 64 lowercase hex digits.

    Returns:
        The 64-character hex key.

    Raises:
        InvalidKey: anything else (the message shows the offending value).
    """
    if isinstance(key, ChunkKey):
        return key.hex
    if isinstance(key, str) and _HEX_KEY.fullmatch(key):
        return key
    shown = repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."
    raise InvalidKey(f"key: expected 64 lowercase hex digits (a SHA-256), got {shown}")


def canonical_dtype(dtype: object) -> str:
    """Map ``torch.float16``, ``"fp16"``, ``"half"``… to ``"float16"`` (etc.).

    Raises:
        ValueError: an unsupported dtype.
    """
    name = str(dtype).lower()
    if name not in _DTYPES:
        raise ValueError(f"dtype: {dtype!r} not supported (float16, bfloat16, float32)")
    return _DTYPES[name]


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 hex of a model config in canonical JSON (sorted keys, no spaces).

    Use it as ``KeySpec.model_fingerprint`` when hashing the weights is too slow.
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _str_field(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _tokens_field(token_ids: Sequence[int]) -> bytes:
    try:  # C-speed conversion and range check (array refuses values outside 0..2^32-1)
        packed = array(_U32, token_ids)
    except (OverflowError, TypeError):
        ids = [int(t) for t in token_ids]  # ints in disguise (3.0, numpy scalars) or an error
        for i, t in enumerate(ids):
            if not 0 <= t <= MAX_TOKEN_ID:
                raise ValueError(f"token_ids[{i}]: {t} outside 0..{MAX_TOKEN_ID}") from None
        packed = array(_U32, ids)
    if sys.byteorder == "big":
        packed.byteswap()
    return struct.pack("<Q", len(packed)) + packed.tobytes()


def chunk_token_ids(
    token_ids: Sequence[int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS, *, include_tail: bool = True
) -> list[list[int]]:
    """Split token ids into fixed-size chunks.

    Args:
        token_ids: the token ids of a sequence.
        chunk_tokens: tokens per chunk (> 0).
        include_tail: keep the last, shorter chunk (its key covers its true
            length, so it never collides with a full chunk); False drops it.

    Returns:
        A list of token-id lists, each ``chunk_tokens`` long except possibly the last.

    Raises:
        ValueError: ``chunk_tokens`` < 1.
    """
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens: {chunk_tokens} must be >= 1")
    ids = [int(t) for t in token_ids]
    chunks = [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
    if chunks and not include_tail and len(chunks[-1]) < chunk_tokens:
        chunks.pop()
    return chunks


@dataclass(frozen=True)
class ChunkKey:
    """The key of one chunk: ``hex`` plus where the chunk sits in its sequence."""

    hex: str
    index: int
    token_start: int
    token_count: int
    mode: str = "prefix"
    tenant: str = ""
    spec: KeySpec | None = field(default=None, compare=False, repr=False)

    @property
    def digest(self) -> bytes:
        """The raw 32-byte SHA-256."""
        return bytes.fromhex(self.hex)

    def __str__(self) -> str:
        return self.hex


@dataclass(frozen=True)
class ModelLayout:
    """A model's identity and KV shape: the part of a chunk key that the model decides
    (clients describe their model with it; :class:`KeySpec` adds the codec profile and tenant)."""

    model: str
    model_fingerprint: str = ""
    tokenizer: str = ""
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    dtype: str = "float16"


@dataclass(frozen=True)
class KeySpec(ModelLayout):
    """Everything besides the tokens that a chunk key commits to.

    Strings are hashed as their exact UTF-8 bytes (no normalization: the NFC and
    NFD forms of one name are two namespaces); ``dtype`` is canonicalized
    (``torch.float16`` → ``"float16"``).

    ``tenant`` names the namespace (a store handle serves one tenant); ``salt``
    narrows it per request, the namespace being ``(tenant, salt)``: keys with
    different salts, or with a salt and without, never coincide, and a salt
    never reaches another tenant's keys. An empty salt leaves the key as it was
    before salts existed (FORMAT.md "Chunk keys").
    """

    codec_profile: str = "balanced"
    tenant: str = ""
    salt: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        for name in ("model", "model_fingerprint", "tokenizer", "codec_profile", "tenant", "salt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        if not self.model:
            raise ValueError("model: must not be empty")
        for name in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value < 2**32:
                raise ValueError(f"{name}: {value!r} must be an integer in 1..2^32-1")

    def encoding(self) -> bytes:
        """The canonical byte record hashed into :meth:`digest` (FORMAT.md)."""
        return b"".join([
            SPEC_DOMAIN,
            struct.pack("<H", KEY_VERSION),
            _str_field(self.model),
            _str_field(self.model_fingerprint),
            _str_field(self.tokenizer),
            struct.pack("<III", self.layers, self.kv_heads, self.head_dim),
            _str_field(self.dtype),
            _str_field(self.codec_profile),
            _str_field(self.tenant),
            _str_field(self.salt) if self.salt else b"",  # optional, last: the record stays injective
        ])

    def digest(self) -> bytes:
        """SHA-256 of :meth:`encoding`."""
        return hashlib.sha256(self.encoding()).digest()

    def chunk_digest(self, token_ids: Sequence[int], *, mode: Mode = "prefix",
                     parent: bytes = ZERO_DIGEST) -> bytes:
        """The raw key of one chunk given its parent digest (zeros for none).

        Raises:
            ValueError: unknown mode, a parent that is not 32 bytes, empty or
                out-of-range token ids, or a parent given in position_free mode.
        """
        if mode not in MODE_CODES:
            raise ValueError(f"mode: {mode!r} not one of {sorted(MODE_CODES)}")
        if len(parent) != 32:
            raise ValueError(f"parent: expected 32 bytes, got {len(parent)}")
        if mode == "position_free" and parent != ZERO_DIGEST:
            raise ValueError("parent: position_free keys take no parent")
        if len(token_ids) == 0:
            raise ValueError("token_ids: a chunk needs at least one token")
        return _chunk_digest(self.digest(), token_ids, mode, parent)

    def chunk_keys(
        self,
        token_ids: Iterable[int],
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        mode: Mode = "prefix",
        *,
        include_tail: bool = True,
    ) -> list[ChunkKey]:
        """Keys of every chunk of a token sequence.

        Args:
            token_ids: the sequence's token ids, starting at position 0 for
                ``prefix`` mode.
            chunk_tokens: tokens per chunk (default 256).
            mode: ``"prefix"`` (chained) or ``"position_free"``.
            include_tail: key the last, shorter chunk too (default) or drop it.

        Returns:
            One :class:`ChunkKey` per chunk, in order.

        Raises:
            ValueError: a bad mode, chunk size or token id.
        """
        return list(self.iter_chunk_keys(token_ids, chunk_tokens, mode, include_tail=include_tail))

    def iter_chunk_keys(
        self,
        token_ids: Iterable[int],
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        mode: Mode = "prefix",
        *,
        include_tail: bool = True,
    ) -> Iterator[ChunkKey]:
        """:meth:`chunk_keys` one key at a time, so a caller can stop a long derivation
        between chunks (a server checks its call's deadline there).

        Raises:
            ValueError: a bad mode, chunk size or token id (before the first key).
        """
        if mode not in MODE_CODES:
            raise ValueError(f"mode: {mode!r} not one of {sorted(MODE_CODES)}")
        chunks = chunk_token_ids(list(token_ids), chunk_tokens, include_tail=include_tail)
        spec_digest = self.digest()
        parent, start = ZERO_DIGEST, 0
        for index, ids in enumerate(chunks):
            digest = _chunk_digest(spec_digest, ids, mode, parent)
            yield ChunkKey(digest.hex(), index, start, len(ids), mode, self.tenant, self)
            if mode == "prefix":
                parent = digest
            start += len(ids)


def _chunk_digest(spec_digest: bytes, token_ids: Sequence[int], mode: str, parent: bytes) -> bytes:
    """SHA-256 of one chunk record (FORMAT.md "Chunk keys"); arguments already checked."""
    record = b"".join([
        CHUNK_DOMAIN, struct.pack("<HB", KEY_VERSION, MODE_CODES[mode]),
        spec_digest, parent, _tokens_field(token_ids),
    ])
    return hashlib.sha256(record).digest()
