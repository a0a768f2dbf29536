"""The KVCache RPC handlers: thin over kvcodec.store, kvcodec.codec and the controller.

Runs under grpc's synchronous server (see :mod:`kvcodec.service.server` for
why): each call owns a worker thread, so blocking store I/O and CPU-heavy codec
work (verification, encoding raw KV) never stall other calls. Every handler
checks ``context.is_active()`` and the deadline between chunks and pieces, so a
cancelled or expired call stops working promptly, and a Put commits nothing
unless the call is still alive after the client's last message.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from kvcodec.proto import kvcodec_pb2 as pb
from kvcodec.proto import kvcodec_pb2_grpc as pb_grpc
from kvcodec.service import controller as ctl
from kvcodec.service.auth import TokenAuthenticator
from kvcodec.service.config import ServerConfig
from kvcodec.service.errors import Overloaded, RequestRejected, ServiceError
from kvcodec.service.metrics import ServerMetrics
from kvcodec.service.naming import check_client_key, check_level, context_keys, store_key
from kvcodec.service.putstream import PutAssembler, StagedChunk
from kvcodec.store.errors import StoreUnavailable

log = logging.getLogger("kvcodec.service")
CLIENT_HEADER = "x-kvcodec-client"
ACTION_ENUM = {ctl.LOAD_KV: pb.ACTION_LOAD_KV, ctl.LOAD_TEXT: pb.ACTION_LOAD_TEXT,
               ctl.BLEND: pb.ACTION_BLEND}
MAX_REFS = 100_000
CANCEL_GRACE_S = 1.0  # how long a Put whose stream ended mid-chunk waits for a cancel to be reported


class CallAbandoned(Exception):
    """The client cancelled or the deadline passed: stop working, send nothing."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map a library error to the gRPC status the client sees."""
    from kvcodec.codec.errors import KVCodecError
    from kvcodec.store.errors import (IntegrityError, InvalidKey, StoreError, StoreFull,
                                      StoreUnavailable)

    table: list[tuple[type[BaseException], grpc.StatusCode]] = [
        (RequestRejected, grpc.StatusCode.INVALID_ARGUMENT),
        (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (KVCodecError, grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidKey, grpc.StatusCode.INVALID_ARGUMENT),
        (IntegrityError, grpc.StatusCode.INVALID_ARGUMENT),
        (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
        (StoreError, grpc.StatusCode.INTERNAL),
        (ServiceError, grpc.StatusCode.INTERNAL),
    ]
    for kind, code in table:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def client_id(context: grpc.ServicerContext, reported: str = "") -> str:
    """Who the bandwidth estimate belongs to: the reported id, header, or peer host."""
    if reported:
        return reported
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_HEADER and isinstance(value, str) and value:
            return value
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0]


class KVCacheServicer(pb_grpc.KVCacheServicer):
    """Implements kvcodec.v1.KVCache over one shared chunk store.

    Args:
        store: the chunk store (tenant "" handle; tenants are key namespaces).
        config: server configuration (limits, defaults).
        metrics: where counters go.
        authenticator: token -> tenant.
    """

    def __init__(self, store: Any, config: ServerConfig, metrics: ServerMetrics,
                 authenticator: TokenAuthenticator) -> None:
        self.store, self.config, self.metrics, self.auth = store, config, metrics, authenticator
        self.bandwidth = ctl.BandwidthEstimator(config.default_bandwidth_bytes_per_s,
                                                config.ewma_alpha)
        self.decode_speeds: dict[str, float] = {}
        self.verifier: Any = None  # set by CacheServer when verify_processes > 0

    # ------------------------------------------------------------ plumbing
    @contextmanager
    def _rpc(self, method: str, context: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
        """Time a call, count it, log it, and turn library errors into statuses."""
        info: dict[str, Any] = {"method": method, "tenant": self.auth.tenant_of(context)}
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        code = grpc.StatusCode.OK
        try:
            yield info
        except CallAbandoned:
            code = grpc.StatusCode.CANCELLED if context.is_active() is False else \
                grpc.StatusCode.DEADLINE_EXCEEDED
            self.metrics.cancelled.labels(method).inc()
            # end the call with that status: a handler that returned nothing would answer INTERNAL
            # ("Failed to serialize response"), which can reach a client before its own deadline fires
            context.abort(code, "call cancelled" if code == grpc.StatusCode.CANCELLED else "deadline passed")
        except GeneratorExit:  # gRPC dropped a streaming handler: the client cancelled
            code = grpc.StatusCode.CANCELLED
            self.metrics.cancelled.labels(method).inc()
            raise
        except Exception as exc:
            if context.code() is not None:  # context.abort() already set a status
                code = context.code()
                raise
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s", method)
            context.abort(code, message)
        finally:
            elapsed = time.perf_counter() - t0
            self.metrics.in_flight.dec()
            self.metrics.rpc_seconds.labels(method).observe(elapsed)
            self.metrics.rpc_total.labels(method, code.name).inc()
            log.info("rpc", extra={**info, "code": code.name, "ms": round(elapsed * 1000, 3),
                                   "peer": context.peer()})

    def _alive(self, context: grpc.ServicerContext) -> None:
        """Raise CallAbandoned if the call was cancelled or its deadline passed."""
        remaining = context.time_remaining()
        if not context.is_active() or (remaining is not None and remaining <= 0):
            raise CallAbandoned()

    def _present(self, tenant: str, keys: list[str]) -> list[int | None]:
        """Encoded size of each key in the caller's namespace (None = absent or bad).

        One batched, verified read (``get_many``: pipelined on Redis): the store has no
        size-only query, and a size is only worth reporting for an entry that verifies.
        """
        names = [store_key(tenant, k) for k in keys]
        return [None if blob is None else len(blob) for blob in self.store.get_many(names)]

    # ------------------------------------------------------------- Lookup
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        with self._rpc("Lookup", context) as info:
            resp = pb.LookupResponse()
            if request.HasField("context"):
                levels = [check_level(lv) for lv in request.levels] or list(_levels())
                per_level = {lv: context_keys(request.context, lv) for lv in levels}
                first = per_level[levels[0]]
                statuses = [pb.ChunkStatus(index=k.index, token_start=k.token_start,
                                           token_count=k.token_count) for k in first]
                for lv, keys in per_level.items():
                    self._alive(context)
                    sizes = self._present(info["tenant"], [k.hex for k in keys])
                    for status, k, size in zip(statuses, keys, sizes):
                        status.levels.append(pb.LevelEntry(level=lv, key=k.hex, present=size is not None,
                                                           size_bytes=size or 0))
                resp.chunks.extend(statuses)
            else:
                keys = [check_client_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
                for i, (k, size) in enumerate(zip(keys, self._present(info["tenant"], keys))):
                    resp.chunks.append(pb.ChunkStatus(index=i, levels=[pb.LevelEntry(
                        key=k, present=size is not None, size_bytes=size or 0)]))
            info["chunks"] = len(resp.chunks)
            return resp

    # ---------------------------------------------------------------- Get
    def _resolve_refs(self, request: pb.GetRequest) -> list[tuple[str, str]]:
        """(client key, level) per requested chunk, in request order."""
        if len(request.chunks) > MAX_REFS:
            raise Overloaded(f"chunks: {len(request.chunks)} requested, at most {MAX_REFS}")
        out: list[tuple[str, str]] = []
        derived: dict[str, list] = {}
        for i, ref in enumerate(request.chunks):
            if not request.HasField("context"):
                out.append((check_client_key(ref.key, f"chunks[{i}].key"), ref.level))
                continue
            level = check_level(ref.level or "balanced")
            if level not in derived:
                derived[level] = context_keys(request.context, level)
            if ref.index >= len(derived[level]):
                raise RequestRejected(f"chunks[{i}].index: {ref.index} >= {len(derived[level])} chunks")
            key = derived[level][ref.index].hex
            if ref.key and ref.key != key:
                raise RequestRejected(f"chunks[{i}].key: {ref.key[:16]}… does not match the "
                                      f"context's chunk {ref.index} ({key[:16]}…)")
            out.append((key, level))
        return out

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterable[pb.GetResponse]:
        with self._rpc("Get", context) as info:
            refs = self._resolve_refs(request)
            piece = min(request.piece_bytes or self.config.piece_bytes, self.config.piece_bytes)
            t0, sent = time.perf_counter(), 0
            for position, (key, level) in enumerate(refs):
                self._alive(context)
                blob = self.store.get(store_key(info["tenant"], key))
                if blob is None:
                    self.metrics.misses.inc()
                    yield pb.GetResponse(position=position, key=key, found=False, last=True, level=level)
                    continue
                self.metrics.hits.inc()
                for off in range(0, len(blob), piece):
                    self._alive(context)
                    data = blob[off:off + piece]
                    yield pb.GetResponse(position=position, key=key, found=True, total_bytes=len(blob),
                                         offset=off, data=data, last=off + piece >= len(blob),
                                         level=level)
                    sent += len(data)
                    self.metrics.bytes_sent.inc(len(data))
            self.bandwidth.observe(client_id(context), sent, time.perf_counter() - t0)
            info.update(chunks=len(refs), bytes=sent)

    # ---------------------------------------------------------------- Put
    def Put(self, request_iterator: Iterable[pb.PutRequest],
            context: grpc.ServicerContext) -> pb.PutResponse:
        with self._rpc("Put", context) as info:
            assembler = PutAssembler(self.config, self.verifier)
            ended = threading.Event()  # set when the call terminates (a cancel included)
            if not context.add_callback(ended.set):
                ended.set()
            try:
                for msg in request_iterator:
                    assembler.feed(msg)
                    self._alive(context)
            except grpc.RpcError:  # the client went away mid-stream
                raise CallAbandoned() from None
            # a cancelled call can end the request stream early, and gRPC may hand the handler the
            # end of the stream before the cancellation (two events; under load in either order):
            # before calling a half-sent chunk the client's error, give the cancel a moment to land
            if not assembler.complete:
                ended.wait(CANCEL_GRACE_S)
            self._alive(context)
            staged = assembler.finish()
            self._alive(context)  # nothing is written for a cancelled or expired call
            results = self._commit(info["tenant"], staged)
            info.update(chunks=len(staged), bytes=assembler.received)
            self.metrics.bytes_received.inc(assembler.received)
            return pb.PutResponse(results=results)

    def _commit(self, tenant: str, staged: list[StagedChunk]) -> list[pb.PutResult]:
        items = [(store_key(tenant, c.key), c.blob) for c in staged]
        created = self.store.put_many(items) if items else []
        results = []
        for chunk, was_created in zip(staged, created):
            self.metrics.stored.labels(str(bool(was_created)).lower()).inc()
            results.append(pb.PutResult(index=chunk.index, key=chunk.key, created=bool(was_created),
                                        stored_bytes=len(chunk.blob)))
        return results

    # ------------------------------------------------------------- Delete
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        with self._rpc("Delete", context) as info:
            keys = [check_client_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
            missing = [k for k in keys if not self.store.delete(store_key(info["tenant"], k))]
            return pb.DeleteResponse(deleted=len(keys) - len(missing), missing=missing)

    # -------------------------------------------------------------- Stats
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        with self._rpc("Stats", context):
            m = self.metrics
            body = {
                "store": self.store.stats(),
                "store_health": self.store.health(),
                "server": {name: m.value(f"kvcodec_{name}_total") for name in
                           ("chunk_hits", "chunk_misses", "bytes_sent", "bytes_received")},
                "decode_elements_per_s": dict(self.decode_speeds),
                "bandwidth_bytes_per_s": self.bandwidth.snapshot(),
            }
            return pb.StatsResponse(json=json.dumps(body, default=str))

    # --------------------------------------------------------------- Plan
    def Plan(self, request: pb.PlanRequest, context: grpc.ServicerContext) -> pb.PlanResponse:
        with self._rpc("Plan", context) as info:
            floor = request.quality_floor or ctl.DEFAULT_FLOOR
            if floor not in ctl.QUALITY_RANK:
                raise RequestRejected(f"quality_floor: {floor!r} not one of {', '.join(ctl.QUALITY_RANK)}")
            note = ""
            try:
                chunks = self._plan_inputs(request, info["tenant"], context)
            except StoreUnavailable as exc:  # the store is down: recompute everything
                keys = context_keys(request.context, ctl.DEFAULT_FLOOR)
                chunks = [ctl.ChunkInput(k.index, k.token_count) for k in keys]
                note = f"store unavailable ({exc}); "
            meas = self._measurements(request, context)
            result = ctl.plan(chunks, meas, floor, request.ttft_budget_ms, request.allow_blend)
            result.explanation = note + result.explanation
            for d in result.decisions:
                self.metrics.decisions.labels(d.action).inc()
            info.update(chunks=len(chunks), ttft_ms=round(result.expected_ttft_ms, 3))
            return pb.PlanResponse(
                decisions=[pb.ChunkDecision(
                    index=d.index, action=ACTION_ENUM[d.action], level=d.level, key=d.key,
                    expected_bytes=d.expected_bytes, expected_ms=d.expected_ms,
                    transfer_ms=d.transfer_ms, decode_ms=d.decode_ms, compute_ms=d.compute_ms,
                    reason=d.reason) for d in result.decisions],
                expected_ttft_ms=result.expected_ttft_ms, within_budget=result.within_budget,
                bandwidth_bytes_per_s=meas.bandwidth_bytes_per_s,
                prefill_tokens_per_s=meas.prefill_tokens_per_s, explanation=result.explanation)

    def _plan_inputs(self, request: pb.PlanRequest, tenant: str,
                     context: grpc.ServicerContext) -> list[ctl.ChunkInput]:
        modes = ["prefix"] + (["position_free"] if request.allow_blend else [])
        found: dict[str, list[list[ctl.StoredCopy]]] = {}
        base: list = []
        for mode in modes:
            found[mode] = []
            for level in _levels():
                self._alive(context)
                keys = context_keys(request.context, level, mode=mode)
                base = base or keys
                sizes = self._present(tenant, [k.hex for k in keys])
                for i, (k, size) in enumerate(zip(keys, sizes)):
                    if len(found[mode]) <= i:
                        found[mode].append([])
                    if size is not None:
                        found[mode][i].append(ctl.StoredCopy(level, k.hex, size))
        return [ctl.ChunkInput(k.index, k.token_count, tuple(found["prefix"][i]),
                               tuple(found.get("position_free", [[]] * len(base))[i]))
                for i, k in enumerate(base)]

    def _measurements(self, request: pb.PlanRequest, context: grpc.ServicerContext) -> ctl.Measurements:
        prof = request.client
        who = client_id(context, prof.client_id)
        if prof.bandwidth_bytes_per_s > 0:
            self.bandwidth.observe_rate(who, prof.bandwidth_bytes_per_s)
        m = request.context.model
        decode = {**ctl.DEFAULT_DECODE_ELEMENTS_PER_S, **self.decode_speeds,
                  **{k: v for k, v in prof.decode_elements_per_s.items() if v > 0}}
        return ctl.Measurements(
            bandwidth_bytes_per_s=self.bandwidth.estimate(who),
            prefill_tokens_per_s=prof.prefill_tokens_per_s or self.config.default_prefill_tokens_per_s,
            decode_elements_per_s=decode,
            elements_per_token=2 * m.layers * m.kv_heads * m.head_dim,
            layers=m.layers or 1,
            blend_fraction=prof.blend_recompute_fraction or 0.15,
            probe=self.bandwidth.stale(who),
        )


def _levels() -> tuple[str, ...]:
    from kvcodec.codec import LEVELS

    return tuple(LEVELS)

