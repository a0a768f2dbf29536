"""The entry envelope: a small self-describing header around every stored stream.

Every backend stores ``envelope + payload`` as one value (file, Redis string,
S3 object), so a read can check, before any byte reaches the model, that the
entry is the one its address names and that its payload is intact::

    offset  size  field
    0       4     magic  b"KVCE" ("KV cache entry")
    4       1     version (1)
    5       1     flags, reserved, must be 0
    6       2     tenant_len  u16 LE, bytes of the tenant name
    8       32    key         raw SHA-256 of the chunk key
    40      32    payload_sha256
    72      8     payload_len u64 LE
    80      n     tenant, UTF-8 (tenant_len bytes)
    80+n    ...   payload (a .kvc stream, payload_len bytes)
"""

from __future__ import annotations

import hashlib
import struct

from kvcodec.store.errors import IntegrityError

__all__ = ["MAGIC", "HEADER_SIZE", "wrap", "unwrap"]

MAGIC = b"KVCE"
VERSION = 1
HEADER = struct.Struct("<4sBBH32s32sQ")
HEADER_SIZE = HEADER.size  # 80


def wrap(key_hex: str, payload: bytes, tenant: str = "") -> bytes:
    """Return the stored form of ``payload`` under ``key_hex`` for ``tenant``."""
    name = tenant.encode("utf-8")
    if len(name) > 0xFFFF:
        raise ValueError(f"tenant: {len(name)} bytes, at most 65535")
    header = HEADER.pack(MAGIC, VERSION, 0, len(name), bytes.fromhex(key_hex),
                         hashlib.sha256(payload).digest(), len(payload))
    return b"".join([header, name, payload])


def unwrap(blob: bytes, key_hex: str, tenant: str = "") -> bytes:
    """Check an entry against its address and return its payload.

    Args:
        blob: the stored bytes.
        key_hex: the key the entry was read under.
        tenant: the tenant the store serves.

    Returns:
        The payload bytes.

    Raises:
        IntegrityError: naming the first field that does not match.
    """
    short = key_hex[:12] + "…"
    if len(blob) < HEADER_SIZE:
        raise IntegrityError(f"entry {short}: {len(blob)} bytes, shorter than the {HEADER_SIZE}-byte envelope")
    magic, version, flags, tlen, key, digest, size = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise IntegrityError(f"entry {short}: magic {magic!r} != {MAGIC!r}")
    if version != VERSION or flags != 0:
        raise IntegrityError(f"entry {short}: version {version} flags {flags:#x} not supported")
    if key.hex() != key_hex:
        raise IntegrityError(f"entry {short}: envelope key {key.hex()[:12]}… != address")
    start = HEADER_SIZE + tlen
    found_tenant = bytes(blob[HEADER_SIZE:start]).decode("utf-8", "replace")
    if found_tenant != tenant:
        raise IntegrityError(f"entry {short}: tenant {found_tenant!r} != {tenant!r}")
    if len(blob) - start != size:
        raise IntegrityError(f"entry {short}: payload {len(blob) - start} bytes != recorded {size}")
    payload = bytes(memoryview(blob)[start:])
    actual = hashlib.sha256(payload).digest()
    if actual != digest:
        raise IntegrityError(
            f"entry {short}: payload sha256 {actual.hex()[:12]}… != recorded {digest.hex()[:12]}…"
        )
    return payload
