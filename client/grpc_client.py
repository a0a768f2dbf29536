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
import copy
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from kvcodec.client.grpc_messages import (MiB, CacheContext, ClientMeasurements, FetchedChunk,
                                          ModelLayout, Reassembler, _decode, _levels_for,
                                          _options, encode_chunks, get_request, map_rpc_error,
                                          plan_refs, plan_request, put_messages)
from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.proto import kvcodec_pb2_grpc as pb_grpc
from kvcodec.service import errors as E

T = TypeVar("T")
C = TypeVar("C", bound="_Base")
SALT_HEADER = "x-kvcodec-salt-bin"  # binary metadata: any UTF-8 salt travels unchanged
MAX_SALT_BYTES = 1024


def _with_salt(metadata: tuple[tuple[str, Any], ...], salt: str) -> tuple[tuple[str, Any], ...]:
    """``metadata`` with its salt header replaced by ``salt`` (removed for "").

    Raises:
        kvcodec.service.errors.ConfigError: a salt that is not a string, not encodable
            as UTF-8 or over 1024 bytes (the server's limit).
    """
    try:
        raw = salt.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        raise E.ConfigError(f"salt: {salt!r:.80} is not a UTF-8 string") from None
    if len(raw) > MAX_SALT_BYTES:
        raise E.ConfigError(f"salt: {len(raw)} bytes, at most {MAX_SALT_BYTES}")
    kept = tuple(item for item in metadata if item[0] != SALT_HEADER)
    return kept + ((SALT_HEADER, raw),) if raw else kept

__all__ = ["CacheClient", "AsyncCacheClient", "ModelLayout", "CacheContext", "FetchedChunk",
           "ClientMeasurements", "encode_chunks", "put_messages", "plan_refs", "map_rpc_error"]


# ------------------------------------------------------------ clients
def _warm_up() -> None:
    from kvcodec.codec import warm_up

    warm_up()


class _Base:
    def __init__(self, address: str, *, token: str | None = None, tenant: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False,
                 client_cert: bytes | None = None, client_key: bytes | None = None,
                 server_name: str | None = None, timeout_s: float = 30.0, retries: int = 4,
                 backoff_s: float = 0.05, max_backoff_s: float = 2.0,
                 max_message_bytes: int = 8 * MiB, client_id: str | None = None,
                 salt: str | None = None) -> None:
        self.address, self.timeout_s, self.retries = address, timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.client_id = client_id or f"py-{random.getrandbits(48):012x}"
        self.measured = ClientMeasurements()
        # compile the codec's kernels while the first request travels (decoding waits for it)
        threading.Thread(target=_warm_up, name="kvcodec-warm-up", daemon=True).start()
        md = [("x-kvcodec-client", self.client_id)]
        if token:
            md.append(("authorization", f"Bearer {token}"))
        if tenant is not None:
            md.append(("x-kvcodec-tenant", tenant))
        self.metadata = tuple(md)
        if salt:
            self.metadata = _with_salt(self.metadata, salt)
        self._secure = tls or root_certificates is not None
        self._creds = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert) \
            if self._secure else None
        self._options = _options(max_message_bytes)
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))

    def salted(self: C, salt: str) -> C:
        """This client with every call narrowed to the namespace ``(tenant, salt)`` (vLLM's
        ``cache_salt``): a view sharing this client's channel; close the original, not the view.

        Args:
            salt: any UTF-8 string of at most 1024 bytes ("" = no salt).

        Example::

            for request in batch:
                client.salted(request.cache_salt).fetch_kv(ctx)
        """
        view = copy.copy(self)
        view.metadata = _with_salt(self.metadata, salt)
        return view

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
        salt: narrow every call to the namespace (tenant, salt); see :meth:`salted`.
        root_certificates: PEM CA to trust (TLS on); tls: TLS with system roots.
        client_cert / client_key: PEM pair for mutual TLS (server ``tls_client_ca``).
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
