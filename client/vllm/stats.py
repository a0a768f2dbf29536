"""The connector's metrics through vLLM: connector stats (logged by the engine) and Prometheus.

Workers report counters and latencies each step (:class:`KVCodecStats`); vLLM
aggregates them, logs ``KV Transfer metrics: ...`` with :meth:`KVCodecStats.reduce`,
and feeds :class:`KVCodecPromMetrics`, which exports them on ``vllm serve``'s
``/metrics`` as ``kvcodec_vllm_*``:

=====================================  ===============================================
``kvcodec_vllm_chunks_total{event}``   loaded, missing, corrupt, unreachable, saved,
                                       save_existing, save_dropped, save_failed
``kvcodec_vllm_lookup_chunks_total``   chunks looked up (``{result}``: hit or miss)
``kvcodec_vllm_decisions_total``       chunks the controller chose to load or recompute
``kvcodec_vllm_tokens_total{event}``   tokens loaded, tokens recomputed after a failed load
``kvcodec_vllm_bytes_total{direction}`` bytes loaded, bytes saved
``kvcodec_vllm_load_seconds``          histogram: one request's fetch + decode + scatter
``kvcodec_vllm_save_seconds``          histogram: one chunk's encode + store
=====================================  ===============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)

__all__ = ["KVCodecStats", "KVCodecPromMetrics"]

_LISTS = ("load_seconds", "save_seconds")
_CHUNK_EVENTS = {"chunks_loaded": "loaded", "chunks_missing": "missing",
                 "chunks_corrupt": "corrupt", "chunks_unreachable": "unreachable",
                 "save_saved": "saved", "save_existing": "save_existing",
                 "save_dropped": "save_dropped", "save_failed": "save_failed"}
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class KVCodecStats(KVConnectorStats):
    """Counters (``name -> int``) and latency lists (``load_seconds``, ``save_seconds``)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if name in _LISTS:
                self.data[name] = list(self.data.get(name, [])) + list(value)
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: v for k, v in sorted(self.data.items())
                                       if k not in _LISTS and v}
        for name in _LISTS:
            values = sorted(self.data.get(name, []))
            if values:
                out[f"{name}_median_ms"] = round(1000 * values[len(values) // 2], 1)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in self.data)


class KVCodecPromMetrics(KVConnectorPromMetrics):
    """Prometheus series for :class:`KVCodecStats` (created per engine)."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter, hist = self._counter_cls, self._histogram_cls
        self._chunks = counter(name="kvcodec_vllm_chunks_total",
                               documentation="Chunks by what happened to them",
                               labelnames=labelnames + ["event"])
        self._lookups = counter(name="kvcodec_vllm_lookup_chunks_total",
                                documentation="Chunks looked up, by result",
                                labelnames=labelnames + ["result"])
        self._decisions = counter(name="kvcodec_vllm_decisions_total",
                                  documentation="Chunks the controller chose to load or recompute",
                                  labelnames=labelnames + ["action"])
        self._tokens = counter(name="kvcodec_vllm_tokens_total",
                               documentation="Tokens loaded, or recomputed after a failed load",
                               labelnames=labelnames + ["event"])
        self._bytes = counter(name="kvcodec_vllm_bytes_total",
                              documentation="Encoded bytes loaded and saved",
                              labelnames=labelnames + ["direction"])
        self._load_s = hist(name="kvcodec_vllm_load_seconds", buckets=_SECONDS_BUCKETS,
                            documentation="Time to fetch, decode and scatter one request's chunks",
                            labelnames=labelnames)
        self._save_s = hist(name="kvcodec_vllm_save_seconds", buckets=_SECONDS_BUCKETS,
                            documentation="Time to encode and store one chunk",
                            labelnames=labelnames)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        data = transfer_stats_data
        for name, event in _CHUNK_EVENTS.items():
            if data.get(name):
                self._chunks.labels(*labels, event).inc(data[name])
        hits = data.get("lookup_hits", 0)
        misses = data.get("lookup_chunks", 0) - hits
        for result, value in (("hit", hits), ("miss", misses)):
            if value > 0:
                self._lookups.labels(*labels, result).inc(value)
        for action, name in (("load", "decided_load_chunks"),
                             ("recompute", "decided_recompute_chunks")):
            if data.get(name, 0) > 0:
                self._decisions.labels(*labels, action).inc(data[name])
        for event, name in (("loaded", "tokens_loaded"), ("recomputed", "tokens_recomputed")):
            if data.get(name):
                self._tokens.labels(*labels, event).inc(data[name])
        for direction, name in (("loaded", "bytes_loaded"), ("saved", "save_bytes")):
            if data.get(name):
                self._bytes.labels(*labels, direction).inc(data[name])
        for seconds in data.get("load_seconds", []):
            self._load_s.labels(*labels).observe(seconds)
        for seconds in data.get("save_seconds", []):
            self._save_s.labels(*labels).observe(seconds)
