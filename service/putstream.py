"""Assembling a client-streamed Put into verified chunks, before anything is stored.

A Put stream is: one message with the ``Context``; then per chunk a ``begin``
(index, claimed key, level, size, payload kind) followed by ``data`` pieces.
:class:`PutAssembler` enforces the limits as bytes arrive (a declared size
over ``max_chunk_bytes``, or a call over ``max_put_bytes``, is refused before
it is buffered) and, as each chunk completes:

1. derives the key the chunk must have from the context, its index and level,
   and refuses a claimed key that differs (content does not match key);
2. encodes raw KV (safetensors ``keys``/``values``) at the level, or takes the
   encoded stream as sent;
3. runs the full :func:`kvcodec.codec.verify` (every checksum, every substream
   decodes) and checks the stream's layout, level, model, token count and first
   position against the key's spec (:func:`kvcodec.store.base.check_binding`).

Nothing is written here; the servicer commits the staged chunks only once the
client has half-closed and the call is still alive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.service.config import ServerConfig
from kvcodec.service.errors import Overloaded, RequestRejected
from kvcodec.service.naming import check_client_key, check_level, context_keys


@dataclass
class StagedChunk:
    """A verified chunk waiting to be committed."""

    index: int
    key: str
    level: str
    blob: bytes


class PutAssembler:
    """Feeds on PutRequest messages; yields verified :class:`StagedChunk` s.

    Args:
        config: limits (max_chunk_bytes, max_put_bytes).
        verifier: the full stream check (default :func:`kvcodec.codec.verify`); the
            server passes a process-pool version when ``verify_processes`` > 0.
    """

    def __init__(self, config: ServerConfig, verifier: Callable[[bytes], Any] | None = None) -> None:
        self.config = config
        self.verifier = verifier
        self.context: pb.Context | None = None
        self.staged: list[StagedChunk] = []
        self.received = 0
        self._declared = 0
        self._current: pb.PutChunk | None = None
        self._buf = bytearray()
        self._keys: dict[str, list] = {}
        self._seen: set[tuple[int, str]] = set()

    def feed(self, msg: pb.PutRequest) -> None:
        """Take one message of the stream.

        Raises:
            RequestRejected: out-of-order or inconsistent messages, a bad chunk.
            Overloaded: a chunk or the call over the size limits.
        """
        if msg.HasField("context"):
            if self.context is not None or self._current is not None or self.staged:
                raise RequestRejected("context: must be sent once, in the first message")
            self.context = msg.context
        if msg.HasField("begin"):
            self._begin(msg.begin)
        if msg.data:
            self._data(msg.data)

    @property
    def complete(self) -> bool:
        """Whether the stream so far ends between chunks, after a context (what :meth:`finish` accepts)."""
        return self._current is None and self.context is not None

    def finish(self) -> list[StagedChunk]:
        """The staged chunks once the client half-closed.

        Raises:
            RequestRejected: a chunk is incomplete or nothing was sent.
        """
        if self._current is not None:
            c = self._current
            raise RequestRejected(f"chunk {c.index}: stream ended after {len(self._buf)} of "
                                  f"{c.total_bytes} bytes")
        if self.context is None:
            raise RequestRejected("context: missing (the first message must carry it)")
        return self.staged

    def _begin(self, begin: pb.PutChunk) -> None:
        if self.context is None:
            raise RequestRejected("context: missing (the first message must carry it)")
        if self._current is not None:
            c = self._current
            raise RequestRejected(f"chunk {c.index}: next chunk began after {len(self._buf)} of "
                                  f"{c.total_bytes} bytes")
        if begin.total_bytes == 0:
            raise RequestRejected(f"chunk {begin.index}: total_bytes is 0")
        if begin.total_bytes > self.config.max_chunk_bytes:
            raise Overloaded(f"chunk {begin.index}: total_bytes {begin.total_bytes} > "
                             f"max_chunk_bytes {self.config.max_chunk_bytes}")
        if self._declared + begin.total_bytes > self.config.max_put_bytes:
            raise Overloaded(f"chunk {begin.index}: call would hold {self._declared + begin.total_bytes}"
                             f" bytes > max_put_bytes {self.config.max_put_bytes}")
        self._declared += begin.total_bytes
        self._current, self._buf = begin, bytearray()

    def _data(self, data: bytes) -> None:
        c = self._current
        if c is None:
            raise RequestRejected("data: sent before a chunk's begin message")
        if len(self._buf) + len(data) > c.total_bytes:
            raise RequestRejected(f"chunk {c.index}: more than the declared {c.total_bytes} bytes")
        self._buf += data
        self.received += len(data)
        if len(self._buf) == c.total_bytes:
            self._current = None
            self.staged.append(self._check(c, bytes(self._buf)))
            self._buf = bytearray()

    def _expected_key(self, c: pb.PutChunk):  # -> ChunkKey
        assert self.context is not None
        level = check_level(c.level or "balanced")
        if level not in self._keys:
            self._keys[level] = context_keys(self.context, level, limits=self.config)
        keys = self._keys[level]
        if c.index >= len(keys):
            raise RequestRejected(f"chunk {c.index}: index >= {len(keys)} chunks in the context")
        if (c.index, level) in self._seen:
            raise RequestRejected(f"chunk {c.index}: sent twice at level {level}")
        self._seen.add((c.index, level))
        expected = keys[c.index]
        claimed = check_client_key(c.key, f"chunk {c.index}: key") if c.key else expected.hex
        if claimed != expected.hex:
            raise RequestRejected(f"chunk {c.index}: key {claimed[:16]}… does not match its content "
                                  f"(expected {expected.hex[:16]}… from the context at level {level})")
        return expected

    def _check(self, c: pb.PutChunk, payload: bytes) -> StagedChunk:
        from kvcodec.codec import verify
        from kvcodec.codec.errors import KVCodecError
        from kvcodec.store.base import check_binding

        verify = self.verifier or verify
        from kvcodec.store.errors import KeyMismatch

        key = self._expected_key(c)
        level = key.spec.codec_profile
        blob = payload if c.kind == pb.PAYLOAD_ENCODED else self._encode_raw(c, key, payload)
        try:
            info = verify(blob)
        except KVCodecError as exc:
            raise RequestRejected(f"chunk {c.index}: stream rejected: {exc}") from None
        try:
            check_binding(key, info, "")
        except KeyMismatch as exc:
            raise RequestRejected(f"chunk {c.index}: content does not match key: {exc}") from None
        if key.mode == "prefix" and info.first_position != key.token_start:
            raise RequestRejected(f"chunk {c.index}: stream first_position {info.first_position} != "
                                  f"the chunk's token_start {key.token_start}")
        return StagedChunk(c.index, key.hex, level, blob)

    def _encode_raw(self, c: pb.PutChunk, key, payload: bytes) -> bytes:  # noqa: ANN001
        """Encode a safetensors KV chunk at the chunk's level."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        from kvcodec.codec import encode
        from kvcodec.codec.errors import KVCodecError

        try:
            tensors = load(payload)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise RequestRejected(f"chunk {c.index}: raw KV is not a safetensors blob ({exc})") from None
        missing = [n for n in ("keys", "values") if n not in tensors]
        if missing:
            raise RequestRejected(f"chunk {c.index}: raw KV lacks tensor(s) {', '.join(missing)}")
        try:
            return encode(tensors["keys"], tensors["values"], level=key.spec.codec_profile,
                          model=key.spec.model, first_position=key.token_start)
        except KVCodecError as exc:
            raise RequestRejected(f"chunk {c.index}: raw KV rejected by the encoder: {exc}") from None
