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
from kvcodec.service.auth import Caller, TokenAuthenticator
from kvcodec.service.config import ServerConfig
from kvcodec.service.errors import (AuthError, Overloaded, RequestRejected, ServiceError,
                                    TenantDenied)
from kvcodec.service.metrics import ServerMetrics
from kvcodec.service.naming import (Namespace, check_client_key, check_count, check_level,
                                    check_levels, context_chunks, context_keys)
from kvcodec.service.putstream import PutAssembler, StagedChunk
from kvcodec.service.usage import TenantUsage, bandwidth_key, stats_body
from kvcodec.store.errors import StoreUnavailable

log = logging.getLogger("kvcodec.service")
CLIENT_HEADER = "x-kvcodec-client"
ACTION_ENUM = {ctl.LOAD_KV: pb.ACTION_LOAD_KV, ctl.LOAD_TEXT: pb.ACTION_LOAD_TEXT,
               ctl.BLEND: pb.ACTION_BLEND}
MAX_CLIENT_ID = 128  # characters of a client id (header or ClientProfile.client_id)
STORE_BATCH = 64  # keys per store round trip; the call's deadline is checked between batches
METHOD_PREFIX = "/kvcodec.v1.KVCache/"
UNARY_METHODS = ("Lookup", "Delete", "Stats", "Plan")  # capped by max_call_s
# upper bounds of one reply entry's encoded size (fields, tags, lengths), for refusing a
# reply that cannot fit max_message_bytes before doing the work it describes
LOOKUP_CHUNK_BYTES, LOOKUP_LEVEL_BYTES, PLAN_DECISION_BYTES = 24, 92, 800
STORE_MESSAGES = {grpc.StatusCode.UNAVAILABLE: "store unavailable",
                  grpc.StatusCode.RESOURCE_EXHAUSTED: "store full"}
CANCEL_GRACE_S = 1.0  # how long a Put whose stream ended mid-chunk waits for a cancel to be reported


