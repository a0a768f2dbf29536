"""Errors raised by the codec.

Every failure to read or write a KV stream is a :class:`KVCodecError`; nothing
else escapes the decoders (fuzzing checks that)::

    KVCodecError
    ├── InvalidInput          the tensors or arguments given to the encoder are unusable
    ├── UnsupportedFormat     bad magic, unknown version, reserved bits set, unknown id
    ├── TruncatedStream       the stream ends before the header says it should
    ├── TrailingData          bytes after the last substream (e.g. two files concatenated)
    ├── ChecksumMismatch      a header, index or substream fails its CRC-32
    ├── LimitExceeded         a field is larger than the decoder's limits allow
    └── CorruptStream         checksums pass but the content is inconsistent

Messages name the field and the value, e.g.
``substream 3 (layer 1, values, tokens 0-255): crc32 0x1f2e3d4c != stored 0x9a0b1c2d``.
"""

from __future__ import annotations

__all__ = [
    "KVCodecError",
    "InvalidInput",
    "UnsupportedFormat",
    "TruncatedStream",
    "TrailingData",
    "ChecksumMismatch",
    "LimitExceeded",
    "CorruptStream",
    "MissingProfile",
]


class KVCodecError(Exception):
    """Root of every error the codec raises."""


class InvalidInput(KVCodecError, ValueError):
    """The tensors, metadata or options handed to the codec are unusable."""


class UnsupportedFormat(KVCodecError):
    """The stream is not a kvcodec stream this version can read."""


class TruncatedStream(KVCodecError):
    """The stream ends before all the bytes its header promises."""


class TrailingData(KVCodecError):
    """Bytes follow the last substream."""


class ChecksumMismatch(KVCodecError):
    """A CRC-32 check failed: the bytes were altered in storage or transit."""


class LimitExceeded(KVCodecError):
    """A header field exceeds a decoder limit; refused before allocating."""


class CorruptStream(KVCodecError):
    """The checksums pass but the decoded content is inconsistent."""


class MissingProfile(KVCodecError):
    """The stream was coded with a profile's transform and that profile is not at hand."""
