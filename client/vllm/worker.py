"""The worker side of the connector: load chunks into the paged cache, copy new ones out.

Loading (before the forward pass): one batched fetch per request, each stream
verified (envelope, key binding, every CRC) and decoded, then scattered into
every layer's blocks. A chunk that is missing, corrupt, of the wrong shape or
unreachable ends the load there: its blocks and the rest are reported through
``get_block_ids_with_load_errors`` and vLLM recomputes them.

Saving (during the forward pass): after each attention layer wrote its KV,
the finished chunks' slots are gathered (a copy); at the end of the step the
whole chunk goes to :class:`AsyncSaver`, which encodes and stores it on its own
thread.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any

import torch

from kvcodec.client.vllm.backend import ChunkBackend, open_backend
from kvcodec.client.vllm.metadata import LoadItem, SaveItem, StepMetadata, WorkerMeasurements
from kvcodec.client.vllm.paged import PagedLayout, gather, scatter, token_slots
from kvcodec.client.vllm.saver import AsyncSaver, SaveJob
from kvcodec.client.vllm.settings import CHUNK_TOKENS, ConnectorSettings
from kvcodec.store.keys import ModelLayout

__all__ = ["WorkerSide"]

log = logging.getLogger("kvcodec.vllm")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_order(name: str) -> int:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else 0


class WorkerSide:
    """Worker-side state (one per worker process).

    Args:
        settings: connector settings.
        layout: model identity and KV layout.
        block_size: tokens per KV block.
        backend: where chunks live (default: opened from the settings).
    """

    def __init__(self, settings: ConnectorSettings, layout: ModelLayout, block_size: int,
                 backend: ChunkBackend | None = None) -> None:
        self.settings, self.layout, self.block_size = settings, layout, block_size
        self.backend = backend or open_backend(settings, layout)
        self.saver = AsyncSaver(self._store_chunk, layout.model, settings.save_queue_chunks)
        self.layers: dict[str, tuple[int, torch.Tensor, PagedLayout]] = {}
        self.load_errors: set[int] = set()
        self.counts: Counter[str] = Counter()
        self.load_seconds: list[float] = []
        self.measured = WorkerMeasurements()
        self._gathered: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._sinks: dict[int, dict[int, torch.Tensor]] = {}
        self._step_start = self._step_load_seconds = 0.0
        self._logged: set[str] = set()

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Remember each attention layer's paged tensor and its layout, in layer order.

        Raises:
            ConnectorConfigError: the layer count or a tensor's shape does not match the model.
        """
        from kvcodec.client.vllm.errors import ConnectorConfigError

        names = sorted(kv_caches, key=_layer_order)
        if len(names) != self.layout.layers:
            raise ConnectorConfigError(f"kv caches: {len(names)} attention layers, the model "
                                       f"has {self.layout.layers}")
        for index, name in enumerate(names):
            tensor = kv_caches[name]
            paged = PagedLayout.detect(tensor, self.block_size, self.layout.kv_heads,
                                       self.layout.head_dim)
            self.layers[name] = (index, tensor, paged)

    # ------------------------------------------------------------- loading
    def load(self, meta: StepMetadata) -> None:
        """Fetch, verify, decode and scatter every load of this step (synchronously)."""
        for key, value in meta.counts.items():
            self.counts[key] += value
        for item in meta.loads:
            t0 = time.perf_counter()
            self._load_item(item)
            spent = time.perf_counter() - t0
            self.load_seconds.append(spent)
            self._step_load_seconds += spent

    def _load_item(self, item: LoadItem) -> None:
        t0 = time.perf_counter()
        try:
            blobs = self.backend.fetch(item.keys, item.salt)
        except Exception as exc:  # unreachable or slow backend: recompute
            self.counts["chunks_unreachable"] += len(item.keys)
            self._once("fetch", f"kvcodec: fetching chunks failed ({type(exc).__name__}: {exc}); "
                                "their tokens are recomputed (counted, logged once)")
            self._fail(item, item.start)
            return
        fetched = sum(len(b) for b in blobs if b is not None)
        self.measured.fetch_bytes += fetched
        self.measured.fetch_seconds += time.perf_counter() - t0
        for key, blob in zip(item.keys, blobs):
            lo = max(item.start, key.token_start)
            hi = min(item.stop, key.token_start + CHUNK_TOKENS)
            if blob is None:
                self.counts["chunks_missing"] += 1
                self._once("missing", f"kvcodec: chunk {key.hex[:12]}… was missing or failed "
                                      "verification; recomputing from there (counted, logged once)")
                self._fail(item, lo)
                return
            kv = self._decode(key, blob)
            if kv is None:
                self._fail(item, lo)
                return
            slots = token_slots(item.block_ids, self.block_size, lo, hi)
            part = slice(lo - key.token_start, hi - key.token_start)
            for _, (index, tensor, paged) in self.layers.items():
                scatter(paged, tensor, slots, kv.keys[index][:, part], kv.values[index][:, part])
            self.counts["chunks_loaded"] += 1
            self.counts["tokens_loaded"] += hi - lo
            self.counts["bytes_loaded"] += len(blob)

    def _decode(self, key: Any, blob: bytes) -> Any:
        """The decoded chunk, or None (counted) if it is corrupt or not the chunk the key names."""
        from kvcodec.codec import decode

        level = key.spec.codec_profile if key.spec is not None else ""
        t0 = time.perf_counter()
        try:
            kv = decode(blob)
        except Exception as exc:  # kvcodec's own errors: corrupt or unknown stream
            self.counts["chunks_corrupt"] += 1
            self._once("corrupt", f"kvcodec: chunk {key.hex[:12]}… did not decode ({exc}); "
                                  "recomputing (counted, logged once)")
            return None
        seconds = time.perf_counter() - t0
        want = (self.layout.layers, self.layout.kv_heads, CHUNK_TOKENS, self.layout.head_dim)
        if tuple(kv.keys.shape) != want or tuple(kv.values.shape) != want:
            self.counts["chunks_corrupt"] += 1
            self._once("shape", f"kvcodec: chunk {key.hex[:12]}… has shape "
                                f"{tuple(kv.keys.shape)}, expected {want}; recomputing")
            return None
        elements, spent = self.measured.decode.get(level, [0.0, 0.0])
        self.measured.decode[level] = [elements + 2 * kv.keys.numel(), spent + seconds]
        return kv

    def _fail(self, item: LoadItem, from_token: int) -> None:
        """Report the blocks of tokens ``from_token .. item.stop-1`` as not loaded."""
        first = from_token // self.block_size
        last = (item.stop - 1) // self.block_size
        self.load_errors.update(item.block_ids[first : last + 1])
        self.counts["tokens_recomputed"] += item.stop - from_token

    def take_load_errors(self) -> set[int]:
        """Block ids that failed to load since the last call."""
        errors, self.load_errors = self.load_errors, set()
        return errors

    # -------------------------------------------------------------- saving
    def save_layer(self, layer_name: str, kv_layer: torch.Tensor, meta: StepMetadata) -> None:
        """Copy this layer's part of every chunk finished in this step."""
        if not meta.saves or layer_name not in self.layers:
            return
        index, _, paged = self.layers[layer_name]
        for n, item in enumerate(meta.saves):
            start = item.key.token_start
            slots = token_slots(item.block_ids, self.block_size, start, start + CHUNK_TOKENS)
            keys, values = gather(paged, kv_layer, slots)
            self._gathered.setdefault(n, {})[index] = (keys, values)
            if start:
                sink_keys, _ = gather(paged, kv_layer, token_slots(item.block_ids,
                                                                   self.block_size, 0, 1))
                self._sinks.setdefault(n, {})[index] = sink_keys[:, 0]

    def start_step(self) -> None:
        """The engine bound this step's metadata: its forward pass (and loads) start now."""
        self._step_start, self._step_load_seconds = time.perf_counter(), 0.0

    def finish_step(self, meta: StepMetadata) -> None:
        """Hand finished chunks to the saver; time the step's forward pass for the prefill speed
        (vLLM starts loads before the forward pass when there are any, else after it: the
        step's time less its loads is the forward pass either way)."""
        if self._step_start and meta.scheduled_tokens >= CHUNK_TOKENS:
            forward = time.perf_counter() - self._step_start - self._step_load_seconds
            if forward > 0:
                self.measured.prefill_tokens += meta.scheduled_tokens
                self.measured.prefill_seconds += forward
        self._step_start = 0.0
        gathered, self._gathered = self._gathered, {}
        sinks, self._sinks = self._sinks, {}
        for n, item in enumerate(meta.saves):
            layers = gathered.get(n, {})
            if len(layers) != self.layout.layers:
                continue
            keys = torch.stack([layers[i][0] for i in range(len(layers))])
            values = torch.stack([layers[i][1] for i in range(len(layers))])
            sink = sinks.get(n)
            sink_keys = torch.stack([sink[i] for i in range(len(layers))]) if sink else None
            self.saver.submit(SaveJob(item.key, keys, values, item.token_ids, sink_keys,
                                      item.salt))

    def _store_chunk(self, job: SaveJob, blob: bytes) -> bool:
        return self.backend.save(job.key, blob, job.token_ids, job.salt)

    # ------------------------------------------------------------ reports
    def take_measurements(self) -> WorkerMeasurements | None:
        """This step's measurements for the scheduler (None if nothing was measured)."""
        measured, self.measured = self.measured, WorkerMeasurements()
        return None if measured.is_empty() else measured

    def take_stats(self) -> dict[str, Any]:
        """Counters and latencies since the last call (vLLM's connector stats)."""
        saver = self.saver.take_stats()
        data: dict[str, Any] = dict(self.counts)
        self.counts = Counter()
        for name in ("queued", "dropped", "saved", "existing", "failed", "bytes"):
            if saver[name]:
                data[f"save_{name}"] = saver[name]
        data["load_seconds"], self.load_seconds = self.load_seconds, []
        data["save_seconds"] = saver["save_seconds"]
        return data

    def close(self) -> None:
        self.saver.close()
        self.backend.close()

    def _once(self, topic: str, message: str) -> None:
        if topic not in self._logged:
            self._logged.add(topic)
            log.warning(message)
