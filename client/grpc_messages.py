"""Messages and data types shared by the sync and asyncio cache clients.

:class:`ModelLayout` + token ids = :class:`CacheContext` (what the server derives
chunk keys from); request builders for Get/Put/Plan; :class:`Reassembler` turns a
Get stream back into whole chunks; :func:`map_rpc_error` maps gRPC statuses to
:mod:`kvcodec.service.errors`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.store.keys import KeySpec
from kvcodec.store.keys import ModelLayout as StoreLayout
from kvcodec.service import errors as E

MiB = 1 << 20
MODE_ENUM = {"prefix": pb.KEY_MODE_PREFIX, "position_free": pb.KEY_MODE_POSITION_FREE}
_CODE_ERRORS: dict[grpc.StatusCode, type[E.ServiceError]] = {
    grpc.StatusCode.UNAUTHENTICATED: E.AuthError,
    grpc.StatusCode.PERMISSION_DENIED: E.TenantDenied,
    grpc.StatusCode.INVALID_ARGUMENT: E.RequestRejected,
    grpc.StatusCode.NOT_FOUND: E.RequestRejected,
    grpc.StatusCode.RESOURCE_EXHAUSTED: E.Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: E.DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: E.ServerUnavailable,
}


def map_rpc_error(exc: grpc.RpcError) -> E.ServiceError:
    """The :class:`ServiceError` for a failed call (message: code and server detail)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    detail = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return _CODE_ERRORS.get(code, E.ServiceError)(f"{code.name}: {detail}")


# ------------------------------------------------------------ contexts
@dataclass(frozen=True)
class ModelLayout(StoreLayout):
    """A model's identity and KV shape (the store's :class:`~kvcodec.store.keys.ModelLayout`),
    with the client's conversions."""

    @classmethod
    def from_loaded(cls, loaded: Any, dtype: str = "float16") -> ModelLayout:
        """From a :class:`kvcodec.client.model.LoadedModel` (fingerprint = weights + config).

        The tokenizer identity is the model name, as ``kvcodec store put`` and the vLLM
        connector name it (the weights fingerprint covers the tokenizer files), so the
        same tokens get the same keys on every machine whatever path the model sits at.
        """
        return cls(loaded.name, loaded.fingerprint, loaded.name, loaded.num_layers,
                   loaded.num_kv_heads, loaded.head_dim, dtype)

    def to_proto(self) -> pb.ModelSpec:
        return pb.ModelSpec(model=self.model, model_fingerprint=self.model_fingerprint,
                            tokenizer=self.tokenizer, layers=self.layers, kv_heads=self.kv_heads,
                            head_dim=self.head_dim, dtype=self.dtype)

    @property
    def elements_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheContext:
    """A prompt's token ids, cut into chunks, for one model layout."""

    layout: ModelLayout
    token_ids: tuple[int, ...]
    chunk_tokens: int = 256
    mode: str = "prefix"

    def __init__(self, layout: ModelLayout, token_ids: Sequence[int], chunk_tokens: int = 256,
                 mode: str = "prefix") -> None:
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "token_ids", tuple(int(t) for t in token_ids))
        object.__setattr__(self, "chunk_tokens", int(chunk_tokens))
        object.__setattr__(self, "mode", mode)

    def to_proto(self) -> pb.Context:
        return pb.Context(model=self.layout.to_proto(), token_ids=self.token_ids,
                          chunk_tokens=self.chunk_tokens, mode=MODE_ENUM[self.mode])

    def keys(self, level: str = "balanced", mode: str | None = None) -> list:  # list[ChunkKey]
        """The chunk keys (tenant-free, as the server derives them) at ``level``."""
        spec = KeySpec(**{**self.layout.__dict__, "codec_profile": level})
        return spec.chunk_keys(list(self.token_ids), self.chunk_tokens, mode or self.mode)


@dataclass
class FetchedChunk:
    """One chunk of a Get: its bytes (None = miss) and, after fetch_kv, its KV."""

    position: int
    key: str
    level: str
    blob: bytes | None
    kv: Any = None


@dataclass
class ClientMeasurements:
    """What the client measured; sent with every Plan."""

    bandwidth_bytes_per_s: float = 0.0
    decode_elements_per_s: dict[str, float] = field(default_factory=dict)
    prefill_tokens_per_s: float = 0.0

    def observe_decode(self, level: str, elements: int, seconds: float, alpha: float = 0.3) -> None:
        if seconds <= 0 or not level:
            return
        rate, old = elements / seconds, self.decode_elements_per_s.get(level)
        self.decode_elements_per_s[level] = rate if old is None else alpha * rate + (1 - alpha) * old


# ---------------------------------------------------- request builders
def _levels_for(ctx: CacheContext, level: str | Sequence[str]) -> list[str]:
    n = len(ctx.keys("lossless"))
    levels = [level] * n if isinstance(level, str) else list(level)
    if len(levels) != n:
        raise ValueError(f"level: {len(levels)} levels for {n} chunks")
    return levels


