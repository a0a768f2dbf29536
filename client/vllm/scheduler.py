"""The scheduler side of the connector: look up, decide, and tell the workers what to do.

For a new request the scheduler asks the backend — in one batched call, on a
background thread so the scheduler never waits on I/O (vLLM is told "not yet"
until the answer arrives, or a miss after ``lookup_timeout_s``) — which of the
prompt's leading 256-token chunks are stored, at which levels and sizes. The
controller (:mod:`kvcodec.service.controller`) then decides per chunk between
loading and recomputing from the measured fetch bandwidth, decode speed per
level and the engine's own prefill speed; the leading run of LOAD_KV decisions
is reported to vLLM as external hits. Each step, :meth:`SchedulerSide.build`
lists the loads and the newly completed chunks to save.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kvcodec.client.vllm.backend import ChunkBackend, open_backend
from kvcodec.client.vllm.estimates import Estimates
from kvcodec.client.vllm.identity import chunk_keys
from kvcodec.client.vllm.metadata import LoadItem, SaveItem, StepMetadata, WorkerMeasurements
from kvcodec.client.vllm.settings import CHUNK_TOKENS, ConnectorSettings
from kvcodec.service import controller as ctl
from kvcodec.store.keys import ChunkKey, ModelLayout

__all__ = ["SchedulerSide"]

log = logging.getLogger("kvcodec.vllm")


@dataclass
class Tracked:
    """What the scheduler keeps per request."""

    prompt: list[int]
    salt: str
    lookup: Future | None = None
    lookup_started: float = 0.0
    present: list[dict[str, tuple[ChunkKey, int]]] | None = None
    decision: tuple[int, list[ChunkKey]] | None = None  # (num_computed it was made for, keys)
    block_ids: list[int] = field(default_factory=list)
    next_save: int = 0
    save_keys: list[ChunkKey] | None = None
    counted: bool = False

    @property
    def stored_chunks(self) -> int:
        """Leading chunks present at some level (no need to save them)."""
        count = 0
        for copies in self.present or []:
            if not copies:
                break
            count += 1
        return count


class SchedulerSide:
    """Scheduler-side state and decisions (one per engine).

    Args:
        settings: connector settings.
        layout: model identity and KV layout (keys).
        backend: where chunks live (default: opened from the settings on first use).
    """

    def __init__(self, settings: ConnectorSettings, layout: ModelLayout,
                 backend: ChunkBackend | None = None) -> None:
        self.settings, self.layout = settings, layout
        self._backend = backend
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvcodec-lookup")
        self._requests: dict[str, Tracked] = {}
        self._allocated: dict[str, LoadItem] = {}
        self._counts: Counter[str] = Counter()
        self._logged: set[str] = set()
        self.estimates = Estimates(settings, layout)
        self.last_plan: ctl.PlanResult | None = None

    # ------------------------------------------------------------- lookup
    def matched_tokens(self, request: Any, num_computed: int) -> tuple[int | None, bool]:
        """vLLM's get_num_new_matched_tokens: tokens to load beyond ``num_computed``,
        None while the lookup is still running."""
        tracked = self._track(request)
        if not self.settings.load or len(tracked.prompt) < CHUNK_TOKENS:
            return 0, False
        if tracked.present is None:
            if not self._lookup_done(tracked):
                return None, False
        keys = self._decide(tracked, num_computed)
        hit = min(len(keys) * CHUNK_TOKENS, len(tracked.prompt) - 1)
        external = max(hit - num_computed, 0)
        tracked.decision = (num_computed, keys) if external else None
        return external, False

    def _track(self, request: Any) -> Tracked:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            salt = getattr(request, "cache_salt", None) or ""
            tracked = Tracked(list(request.prompt_token_ids or []), salt)
            self._requests[request.request_id] = tracked
        return tracked

    def _lookup_done(self, tracked: Tracked) -> bool:
        """Start or poll the lookup; True once ``tracked.present`` is known."""
        if tracked.lookup is None:
            tracked.lookup_started = time.monotonic()
            tracked.lookup = self._pool.submit(self._lookup, tracked.prompt, tracked.salt)
            return False
        if not tracked.lookup.done():
            if time.monotonic() - tracked.lookup_started < self.settings.lookup_timeout_s:
                return False
            self._counts["lookup_timeouts"] += 1
            self._once("lookup_timeout", f"kvcodec: a lookup took over "
                       f"{self.settings.lookup_timeout_s} s; such requests are recomputed")
            tracked.present = []
            return True
        try:
            tracked.present = tracked.lookup.result()
        except Exception as exc:  # an unreachable backend is a miss
            self._counts["lookup_errors"] += 1
            self._once("lookup_error", f"kvcodec: lookup failed ({type(exc).__name__}: {exc}); "
                       "requests are recomputed while it fails (counted, logged once)")
            tracked.present = []
        found = tracked.stored_chunks
        self._counts["lookup_chunks"] += len(tracked.prompt) // CHUNK_TOKENS
        self._counts["lookup_hits"] += found
        return True

    def backend(self) -> ChunkBackend:
        """The backend (opened on the lookup thread the first time)."""
        if self._backend is None:
            self._backend = open_backend(self.settings, self.layout)
        return self._backend

    def _lookup(self, prompt: list[int], salt: str) -> list[dict[str, tuple[ChunkKey, int]]]:
        """Per full chunk: level -> (key, stored bytes) of the copies present. One batched call."""
        backend = self.backend()
        tenant = backend.key_tenant(salt)
        per_level = {lv: chunk_keys(self.layout, lv, tenant, prompt)
                     for lv in self.settings.levels_to_load}
        flat = [k for keys in per_level.values() for k in keys]
        sizes = backend.sizes(flat, salt)
        present: list[dict[str, tuple[ChunkKey, int]]] = [
            {} for _ in range(len(prompt) // CHUNK_TOKENS)]
        for key, size in zip(flat, sizes):
            if size is not None:
                present[key.index][key.spec.codec_profile] = (key, size)
        return present

    # ----------------------------------------------------------- decision
    def _decide(self, tracked: Tracked, num_computed: int) -> list[ChunkKey]:
        """Keys of the leading chunks to load, as the controller decides."""
        inputs = []
        for index, copies in enumerate(tracked.present or []):
            if not copies:
                break
            inputs.append(ctl.ChunkInput(index, CHUNK_TOKENS, tuple(
                ctl.StoredCopy(level, key.hex, size or self.estimates.chunk_bytes(level))
                for level, (key, size) in copies.items())))
        if not inputs:
            return []
        if not self.settings.controller:
            best = max(inputs[0].exact, key=lambda c: ctl.QUALITY_RANK[c.level]).level
            return [tracked.present[i][best][0] for i in range(len(inputs))
                    if best in tracked.present[i]]
        result = ctl.plan(inputs, self.estimates.measurements(), self.settings.floor,
                          allow_blend=False)
        self.last_plan = result
        log.info("kvcodec: %d of %d chunks stored; %s", len(inputs),
                 len(tracked.prompt) // CHUNK_TOKENS, result.explanation)
        keys: list[ChunkKey] = []
        for decision in result.decisions:
            if decision.action != ctl.LOAD_KV:
                break
            keys.append(tracked.present[decision.index][decision.level][0])
        return keys

    def after_alloc(self, request: Any, num_external: int) -> None:
        """vLLM's update_state_after_alloc: remember the load to hand to the workers."""
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            return
        wanted: list[ChunkKey] = []
        if num_external > 0 and tracked.decision is not None:
            start, keys = tracked.decision
            stop = start + num_external
            first, last = start // CHUNK_TOKENS, (stop - 1) // CHUNK_TOKENS
            wanted = [k for k in keys if first <= k.index <= last]
            self._allocated[request.request_id] = LoadItem(request.request_id, wanted, start,
                                                           stop, [], tracked.salt)
        tracked.decision = None
        if not tracked.counted and tracked.present is not None:
            tracked.counted = True
            self._counts["decided_load_chunks"] += len(wanted)
            self._counts["decided_recompute_chunks"] += max(tracked.stored_chunks - len(wanted), 0)

    # -------------------------------------------------------------- steps
    def build(self, so: Any) -> StepMetadata:
        """vLLM's build_connector_meta: this step's loads and saves."""
        meta = StepMetadata(scheduled_tokens=int(so.total_num_scheduled_tokens))
        for new in so.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._add_load(meta, new.req_id, tracked)
            self._add_saves(meta, new.req_id, tracked, new.num_computed_tokens,
                            so.num_scheduled_tokens.get(new.req_id, 0))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                tracked.block_ids.extend(new_ids[0])
            self._add_load(meta, req_id, tracked)
            self._add_saves(meta, req_id, tracked, cached.num_computed_tokens[i],
                            so.num_scheduled_tokens.get(req_id, 0))
        for req_id in so.finished_req_ids:
            self.finished(req_id)
        meta.counts, self._counts = dict(self._counts), Counter()
        return meta

    def _add_load(self, meta: StepMetadata, req_id: str, tracked: Tracked) -> None:
        item = self._allocated.pop(req_id, None)
        if item is not None and item.keys:
            item.block_ids = list(tracked.block_ids)
            meta.loads.append(item)

    def _add_saves(self, meta: StepMetadata, req_id: str, tracked: Tracked, num_computed: int,
                   num_scheduled: int) -> None:
        if not self.settings.save:
            return
        end = min(num_computed + num_scheduled, len(tracked.prompt))
        complete = end // CHUNK_TOKENS
        if complete <= tracked.next_save:
            return
        if tracked.save_keys is None:
            tenant = self.backend().key_tenant(tracked.salt)
            tracked.save_keys = chunk_keys(self.layout, self.settings.level, tenant, tracked.prompt)
        stored = tracked.stored_chunks
        for index in range(tracked.next_save, complete):
            if index < stored:
                continue
            stop = (index + 1) * CHUNK_TOKENS
            meta.saves.append(SaveItem(req_id, tracked.save_keys[index], list(tracked.block_ids),
                                       tracked.prompt[:stop], tracked.salt))
        tracked.next_save = complete

    def finished(self, req_id: str) -> None:
        """Forget a request."""
        tracked = self._requests.pop(req_id, None)
        self._allocated.pop(req_id, None)
        if tracked is not None and tracked.lookup is not None:
            tracked.lookup.cancel()

    def counts(self) -> dict[str, int]:
        """Counters not yet reported to the workers (lookups, hits, errors, decisions)."""
        return dict(self._counts)

    def observe(self, measured: WorkerMeasurements | None) -> None:
        """Fold the workers' measurements into the controller's estimates."""
        if measured is not None:
            self.estimates.observe(measured)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._backend is not None:
            self._backend.close()

    def _once(self, topic: str, message: str) -> None:
        if topic not in self._logged:
            self._logged.add(topic)
            log.warning(message)
