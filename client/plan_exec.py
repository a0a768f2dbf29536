"""Carrying out the controller's plan on the client: a ready KV cache for the context.

Chunks are handled in context order, so every recomputed chunk attends to the
exact KV of everything before it:

* ``LOAD_KV``   the fetched chunk's KV is appended (cast to the model's dtype);
* ``LOAD_TEXT`` the chunk is prefilled on top of the KV so far
  (:func:`kvcodec.client.model.prefill`);
* ``BLEND``     a trailing run of position-free chunks is fused with
  :func:`kvcodec.client.blend.blend` (re-rotation + selective recompute), with the
  KV so far as its exact prefix and the question as its suffix — CacheBlend's
  RAG layout. A BLEND run that is not trailing, or has no suffix to end it, is
  recomputed instead (recorded as ``BLEND->LOAD_TEXT``).

A chunk that went missing between Plan and Get (evicted) is recomputed too
(``LOAD_KV->LOAD_TEXT``): a plan is advice, never a reason to fail.

With ``adaptive=True`` the client re-decides every LOAD_KV/LOAD_TEXT chunk just
before it, with the server's own cost model (:func:`kvcodec.service.controller.decide_chunk`)
fed by the throughput of the chunk it has just received, fetching one chunk per
Get while the previous one decodes — per-chunk adaptation within a request, as
CacheGen's simulation does (benchmarks/service_bench.py measures the gain).

Example::

    plan = client.plan(ctx, prefill_tokens_per_s=measured, allow_blend=True)
    out = run_plan(client, loaded, ctx, plan, suffix_ids=question_ids)
    cache = kv_to_cache(out.keys, out.values, config=loaded.config)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcodec.client.grpc_messages import CacheContext, plan_refs
from kvcodec.proto import kvcodec_pb2 as pb

ACTION_NAMES = {pb.ACTION_LOAD_KV: "LOAD_KV", pb.ACTION_LOAD_TEXT: "LOAD_TEXT",
                pb.ACTION_BLEND: "BLEND"}


@dataclass
class PlanOutcome:
    """The KV the plan produced and what was actually done.

    Attributes:
        keys, values: ``[layers, kv_heads, tokens, head_dim]`` for the context (plus the
            suffix when a BLEND consumed it, see ``suffix_done``).
        logits_last: next-token logits when a BLEND computed the suffix, else None.
        suffix_done: whether ``keys``/``values`` already include the suffix.
        actions: per chunk, the action taken (``"BLEND->LOAD_TEXT"`` for a fallback).
        timings: seconds spent fetching, prefilling and blending.
    """

    keys: torch.Tensor
    values: torch.Tensor
    logits_last: torch.Tensor | None = None
    suffix_done: bool = False
    actions: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _append(acc: tuple[torch.Tensor, torch.Tensor] | None, kv: Any, dtype: torch.dtype):
    k, v = kv.keys.to(dtype), kv.values.to(dtype)
    if acc is None:
        return k, v
    return torch.cat([acc[0], k], dim=2), torch.cat([acc[1], v], dim=2)


def _prefill(loaded: Any, ids: list[int], acc, timings: dict[str, float]):
    from kvcodec.client.model import prefill

    t0 = time.perf_counter()
    out = prefill(loaded, ids, past=acc)
    timings["prefill"] = timings.get("prefill", 0.0) + time.perf_counter() - t0
    return out


def _blend(loaded: Any, ctx: CacheContext, spans, run: list[int], fetched, acc, suffix_ids,
           ratio: float, timings: dict[str, float]):
    from kvcodec.client.blend import blend

    start = spans[run[0]].token_start
    pieces = [(list(ctx.token_ids[spans[i].token_start:spans[i].token_start + spans[i].token_count]),
               fetched[i].kv.keys.to(loaded.dtype), fetched[i].kv.values.to(loaded.dtype))
              for i in run]
    t0 = time.perf_counter()
    res = blend(loaded, list(ctx.token_ids[:start]), pieces,
                list(suffix_ids), ratio, prefix_kv=acc)
    timings["blend"] = timings.get("blend", 0.0) + time.perf_counter() - t0
    return (res.keys, res.values), res.logits_last  # every layer's KV (the cache's sliding-window layers hold a window)


def run_plan(client: Any, loaded: Any, ctx: CacheContext, plan: pb.PlanResponse,
             suffix_ids: list[int] | None = None, blend_ratio: float = 0.15,
             adaptive: bool = False, quality_floor: str = "balanced") -> PlanOutcome:
    """Fetch what the plan loads and build the context's KV.

    Args:
        client: a :class:`~kvcodec.client.grpc_client.CacheClient`.
        loaded: the :class:`~kvcodec.client.model.LoadedModel`.
        ctx: the context the plan was made for (prefix-mode keys).
        plan: the server's :class:`PlanResponse`.
        suffix_ids: the tokens after the context (the question); needed for BLEND.
        blend_ratio: share of blended tokens to recompute.
        adaptive: re-decide each chunk from the latest measured throughput.
        quality_floor: the floor the plan was made with (used when ``adaptive``).

    Returns:
        A :class:`PlanOutcome`.
    """
    if adaptive and not any(d.action == pb.ACTION_BLEND for d in plan.decisions):
        return _run_adaptive(client, loaded, ctx, plan, quality_floor)
    spans = ctx.keys("lossless")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fetched = {c.position: c for c in client.fetch_refs(plan_refs(plan))}
    by_index = {r.index: fetched[p] for p, r in enumerate(plan_refs(plan))}
    timings["fetch"] = time.perf_counter() - t0
    decisions = sorted(plan.decisions, key=lambda d: d.index)
    acc, actions, logits, i = None, [], None, 0
    while i < len(decisions):
        d, span = decisions[i], spans[decisions[i].index]
        ids = list(ctx.token_ids[span.token_start:span.token_start + span.token_count])
        have = by_index.get(d.index) is not None and by_index[d.index].kv is not None
        if d.action == pb.ACTION_BLEND:
            run = []
            for x in decisions[i:]:
                if x.action != pb.ACTION_BLEND:
                    break
                run.append(x.index)
            trailing = decisions[i + len(run) - 1].index == decisions[-1].index
            if trailing and suffix_ids and all(by_index.get(j) and by_index[j].kv is not None
                                               for j in run):
                (k, v), logits = _blend(loaded, ctx, spans, run, by_index, acc, suffix_ids,
                                        blend_ratio, timings)
                actions += ["BLEND"] * len(run)
                return PlanOutcome(k, v, logits, True, actions, timings)
            acc = _prefill(loaded, ids, acc, timings)
            actions.append("BLEND->LOAD_TEXT")
        elif d.action == pb.ACTION_LOAD_KV and have:
            acc = _append(acc, by_index[d.index].kv, loaded.dtype)
            actions.append("LOAD_KV")
        else:
            acc = _prefill(loaded, ids, acc, timings)
            actions.append("LOAD_TEXT" if d.action == pb.ACTION_LOAD_TEXT else "LOAD_KV->LOAD_TEXT")
        i += 1
    assert acc is not None, "a plan covers at least one chunk"
    return PlanOutcome(acc[0], acc[1], logits, False, actions, timings)


def _copies(client: Any, ctx: CacheContext) -> list[tuple]:
    """Per chunk, the stored exact-prefix copies (StoredCopy) at every level."""
    from kvcodec.service.controller import StoredCopy

    resp = client.lookup(ctx)
    return [tuple(StoredCopy(e.level, e.key, e.size_bytes) for e in c.levels if e.present)
            for c in resp.chunks]


def _run_adaptive(client: Any, loaded: Any, ctx: CacheContext, plan: pb.PlanResponse,
                  floor: str) -> PlanOutcome:
    from concurrent.futures import ThreadPoolExecutor

    from kvcodec.client.grpc_messages import _decode
    from kvcodec.service import controller as ctl

    spans, copies, timings = ctx.keys("lossless"), _copies(client, ctx), {}
    bandwidth = plan.bandwidth_bytes_per_s
    acc, actions, pending = None, [], []
    with ThreadPoolExecutor(1, thread_name_prefix="kvcodec-decode") as pool:
        for span, stored in zip(spans, copies):
            m = ctl.Measurements(bandwidth, plan.prefill_tokens_per_s,
                                 {**ctl.DEFAULT_DECODE_ELEMENTS_PER_S,
                                  **client.measured.decode_elements_per_s},
                                 ctx.layout.elements_per_token, ctx.layout.layers)
            d = ctl.decide_chunk(ctl.ChunkInput(span.index, span.token_count, stored), m, floor)
            if d.action == ctl.LOAD_KV:
                t0 = time.perf_counter()
                chunk = next(iter(client.get_chunks([pb.ChunkRef(key=d.key, level=d.level)])))
                seconds = time.perf_counter() - t0
                if chunk.blob is not None:
                    bandwidth = len(chunk.blob) / max(seconds, 1e-6)
                    pending.append((span, pool.submit(_decode, chunk, client.measured, None)))
                    actions.append("LOAD_KV")
                    continue
                d = ctl.Decision(span.index, ctl.LOAD_TEXT)
            for _, fut in pending:  # recompute needs every earlier chunk's KV
                acc = _append(acc, fut.result().kv, loaded.dtype)
            pending = []
            ids = list(ctx.token_ids[span.token_start:span.token_start + span.token_count])
            acc = _prefill(loaded, ids, acc, timings)
            actions.append("LOAD_TEXT")
        for _, fut in pending:
            acc = _append(acc, fut.result().kv, loaded.dtype)
    assert acc is not None, "a context has at least one chunk"
    return PlanOutcome(acc[0], acc[1], None, False, actions, timings)
