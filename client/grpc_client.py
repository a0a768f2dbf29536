"""Python clients of the kvcodec cache server: :class:`CacheClient` (sync) and
:class:`AsyncCacheClient` (asyncio, ``grpc.aio``).

Both speak kvcodec.v1.KVCache and share the request builders below. Every call
has a deadline (``timeout_s``, spanning retries); calls that fail with
UNAVAILABLE (server restarting, store briefly down) are retried with
exponential backoff and jitter — all RPCs are idempotent (Put is create-only),
and a Get stream is retried only before its first chunk arrived. Failures
surface as :mod:`kvcodec.service.errors` exceptions.

``fetch_kv`` decodes chunk *i* on a worker thread while chunk *i+1* is still
arriving, and records what it measured (throughput, decode speed per level);
``plan`` sends those measurements to the controller.

Example::

    layout = ModelLayout.from_loaded(loaded)              # model identity + KV shape
    ctx = CacheContext(layout, token_ids, chunk_tokens=256)
    with CacheClient("127.0.0.1:50051") as client:
        client.put_kv(ctx, keys, values, level="balanced")
        kv = client.fetch_kv(ctx, level="balanced")       # list of KVPair (None = miss)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.proto import kvcodec_pb2_grpc as pb_grpc
from kvcodec.service import errors as E

T = TypeVar("T")
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
class ModelLayout:
    """A model's identity and KV shape: everything besides tokens in a chunk key."""

    model: str
    model_fingerprint: str = ""
    tokenizer: str = ""
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    dtype: str = "float16"

    @classmethod
    def from_loaded(cls, loaded: Any, dtype: str = "float16") -> ModelLayout:
        """From a :class:`kvcodec.client.model.LoadedModel` (fingerprint = weights + config)."""
        tok = getattr(loaded.tokenizer, "name_or_path", "") or loaded.name
        return cls(loaded.name, loaded.fingerprint, str(tok), loaded.num_layers,
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
        from kvcodec.store import KeySpec

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
            out.append((ck.index, lv, encode(k, v, level=lv, model=ctx.layout.model,
                                             first_position=first)))
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
    from kvcodec.codec import decode

    if chunk.blob is not None:
        t0 = time.perf_counter()
        chunk.kv = decode(chunk.blob, device=device) if device is not None else decode(chunk.blob)
        k = chunk.kv.keys
        m.observe_decode(chunk.level, 2 * k.numel(), time.perf_counter() - t0)
    return chunk


def _options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


# ------------------------------------------------------------ clients
class _Base:
    def __init__(self, address: str, *, token: str | None = None, tenant: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False,
                 server_name: str | None = None, timeout_s: float = 30.0, retries: int = 4,
                 backoff_s: float = 0.05, max_backoff_s: float = 2.0,
                 max_message_bytes: int = 8 * MiB, client_id: str | None = None) -> None:
        self.address, self.timeout_s, self.retries = address, timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.client_id = client_id or f"py-{random.getrandbits(48):012x}"
        self.measured = ClientMeasurements()
        md = [("x-kvcodec-client", self.client_id)]
        if token:
            md.append(("authorization", f"Bearer {token}"))
        if tenant is not None:
            md.append(("x-kvcodec-tenant", tenant))
        self.metadata = tuple(md)
        self._secure = tls or root_certificates is not None
        self._creds = grpc.ssl_channel_credentials(root_certificates) if self._secure else None
        self._options = _options(max_message_bytes)
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)

    def _retryable(self, exc: grpc.RpcError, attempt: int, deadline: float) -> float | None:
        """Seconds to sleep before retrying, or None to give up."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        pause = self._backoff(attempt)
        return pause if time.monotonic() + pause < deadline else None

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    @staticmethod
    def _left(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise E.DeadlineExceeded("DEADLINE_EXCEEDED: client deadline passed before the call")
        return left


class CacheClient(_Base):
    """Synchronous client. See the module docstring; arguments:

    Args:
        address: HOST:PORT of a server (or a load balancer in front of replicas).
        token: bearer token (auth on); tenant: ask for this tenant explicitly.
        root_certificates: PEM CA to trust (TLS on); tls: TLS with system roots.
        server_name: TLS name override (tests with self-signed certificates).
        timeout_s: default deadline per call, retries included.
        retries / backoff_s / max_backoff_s: UNAVAILABLE retry policy.
    """

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        if self._secure:
            self.channel = grpc.secure_channel(address, self._creds, options=self._options)
        else:
            self.channel = grpc.insecure_channel(address, options=self._options)
        self.stub = pb_grpc.KVCacheStub(self.channel)

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn: Callable[[float], T], timeout_s: float | None = None) -> T:
        deadline, attempt = self._deadline(timeout_s), 0
        while True:
            try:
                return fn(self._left(deadline))
            except grpc.RpcError as exc:
                pause = self._retryable(exc, attempt, deadline)
                if pause is None:
                    raise map_rpc_error(exc) from None
                time.sleep(pause)
                attempt += 1

    def health(self, service: str = "", timeout_s: float | None = 5.0) -> str:
        """The server's health status name: ``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = self._call(lambda t: stub.Check(health_pb2.HealthCheckRequest(service=service),
                                               timeout=t, metadata=self.metadata), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def lookup(self, ctx: CacheContext | None = None, keys: Sequence[str] = (),
               levels: Sequence[str] = (), timeout_s: float | None = None) -> pb.LookupResponse:
        """Which chunks exist at which levels, with sizes (by context or raw keys)."""
        req = pb.LookupRequest(context=ctx.to_proto() if ctx else None, keys=keys, levels=levels)
        return self._call(lambda t: self.stub.Lookup(req, timeout=t, metadata=self.metadata), timeout_s)

    def put_chunks(self, ctx: CacheContext, chunks: Sequence[tuple[int, str, bytes]],
                   raw: bool = False, timeout_s: float | None = None) -> list[pb.PutResult]:
        """Upload ``(index, level, bytes)`` chunks; returns once all are durable."""
        kind = pb.PAYLOAD_RAW_KV if raw else pb.PAYLOAD_ENCODED
        resp = self._call(lambda t: self.stub.Put(put_messages(ctx, chunks, kind), timeout=t,
                                                  metadata=self.metadata), timeout_s)
        return list(resp.results)

    def put_kv(self, ctx: CacheContext, keys: Any, values: Any, level: str | Sequence[str] = "balanced",
               encode_on_server: bool = False, timeout_s: float | None = None) -> list[pb.PutResult]:
        """Encode a context's KV chunk by chunk (here, or on the server) and upload it."""
        return self.put_chunks(ctx, encode_chunks(ctx, keys, values, level, encode_on_server),
                               encode_on_server, timeout_s)

    def get_chunks(self, refs: Sequence[pb.ChunkRef], ctx: CacheContext | None = None,
                   timeout_s: float | None = None) -> Iterator[FetchedChunk]:
        """Stream whole chunks in request order (``blob`` None = miss)."""
        deadline, attempt, yielded = self._deadline(timeout_s), 0, False
        request = get_request(ctx, refs)
        while True:
            t0, asm = time.perf_counter(), Reassembler()
            try:
                for msg in self.stub.Get(request, timeout=self._left(deadline), metadata=self.metadata):
                    chunk = asm.feed(msg)
                    if chunk is not None:
                        yielded = True
                        yield chunk
                self._observe_transfer(asm.bytes, time.perf_counter() - t0)
                return
            except grpc.RpcError as exc:
                pause = None if yielded else self._retryable(exc, attempt, deadline)
                if pause is None:
                    raise map_rpc_error(exc) from None
                time.sleep(pause)
                attempt += 1

    def _observe_transfer(self, nbytes: int, seconds: float) -> None:
        if nbytes >= 256 * 1024 and seconds > 0:
            self.measured.bandwidth_bytes_per_s = nbytes / seconds

    def fetch_kv(self, ctx: CacheContext, level: str | Sequence[str] = "balanced",
                 device: Any = None, timeout_s: float | None = None) -> list[FetchedChunk]:
        """Fetch and decode every chunk of ``ctx``; decoding overlaps the transfer."""
        refs = [pb.ChunkRef(index=i, level=lv) for i, lv in enumerate(_levels_for(ctx, level))]
        return self.fetch_refs(refs, ctx, device, timeout_s)

    def fetch_refs(self, refs: Sequence[pb.ChunkRef], ctx: CacheContext | None = None,
                   device: Any = None, timeout_s: float | None = None) -> list[FetchedChunk]:
        """Fetch and decode chunks by ref (e.g. :func:`plan_refs`), streaming decode."""
        with ThreadPoolExecutor(1, thread_name_prefix="kvcodec-decode") as pool:
            futures: list[Future[FetchedChunk]] = [
                pool.submit(_decode, c, self.measured, device)
                for c in self.get_chunks(refs, ctx, timeout_s)]
            return [f.result() for f in futures]

    def plan(self, ctx: CacheContext, ttft_budget_ms: float = 0.0, quality_floor: str = "balanced",
             allow_blend: bool = True, prefill_tokens_per_s: float = 0.0,
             timeout_s: float | None = None) -> pb.PlanResponse:
        """The controller's per-chunk decision, fed with this client's measurements."""
        req = plan_request(ctx, self.measured, self.client_id, ttft_budget_ms, quality_floor,
                           allow_blend, prefill_tokens_per_s)
        return self._call(lambda t: self.stub.Plan(req, timeout=t, metadata=self.metadata), timeout_s)

    def delete(self, keys: Sequence[str], timeout_s: float | None = None) -> pb.DeleteResponse:
        req = pb.DeleteRequest(keys=keys)
        return self._call(lambda t: self.stub.Delete(req, timeout=t, metadata=self.metadata), timeout_s)

    def stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        import json

        resp = self._call(lambda t: self.stub.Stats(pb.StatsRequest(), timeout=t,
                                                    metadata=self.metadata), timeout_s)
        return json.loads(resp.json)


