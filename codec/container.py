"""Stage 3: the ``.kvc`` container: header, substream index, checksums.

This module is the executable form of FORMAT.md, which is normative. It
packs and parses the fixed header and the substream index and checks every
field against :class:`DecodeLimits` *before* anything is allocated.

Layout (all integers little-endian)::

    header   86 + model_len bytes, then its CRC-32 (u32)
    index    n_entries x (u32 length, u32 crc32), then the index CRC-32 (u32)
    payload  the substreams, back to back, in index order

Substream order is layer-major: for each layer, keys then values, each split
into blocks of ``token_block`` tokens.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

from kvcodec.codec.errors import (
    ChecksumMismatch,
    LimitExceeded,
    TrailingData,
    TruncatedStream,
    UnsupportedFormat,
)

MAGIC = b"\x89KVC\r\n\x1a\n"
VERSION = 1
DTYPE_IDS = {"float16": 1, "bfloat16": 2, "float32": 3}
DTYPE_NAMES = {v: k for k, v in DTYPE_IDS.items()}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
CODER_ZSTD_PLANES = 1
CODER_ANS = 2
CODER_RANS = 3
CODER_NAMES = {CODER_ZSTD_PLANES: "zstd-byte-planes", CODER_ANS: "ans-geometric", CODER_RANS: "rans-interleaved"}
MAX_MODEL_NAME = 256
NO_PROFILE = bytes(32)
FLAG_TRANSFORM = 0x0001  # quantized in the profile's transform domain (FORMAT.md, "Transform")
FLAG_PACKED_SIDE = 0x0002  # coder 3's side information is entropy-coded (FORMAT.md, "Packed side information")
FLAG_PREDICTED_SIDE = 0x0004  # packed side information coded against the profile's prior (FORMAT.md)
FLAG_PREDICTED_VALUES = 0x0008  # symbols coded as differences from a prediction (FORMAT.md)
FLAG_PATCHED = 0x0010  # a patch entry per (layer, K/V) after the substreams (FORMAT.md, "Patches")
KNOWN_FLAGS = FLAG_TRANSFORM | FLAG_PACKED_SIDE | FLAG_PREDICTED_SIDE | FLAG_PREDICTED_VALUES | FLAG_PATCHED
MAX_ROPE_POSITION = 1 << 28  # RoPE angles stay exact float64 products below this

# magic, version, flags, mode, level, dtype, coder, layers, kv_heads, tokens,
# head_dim, token_block, raw_tokens, reserved, first_position, profile digest, model_len
_HEADER = struct.Struct("<8sHHBBBBIIIIIIIq32sH")
HEADER_FIXED_SIZE = _HEADER.size  # 86
_U32 = struct.Struct("<I")
_ENTRY = struct.Struct("<II")


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC, as in zlib, PNG and gzip)."""
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds a decoder enforces before allocating.

    Attributes:
        max_layers / max_kv_heads / max_head_dim / max_tokens: per-field caps.
        max_elements: cap on layers * kv_heads * tokens * head_dim per tensor.
        max_token_block: cap on tokens per substream.
        max_output_bytes: cap on the decoded keys + values in the stream's dtype
            (a valid stream expands at most a few thousand times, like any codec,
            so services decoding untrusted input should lower this).
    """

    max_layers: int = 1024
    max_kv_heads: int = 1024
    max_head_dim: int = 1024
    max_tokens: int = 1 << 22
    max_elements: int = 1 << 33
    max_token_block: int = 4096
    max_output_bytes: int = 1 << 34


@dataclass
class Header:
    """The parsed fixed header of a stream."""

    mode: int
    level: int
    dtype: str
    coder: int
    layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    token_block: int
    raw_tokens: int = 0
    first_position: int = 0
    model: str = ""
    profile: bytes = NO_PROFILE
    flags: int = 0

    @property
    def blocks_per_tensor(self) -> int:
        return -(-self.tokens // self.token_block)

    @property
    def n_substreams(self) -> int:
        """The coded substreams (patch entries not counted)."""
        return self.layers * 2 * self.blocks_per_tensor

    @property
    def n_entries(self) -> int:
        """Index entries: the substreams, then (header flag 16) one patch entry per (layer, K/V)."""
        return self.n_substreams + (self.layers * 2 if self.patched else 0)

    def patch_id(self, layer: int, is_value: bool) -> int:
        """The index entry of a (layer, K/V)'s patch (header flag 16)."""
        return self.n_substreams + layer * 2 + int(is_value)

    def substream_id(self, layer: int, is_value: bool, block: int) -> int:
        return (layer * 2 + int(is_value)) * self.blocks_per_tensor + block

    def describe(self, sid: int) -> str:
        """Human description of substream ``sid`` (or patch entry) for error messages."""
        if sid >= self.n_substreams:
            layer, kind = divmod(sid - self.n_substreams, 2)
            return f"patch entry {sid} (layer {layer}, {'values' if kind else 'keys'})"
        block = sid % self.blocks_per_tensor
        layer, kind = divmod(sid // self.blocks_per_tensor, 2)
        start = block * self.token_block
        end = min(start + self.token_block, self.tokens) - 1
        return f"substream {sid} (layer {layer}, {'values' if kind else 'keys'}, tokens {start}-{end})"

    def block_tokens(self, block: int) -> int:
        start = block * self.token_block
        return min(self.token_block, self.tokens - start)

    @property
    def transformed(self) -> bool:
        return bool(self.flags & FLAG_TRANSFORM)

    @property
    def packed_side(self) -> bool:
        return bool(self.flags & FLAG_PACKED_SIDE)

    @property
    def predicted_side(self) -> bool:
        return bool(self.flags & FLAG_PREDICTED_SIDE)

    @property
    def predicted_values(self) -> bool:
        return bool(self.flags & FLAG_PREDICTED_VALUES)

    @property
    def patched(self) -> bool:
        return bool(self.flags & FLAG_PATCHED)

    def block_quantized_position(self, block: int) -> int:
        """Absolute position of the first quantized (not raw) token of ``block``."""
        return self.first_position + block * self.token_block + self.block_raw_tokens(block)

    def block_raw_tokens(self, block: int) -> int:
        """How many leading tokens of ``block`` are stored raw (attention sinks)."""
        start = block * self.token_block
        return max(0, min(self.raw_tokens - start, self.block_tokens(block)))


@dataclass
class Layout:
    """A parsed stream: header plus the byte range and CRC of every substream."""

    header: Header
    header_bytes: int
    index_bytes: int
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    crcs: list[int] = field(default_factory=list)
    profile: object = None  # the Profile whose transform decodes a transform-flagged stream (set by the api)


_PARALLEL_CRC_BYTES = 8 << 20  # below this, threads cost more than they save
# zlib.crc32 releases the GIL, but on the H100 machine's 16-core host a 104 MB stream took
# 45 ms on 1 thread, 18 ms on 4, 26 ms on 8 and 53 ms on 16 (benchmarks/RESULTS.md)
CRC_THREADS = max(1, min(4, os.cpu_count() or 1))


@lru_cache(maxsize=1)
def crc_pool() -> ThreadPoolExecutor:
    """The threads that checksum large streams (shared by the encoder and the grouped decoder)."""
    return ThreadPoolExecutor(CRC_THREADS, thread_name_prefix="kvcodec-crc")


def crc32_many(parts: list[bytes | memoryview]) -> list[int]:
    """:func:`crc32` of each part; large totals on :func:`crc_pool`."""
    if sum(len(p) for p in parts) < _PARALLEL_CRC_BYTES:
        return [crc32(p) for p in parts]
    return list(crc_pool().map(crc32, parts, chunksize=max(1, len(parts) // (4 * CRC_THREADS))))


def pack(header: Header, payloads: list[bytes]) -> bytes:
    """Assemble a complete stream from its header and substream payloads."""
    model = header.model.encode("utf-8")
    head = _HEADER.pack(
        MAGIC, VERSION, header.flags, header.mode, header.level, DTYPE_IDS[header.dtype],
        header.coder, header.layers, header.kv_heads, header.tokens, header.head_dim,
        header.token_block, header.raw_tokens, 0, header.first_position, header.profile, len(model),
    ) + model
    index = b"".join(_ENTRY.pack(len(p), crc) for p, crc in zip(payloads, crc32_many(payloads)))
    parts = [head, _U32.pack(crc32(head)), index, _U32.pack(crc32(index)), *payloads]
    return b"".join(parts)


def _need(data: memoryview, end: int, what: str) -> None:
    if len(data) < end:
        raise TruncatedStream(f"{what}: stream ends at byte {len(data)}, needs {end}")


def _check_limits(h: Header, limits: DecodeLimits) -> None:
    for name, value, cap in (
        ("layers", h.layers, limits.max_layers),
        ("kv_heads", h.kv_heads, limits.max_kv_heads),
        ("head_dim", h.head_dim, limits.max_head_dim),
        ("tokens", h.tokens, limits.max_tokens),
        ("token_block", h.token_block, limits.max_token_block),
    ):
        if value == 0:
            raise UnsupportedFormat(f"header field {name}: 0 is not allowed")
        if value > cap:
            raise LimitExceeded(f"header field {name}: {value} exceeds the limit {cap}")
    elements = h.layers * h.kv_heads * h.tokens * h.head_dim
    if elements > limits.max_elements:
        raise LimitExceeded(f"header: {elements} elements per tensor exceed the limit {limits.max_elements}")
    output = 2 * elements * DTYPE_BYTES[h.dtype]
    if output > limits.max_output_bytes:
        raise LimitExceeded(f"header: {output} output bytes exceed the limit {limits.max_output_bytes}")


def parse_header(data: bytes | memoryview, limits: DecodeLimits | None = None) -> tuple[Header, int]:
    """Parse and validate the header; returns it and its size including the CRC."""
    data = memoryview(data)
    limits = limits or DecodeLimits()
    _need(data, 8, "magic")
    if bytes(data[:8]) != MAGIC:
        raise UnsupportedFormat(f"magic: {bytes(data[:8])!r} is not a kvcodec stream ({MAGIC!r})")
    _need(data, HEADER_FIXED_SIZE, "header")
    (_, version, flags, mode, level, dtype_id, coder, layers, kv_heads, tokens, head_dim,
     token_block, raw_tokens, reserved, first_position, profile, model_len) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise UnsupportedFormat(f"version: {version} is not supported (this decoder reads {VERSION})")
    if model_len > MAX_MODEL_NAME:
        raise LimitExceeded(f"header field model_len: {model_len} exceeds the limit {MAX_MODEL_NAME}")
    end = HEADER_FIXED_SIZE + model_len
    _need(data, end + 4, "header")
    stored = _U32.unpack_from(data, end)[0]
    actual = crc32(data[:end])
    if stored != actual:
        raise ChecksumMismatch(f"header: crc32 0x{actual:08x} != stored 0x{stored:08x}")
    if flags & ~KNOWN_FLAGS:
        raise UnsupportedFormat(f"flags: reserved bits set (0x{flags & ~KNOWN_FLAGS:04x})")
    if reserved:
        raise UnsupportedFormat(f"reserved header field: {reserved} (must be 0)")
    if dtype_id not in DTYPE_NAMES:
        raise UnsupportedFormat(f"dtype: unknown dtype id {dtype_id}")
    if coder not in CODER_NAMES:
        raise UnsupportedFormat(f"coder: unknown coder id {coder}")
    if mode not in (0, 1):
        raise UnsupportedFormat(f"mode: unknown mode {mode}")
    if (mode == 0) != (coder == CODER_ZSTD_PLANES):
        raise UnsupportedFormat(f"coder: coder id {coder} does not fit mode {mode}")
    if flags & FLAG_TRANSFORM and (coder != CODER_RANS or bytes(profile) == NO_PROFILE):
        raise UnsupportedFormat("flags: the transform flag needs coder 3 and a profile digest")
    if flags & FLAG_PACKED_SIDE and coder != CODER_RANS:
        raise UnsupportedFormat("flags: packed side information needs coder 3")
    if flags & FLAG_PREDICTED_SIDE and not (flags & FLAG_PACKED_SIDE and flags & FLAG_TRANSFORM):
        raise UnsupportedFormat("flags: predicted side information needs the packed-side and transform flags")
    if flags & FLAG_PREDICTED_VALUES and not flags & FLAG_TRANSFORM:
        raise UnsupportedFormat("flags: prediction needs the transform flag")
    if flags & FLAG_PATCHED and mode != 1:
        raise UnsupportedFormat("flags: patches need the quantized mode")
    if flags & FLAG_TRANSFORM and not 0 <= first_position <= MAX_ROPE_POSITION - tokens:
        raise UnsupportedFormat(f"first_position: {first_position} with {tokens} tokens is outside the "
                                f"transform's position range 0..{MAX_ROPE_POSITION}")
    try:
        model = bytes(data[HEADER_FIXED_SIZE:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedFormat("model: name is not valid UTF-8") from None
    header = Header(mode, level, DTYPE_NAMES[dtype_id], coder, layers, kv_heads, tokens,
                    head_dim, token_block, raw_tokens, first_position, model, bytes(profile), flags)
    _check_limits(header, limits)
    if raw_tokens > tokens:
        raise UnsupportedFormat(f"header field raw_tokens: {raw_tokens} exceeds tokens {tokens}")
    if mode == 0 and raw_tokens:
        raise UnsupportedFormat(f"header field raw_tokens: {raw_tokens} must be 0 in lossless mode")
    return header, end + 4


def parse(
    data: bytes | memoryview, limits: DecodeLimits | None = None, *, allow_trailing: bool = False
) -> Layout:
    """Parse header and index, checking CRCs of both and the total length.

    Raises:
        TruncatedStream, TrailingData, ChecksumMismatch, UnsupportedFormat, LimitExceeded.
    """
    data = memoryview(data)
    header, pos = parse_header(data, limits)
    n = header.n_entries
    index_end = pos + n * _ENTRY.size
    _need(data, index_end + 4, "substream index")
    stored = _U32.unpack_from(data, index_end)[0]
    actual = crc32(data[pos:index_end])
    if stored != actual:
        raise ChecksumMismatch(f"substream index: crc32 0x{actual:08x} != stored 0x{stored:08x}")
    layout = Layout(header, pos, n * _ENTRY.size + 4)
    offset = index_end + 4
    for i in range(n):
        length, crc = _ENTRY.unpack_from(data, pos + i * _ENTRY.size)
        layout.offsets.append(offset)
        layout.lengths.append(length)
        layout.crcs.append(crc)
        offset += length
    if offset > len(data):
        raise TruncatedStream(f"payload: stream ends at byte {len(data)}, index needs {offset}")
    if offset < len(data) and not allow_trailing:
        raise TrailingData(f"payload: {len(data) - offset} bytes after the last substream (ends at {offset})")
    return layout


def substream(data: bytes | memoryview, layout: Layout, sid: int) -> memoryview:
    """Return substream ``sid`` after checking its CRC-32."""
    start, length = layout.offsets[sid], layout.lengths[sid]
    view = memoryview(data)[start : start + length]
    actual = crc32(view)
    if actual != layout.crcs[sid]:
        raise ChecksumMismatch(
            f"{layout.header.describe(sid)}: crc32 0x{actual:08x} != stored 0x{layout.crcs[sid]:08x}"
        )
    return view