def get_request(ctx: CacheContext | None, refs: Sequence[pb.ChunkRef]) -> pb.GetRequest:
    return pb.GetRequest(context=ctx.to_proto() if ctx else None, chunks=refs)


def put_messages(ctx: CacheContext, chunks: Sequence[tuple[int, str, bytes]],
                 kind: int = pb.PAYLOAD_ENCODED, piece: int = MiB) -> Iterator[pb.PutRequest]:
    """The Put stream: context, then per chunk a begin and ~1 MiB pieces."""
    yield pb.PutRequest(context=ctx.to_proto())
    keys: dict[str, list] = {}
    for index, level, blob in chunks:
        if level not in keys:
            keys[level] = ctx.keys(level)
        begin = pb.PutChunk(index=index, key=keys[level][index].hex, level=level,
                            total_bytes=len(blob), kind=kind)
        yield pb.PutRequest(begin=begin, data=blob[:piece])
        for off in range(piece, len(blob), piece):
            yield pb.PutRequest(data=blob[off:off + piece])


def encode_chunks(ctx: CacheContext, keys: Any, values: Any, level: str | Sequence[str] = "balanced",
                  raw: bool = False) -> list[tuple[int, str, bytes]]:
    """Cut ``[layers, kv_heads, tokens, head_dim]`` KV into the context's chunks and encode
    each (or serialize it as safetensors for the server to encode when ``raw``)."""
    from kvcodec.codec import encode

    if int(keys.shape[2]) != len(ctx.token_ids):
        raise ValueError(f"keys: {keys.shape[2]} tokens but the context has {len(ctx.token_ids)}")
    out = []
    for ck, lv in zip(ctx.keys("lossless"), _levels_for(ctx, level)):
        s = slice(ck.token_start, ck.token_start + ck.token_count)
        k, v = keys[:, :, s].contiguous(), values[:, :, s].contiguous()
        if raw:
            from safetensors.torch import save

            out.append((ck.index, lv, save({"keys": k.cpu(), "values": v.cpu()})))
        else:
            first = ck.token_start if ctx.mode == "prefix" else 0
            sink = keys[:, :, 0] if first else None  # the context's attention sink, for patches
            out.append((ck.index, lv, encode(k, v, level=lv, model=ctx.layout.model,
                                             first_position=first, sink_keys=sink)))
    return out


def plan_request(ctx: CacheContext, m: ClientMeasurements, client_id: str, budget_ms: float,
                 floor: str, allow_blend: bool, prefill_tokens_per_s: float) -> pb.PlanRequest:
    profile = pb.ClientProfile(client_id=client_id,
                               prefill_tokens_per_s=prefill_tokens_per_s or m.prefill_tokens_per_s,
                               decode_elements_per_s=m.decode_elements_per_s,
                               bandwidth_bytes_per_s=m.bandwidth_bytes_per_s)
    return pb.PlanRequest(context=ctx.to_proto(), ttft_budget_ms=budget_ms, quality_floor=floor,
                          client=profile, allow_blend=allow_blend)


def plan_refs(plan: pb.PlanResponse) -> list[pb.ChunkRef]:
    """Get refs (by key) for every LOAD_KV / BLEND decision of a plan."""
    return [pb.ChunkRef(key=d.key, index=d.index, level=d.level)
            for d in plan.decisions if d.action != pb.ACTION_LOAD_TEXT]


class Reassembler:
    """Turns a Get response stream into whole chunks, checking offsets."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos: int | None = None
        self.bytes = 0

    def feed(self, msg: pb.GetResponse) -> FetchedChunk | None:
        if not msg.found:
            return FetchedChunk(msg.position, msg.key, msg.level, None)
        if self._pos != msg.position:
            self._parts, self._pos = [], msg.position
        got = sum(len(p) for p in self._parts)
        if msg.offset != got:
            raise E.ServiceError(f"chunk {msg.position}: piece at offset {msg.offset}, expected {got}")
        self._parts.append(msg.data)
        self.bytes += len(msg.data)
        if not msg.last:
            return None
        blob = b"".join(self._parts)
        self._parts, self._pos = [], None
        if len(blob) != msg.total_bytes:
            raise E.ServiceError(f"chunk {msg.position}: {len(blob)} bytes != total {msg.total_bytes}")
        return FetchedChunk(msg.position, msg.key, msg.level, blob)


def _decode(chunk: FetchedChunk, m: ClientMeasurements, device: Any) -> FetchedChunk:
    from kvcodec.codec import decode, warm_up

    if chunk.blob is not None:
        warm_up()  # the decode speed measured below must not be numba compiling its kernels
        t0 = time.perf_counter()
        chunk.kv = decode(chunk.blob, device=device) if device is not None else decode(chunk.blob)
        k = chunk.kv.keys
        m.observe_decode(chunk.level, 2 * k.numel(), time.perf_counter() - t0)
    return chunk


def _options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