class AsyncCacheClient(_Base):
    """asyncio client (``grpc.aio``); same arguments and methods as :class:`CacheClient`,
    as coroutines (``get_chunks`` is an async iterator). Create it inside a running loop."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        if self._secure:
            self.channel = grpc.aio.secure_channel(address, self._creds, options=self._options)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=self._options)
        self.stub = pb_grpc.KVCacheStub(self.channel)

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, fn: Callable[[float], Any], timeout_s: float | None = None) -> Any:
        deadline, attempt = self._deadline(timeout_s), 0
        while True:
            try:
                return await fn(self._left(deadline))
            except grpc.RpcError as exc:
                pause = self._retryable(exc, attempt, deadline)
                if pause is None:
                    raise map_rpc_error(exc) from None
                await asyncio.sleep(pause)
                attempt += 1

    async def health(self, service: str = "", timeout_s: float | None = 5.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await self._call(lambda t: stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                     timeout=t, metadata=self.metadata), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def lookup(self, ctx: CacheContext | None = None, keys: Sequence[str] = (),
                     levels: Sequence[str] = (), timeout_s: float | None = None) -> pb.LookupResponse:
        req = pb.LookupRequest(context=ctx.to_proto() if ctx else None, keys=keys, levels=levels)
        return await self._call(lambda t: self.stub.Lookup(req, timeout=t, metadata=self.metadata),
                                timeout_s)

    async def put_chunks(self, ctx: CacheContext, chunks: Sequence[tuple[int, str, bytes]],
                         raw: bool = False, timeout_s: float | None = None) -> list[pb.PutResult]:
        kind = pb.PAYLOAD_RAW_KV if raw else pb.PAYLOAD_ENCODED
        resp = await self._call(lambda t: self.stub.Put(put_messages(ctx, chunks, kind), timeout=t,
                                                        metadata=self.metadata), timeout_s)
        return list(resp.results)

    async def put_kv(self, ctx: CacheContext, keys: Any, values: Any,
                     level: str | Sequence[str] = "balanced", encode_on_server: bool = False,
                     timeout_s: float | None = None) -> list[pb.PutResult]:
        chunks = await asyncio.to_thread(encode_chunks, ctx, keys, values, level, encode_on_server)
        return await self.put_chunks(ctx, chunks, encode_on_server, timeout_s)

    async def get_chunks(self, refs: Sequence[pb.ChunkRef], ctx: CacheContext | None = None,
                         timeout_s: float | None = None) -> AsyncIterator[FetchedChunk]:
        deadline, attempt, yielded = self._deadline(timeout_s), 0, False
        request = get_request(ctx, refs)
        while True:
            t0, asm = time.perf_counter(), Reassembler()
            try:
                call = self.stub.Get(request, timeout=self._left(deadline), metadata=self.metadata)
                async for msg in call:
                    chunk = asm.feed(msg)
                    if chunk is not None:
                        yielded = True
                        yield chunk
                if asm.bytes >= 256 * 1024:
                    self.measured.bandwidth_bytes_per_s = asm.bytes / (time.perf_counter() - t0)
                return
            except grpc.RpcError as exc:
                pause = None if yielded else self._retryable(exc, attempt, deadline)
                if pause is None:
                    raise map_rpc_error(exc) from None
                await asyncio.sleep(pause)
                attempt += 1

    async def fetch_kv(self, ctx: CacheContext, level: str | Sequence[str] = "balanced",
                       device: Any = None, timeout_s: float | None = None) -> list[FetchedChunk]:
        refs = [pb.ChunkRef(index=i, level=lv) for i, lv in enumerate(_levels_for(ctx, level))]
        return await self.fetch_refs(refs, ctx, device, timeout_s)

    async def fetch_refs(self, refs: Sequence[pb.ChunkRef], ctx: CacheContext | None = None,
                         device: Any = None, timeout_s: float | None = None) -> list[FetchedChunk]:
        """Decode each chunk in a worker thread while the next one streams in."""
        tasks = [asyncio.create_task(asyncio.to_thread(_decode, c, self.measured, device))
                 async for c in self.get_chunks(refs, ctx, timeout_s)]
        return list(await asyncio.gather(*tasks))

    async def plan(self, ctx: CacheContext, ttft_budget_ms: float = 0.0,
                   quality_floor: str = "balanced", allow_blend: bool = True,
                   prefill_tokens_per_s: float = 0.0, timeout_s: float | None = None) -> pb.PlanResponse:
        req = plan_request(ctx, self.measured, self.client_id, ttft_budget_ms, quality_floor,
                           allow_blend, prefill_tokens_per_s)
        return await self._call(lambda t: self.stub.Plan(req, timeout=t, metadata=self.metadata),
                                timeout_s)

    async def delete(self, keys: Sequence[str], timeout_s: float | None = None) -> pb.DeleteResponse:
        req = pb.DeleteRequest(keys=keys)
        return await self._call(lambda t: self.stub.Delete(req, timeout=t, metadata=self.metadata),
                                timeout_s)

    async def stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        import json

        resp = await self._call(lambda t: self.stub.Stats(pb.StatsRequest(), timeout=t,
                                                          metadata=self.metadata), timeout_s)
        return json.loads(resp.json)