class CallAbandoned(Exception):
    """The client cancelled or the deadline passed: stop working, send nothing."""

    def __init__(self, message: str = "deadline passed") -> None:
        super().__init__(message)
        self.message = message


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map a library error to the gRPC status the client sees."""
    from kvcodec.codec.errors import KVCodecError
    from kvcodec.store.errors import (IntegrityError, InvalidKey, StoreError, StoreFull,
                                      StoreUnavailable)

    table: list[tuple[type[BaseException], grpc.StatusCode]] = [
        (TenantDenied, grpc.StatusCode.PERMISSION_DENIED),
        (AuthError, grpc.StatusCode.UNAUTHENTICATED),
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
            if isinstance(exc, (StoreFull, StoreUnavailable)) or type(exc) is StoreError:
                # the backend's text names hosts, buckets and store keys: the log keeps it
                log.warning("store error: %s", exc)
                return code, STORE_MESSAGES.get(code, "store error") + " (details in the server log)"
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def client_id(context: grpc.ServicerContext, reported: str = "") -> str:
    """Who the bandwidth estimate belongs to: the reported id, header, or peer host.

    Raises:
        RequestRejected: an id over 128 characters, naming where it came from.
    """
    field, value = "client.client_id", reported
    if not value:
        field, value = CLIENT_HEADER, ""
        for key, header in context.invocation_metadata() or ():
            if key == CLIENT_HEADER and isinstance(header, str) and header:
                value = header
    if len(value) > MAX_CLIENT_ID:
        raise RequestRejected(f"{field}: {len(value)} characters, at most {MAX_CLIENT_ID}")
    if value:
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
        self.usage = TenantUsage()

    # ------------------------------------------------------------ plumbing
    @contextmanager
    def _rpc(self, method: str, context: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
        """Resolve the caller, time the call, count it, log it, and turn library errors into
        statuses. ``info["caller"]`` is the :class:`Caller`; ``info["stop_at"]`` the
        ``perf_counter`` time past which a unary call stops (``max_call_s``)."""
        t0 = time.perf_counter()
        info: dict[str, Any] = {"method": method, "tenant": ""}
        if method in UNARY_METHODS and self.config.max_call_s > 0:
            info["stop_at"] = t0 + self.config.max_call_s
        self.metrics.in_flight.inc()
        code = grpc.StatusCode.OK
        try:
            info["caller"] = self.auth.caller_of(context, METHOD_PREFIX + method)
            info["tenant"] = info["caller"].tenant
            yield info
        except CallAbandoned as exc:
            code = grpc.StatusCode.CANCELLED if context.is_active() is False else \
                grpc.StatusCode.DEADLINE_EXCEEDED
            self.metrics.cancelled.labels(method).inc()
            # end the call with that status: a handler that returned nothing would answer INTERNAL
            # ("Failed to serialize response"), which can reach a client before its own deadline fires
            context.abort(code, "call cancelled" if code == grpc.StatusCode.CANCELLED else exc.message)
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
            if "caller" in info:
                self.usage.record(info["tenant"], method, code == grpc.StatusCode.OK, info)
            record = {k: v for k, v in info.items() if k not in ("caller", "stop_at")}
            log.info("rpc", extra={**record, "code": code.name, "ms": round(elapsed * 1000, 3),
                                   "peer": context.peer()})

    def _alive(self, context: grpc.ServicerContext, info: dict[str, Any] | None = None) -> None:
        """Raise CallAbandoned if the call was cancelled, its deadline passed, or (with
        ``info``) it has worked longer than ``max_call_s``."""
        remaining = context.time_remaining()
        if not context.is_active() or (remaining is not None and remaining <= 0):
            raise CallAbandoned()
        stop_at = (info or {}).get("stop_at")
        if stop_at is not None and time.perf_counter() > stop_at:
            raise CallAbandoned(f"max_call_s: {info['method']} stopped after "
                                f"{self.config.max_call_s:g} s, the server's limit per call")

    def _present(self, namespace: Namespace, keys: list[str], context: grpc.ServicerContext,
                 info: dict[str, Any]) -> list[int | None]:
        """Encoded size of each key in the caller's namespace (None = absent or bad).

        Batched, verified reads (``get_many``: pipelined on Redis) of 64 keys, the call's
        deadline checked between batches: the store has no size-only query, and a size is
        only worth reporting for an entry that verifies.
        """
        sizes: list[int | None] = []
        for start in range(0, len(keys), STORE_BATCH):
            self._alive(context, info)
            names = [namespace.store_key(k) for k in keys[start:start + STORE_BATCH]]
            sizes.extend(None if blob is None else len(blob) for blob in self.store.get_many(names))
        return sizes

    def _reply_fits(self, what: str, size: int) -> None:
        """Refuse up front a reply that could not be sent (over ``max_message_bytes``).

        Raises:
            Overloaded: naming the request and the estimate.
        """
        limit = self.config.max_message_bytes
        if size > limit:
            raise Overloaded(f"reply: {what} would take up to {size} bytes > max_message_bytes "
                             f"{limit}; ask for fewer chunks or levels")

    # ------------------------------------------------------------- Lookup
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        with self._rpc("Lookup", context) as info:
            ns = info["caller"].namespace
            if request.HasField("context"):
                resp = self._lookup_context(request, ns, context, info)
            else:
                check_count("keys", len(request.keys), self.config)
                self._reply_fits(f"Lookup of {len(request.keys)} keys",
                                 len(request.keys) * (LOOKUP_CHUNK_BYTES + LOOKUP_LEVEL_BYTES))
                keys = [check_client_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
                resp = pb.LookupResponse()
                for i, (k, size) in enumerate(zip(keys, self._present(ns, keys, context, info))):
                    resp.chunks.append(pb.ChunkStatus(index=i, levels=[pb.LevelEntry(
                        key=k, present=size is not None, size_bytes=size or 0)]))
            info["chunks"] = len(resp.chunks)
            return resp

    def _lookup_context(self, request: pb.LookupRequest, ns: Namespace,
                        context: grpc.ServicerContext, info: dict[str, Any]) -> pb.LookupResponse:
        levels = check_levels(request.levels) or list(_levels())
        chunks = context_chunks(request.context, self.config)
        self._reply_fits(f"Lookup of {chunks} chunks at {len(levels)} levels",
                         chunks * (LOOKUP_CHUNK_BYTES + len(levels) * LOOKUP_LEVEL_BYTES))
        statuses: list[pb.ChunkStatus] = []
        for lv in levels:
            keys = self._context_keys(request.context, lv, context, info)
            if not statuses:
                statuses = [pb.ChunkStatus(index=k.index, token_start=k.token_start,
                                           token_count=k.token_count) for k in keys]
            sizes = self._present(ns, [k.hex for k in keys], context, info)
            for status, k, size in zip(statuses, keys, sizes):
                status.levels.append(pb.LevelEntry(level=lv, key=k.hex, present=size is not None,
                                                   size_bytes=size or 0))
        return pb.LookupResponse(chunks=statuses)

    def _context_keys(self, ctx: pb.Context, level: str, context: grpc.ServicerContext,
                      info: dict[str, Any], mode: str | None = None) -> list:
        """context_keys under this server's limits, stopping when the call ends."""
        return context_keys(ctx, level, mode=mode, limits=self.config,
                            alive=lambda: self._alive(context, info))

    # ---------------------------------------------------------------- Get
    def _resolve_refs(self, request: pb.GetRequest, context: grpc.ServicerContext,
                      info: dict[str, Any]) -> list[tuple[str, str]]:
        """(client key, level) per requested chunk, in request order."""
        check_count("chunks", len(request.chunks), self.config)
        if request.HasField("context"):
            context_chunks(request.context, self.config)
        out: list[tuple[str, str]] = []
        derived: dict[str, list] = {}
        for i, ref in enumerate(request.chunks):
            if not request.HasField("context"):
                out.append((check_client_key(ref.key, f"chunks[{i}].key"), ref.level[:40]))
                continue
            level = check_level(ref.level or "balanced")
            if level not in derived:
                derived[level] = self._context_keys(request.context, level, context, info)
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
            if request.piece_bytes and request.piece_bytes < self.config.min_piece_bytes:
                raise RequestRejected(f"piece_bytes: {request.piece_bytes} < min_piece_bytes "
                                      f"{self.config.min_piece_bytes}")
            refs = self._resolve_refs(request, context, info)
            piece = min(request.piece_bytes or self.config.piece_bytes, self.config.piece_bytes)
            ns, who = info["caller"].namespace, client_id(context)
            t0, sent = time.perf_counter(), 0
            info.update(hits=0, misses=0, bytes=0)
            for position, (key, level) in enumerate(refs):
                self._alive(context)
                blob = self.store.get(ns.store_key(key))
                if blob is None:
                    self.metrics.misses.inc()
                    info["misses"] += 1
                    yield pb.GetResponse(position=position, key=key, found=False, last=True, level=level)
                    continue
                self.metrics.hits.inc()
                info["hits"] += 1
                for off in range(0, len(blob), piece):
                    self._alive(context)
                    data = blob[off:off + piece]
                    yield pb.GetResponse(position=position, key=key, found=True, total_bytes=len(blob),
                                         offset=off, data=data, last=off + piece >= len(blob),
                                         level=level)
                    sent += len(data)
                    info["bytes"] = sent
                    self.metrics.bytes_sent.inc(len(data))
            self.bandwidth.observe(bandwidth_key(info["tenant"], who), sent, time.perf_counter() - t0)
            info.update(chunks=len(refs), bytes=sent)

    # ---------------------------------------------------------------- Put
    def Put(self, request_iterator: Iterable[pb.PutRequest],
            context: grpc.ServicerContext) -> pb.PutResponse:
        with self._rpc("Put", context) as info:
            assembler = PutAssembler(self.config, self.verifier)  # limits: max_context_tokens & co
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
            results = self._commit(info["caller"].namespace, staged)
            info.update(chunks=len(staged), bytes=assembler.received)
            self.metrics.bytes_received.inc(assembler.received)
            return pb.PutResponse(results=results)

    def _commit(self, namespace: Namespace, staged: list[StagedChunk]) -> list[pb.PutResult]:
        items = [(namespace.store_key(c.key), c.blob) for c in staged]
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
            check_count("keys", len(request.keys), self.config)
            keys = [check_client_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
            ns, missing = info["caller"].namespace, []
            for i, k in enumerate(keys):
                if i % STORE_BATCH == 0:
                    self._alive(context, info)
                if not self.store.delete(ns.store_key(k)):
                    missing.append(k)
            info["chunks"] = len(keys)
            return pb.DeleteResponse(deleted=len(keys) - len(missing), missing=missing)

    # -------------------------------------------------------------- Stats
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        with self._rpc("Stats", context) as info:
            caller: Caller = info["caller"]
            body = stats_body(self, caller.tenant, caller.admin)
            info["scope"] = body["scope"]
            return pb.StatsResponse(json=json.dumps(body, default=str))

    # --------------------------------------------------------------- Plan
    def Plan(self, request: pb.PlanRequest, context: grpc.ServicerContext) -> pb.PlanResponse:
        with self._rpc("Plan", context) as info:
            floor = request.quality_floor or ctl.DEFAULT_FLOOR
            if floor not in ctl.QUALITY_RANK:
                raise RequestRejected(f"quality_floor: {floor!r} not one of {', '.join(ctl.QUALITY_RANK)}")
            note = ""
            count = context_chunks(request.context, self.config)
            self._reply_fits(f"Plan of {count} chunks", count * PLAN_DECISION_BYTES)
            try:
                chunks = self._plan_inputs(request, info, context)
            except StoreUnavailable:  # the store is down: recompute everything
                keys = self._context_keys(request.context, ctl.DEFAULT_FLOOR, context, info)
                chunks = [ctl.ChunkInput(k.index, k.token_count) for k in keys]
                note = "store unavailable; "
            meas = self._measurements(request, context, info["tenant"])
            result = ctl.plan(chunks, meas, floor, request.ttft_budget_ms, request.allow_blend)
            result.explanation = note + result.explanation
            for d in result.decisions:
                self.metrics.decisions.labels(d.action).inc()
            info.update(chunks=len(chunks), ttft_ms=round(result.expected_ttft_ms, 3))
            resp = pb.PlanResponse(
                decisions=[pb.ChunkDecision(
                    index=d.index, action=ACTION_ENUM[d.action], level=d.level, key=d.key,
                    expected_bytes=d.expected_bytes, expected_ms=d.expected_ms,
                    transfer_ms=d.transfer_ms, decode_ms=d.decode_ms, compute_ms=d.compute_ms,
                    reason=d.reason) for d in result.decisions],
                expected_ttft_ms=result.expected_ttft_ms, within_budget=result.within_budget,
                bandwidth_bytes_per_s=meas.bandwidth_bytes_per_s,
                prefill_tokens_per_s=meas.prefill_tokens_per_s, explanation=result.explanation)
            self._reply_fits(f"Plan of {count} chunks", resp.ByteSize())
            return resp

    def _plan_inputs(self, request: pb.PlanRequest, info: dict[str, Any],
                     context: grpc.ServicerContext) -> list[ctl.ChunkInput]:
        modes = ["prefix"] + (["position_free"] if request.allow_blend else [])
        found: dict[str, list[list[ctl.StoredCopy]]] = {}
        base: list = []
        for mode in modes:
            found[mode] = []
            for level in _levels():
                keys = self._context_keys(request.context, level, context, info, mode=mode)
                base = base or keys
                sizes = self._present(info["caller"].namespace, [k.hex for k in keys], context, info)
                for i, (k, size) in enumerate(zip(keys, sizes)):
                    if len(found[mode]) <= i:
                        found[mode].append([])
                    if size is not None:
                        found[mode][i].append(ctl.StoredCopy(level, k.hex, size))
        return [ctl.ChunkInput(k.index, k.token_count, tuple(found["prefix"][i]),
                               tuple(found.get("position_free", [[]] * len(base))[i]))
                for i, k in enumerate(base)]

    def _measurements(self, request: pb.PlanRequest, context: grpc.ServicerContext,
                      tenant: str) -> ctl.Measurements:
        prof = request.client
        who = bandwidth_key(tenant, client_id(context, prof.client_id))
        if prof.bandwidth_bytes_per_s > 0:
            self.bandwidth.observe_rate(who, prof.bandwidth_bytes_per_s)
        m = request.context.model
        decode = {**ctl.DEFAULT_DECODE_ELEMENTS_PER_S, **self.decode_speeds,
                  **{k: v for k, v in prof.decode_elements_per_s.items()
                     if k in ctl.DEFAULT_DECODE_ELEMENTS_PER_S and v > 0}}
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

