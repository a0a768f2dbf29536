"""The controller's inputs, measured on this engine.

Three speeds decide between loading a chunk and recomputing it
(:mod:`kvcodec.service.controller`): the backend's fetch bandwidth, the codec's
decode speed per level (both measured by the workers on every load) and the
engine's prefill speed (tokens per second of forward time in steps that
computed at least one chunk's worth of tokens). Each is an exponentially
weighted average; until a speed is measured, the settings' starting value or a
default stands in.
"""

from __future__ import annotations

import time

from kvcodec.client.vllm.metadata import WorkerMeasurements
from kvcodec.client.vllm.settings import CHUNK_TOKENS, ConnectorSettings
from kvcodec.service import controller as ctl
from kvcodec.store.keys import ModelLayout

__all__ = ["Estimates"]

DEFAULT_BANDWIDTH = 125e6  # 1 Gb/s until a fetch is measured
DEFAULT_PREFILL_TOKENS_PER_S = 1000.0
# bits per KV element of stored chunks (SmolLM2, benchmarks/RESULTS.md), for entries
# whose size the backend does not report
TYPICAL_BITS = {"lossless": 13.6, "high": 3.9, "balanced": 2.1, "compact": 1.0}
PROBE_AFTER_S = 60.0


class Estimates:
    """EWMAs of bandwidth, decode speed per level and prefill speed.

    Args:
        settings: starting values (``bandwidth_bytes_per_s``, ``prefill_tokens_per_s``).
        layout: the KV layout (elements per token).
        alpha: weight of each new measurement.
    """

    def __init__(self, settings: ConnectorSettings, layout: ModelLayout, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.elements_per_token = 2 * layout.layers * layout.kv_heads * layout.head_dim
        self.layers = layout.layers
        self.bandwidth = settings.bandwidth_bytes_per_s or DEFAULT_BANDWIDTH
        self.prefill = settings.prefill_tokens_per_s or DEFAULT_PREFILL_TOKENS_PER_S
        self.decode: dict[str, float] = {}
        self.measured_prefill = False
        self.last_fetch = 0.0

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else self.alpha * new + (1 - self.alpha) * old

    def observe(self, m: WorkerMeasurements) -> None:
        """Fold one step's measurements in."""
        if m.fetch_bytes >= 64 * 1024 and m.fetch_seconds > 0:
            self.bandwidth = self._mix(self.bandwidth if self.last_fetch else None,
                                       m.fetch_bytes / m.fetch_seconds)
            self.last_fetch = time.monotonic()
        for level, (elements, seconds) in m.decode.items():
            if elements > 0 and seconds > 0:
                self.decode[level] = self._mix(self.decode.get(level), elements / seconds)
        if m.prefill_tokens >= CHUNK_TOKENS and m.prefill_seconds > 0:
            rate = m.prefill_tokens / m.prefill_seconds
            self.prefill = self._mix(self.prefill if self.measured_prefill else None, rate)
            self.measured_prefill = True

    def chunk_bytes(self, level: str) -> int:
        """A chunk's expected stored size at ``level`` when the backend does not say."""
        return int(CHUNK_TOKENS * self.elements_per_token * TYPICAL_BITS.get(level, 16.0) / 8)

    def measurements(self) -> ctl.Measurements:
        """The controller's view now (``probe`` when no fetch was timed for a while)."""
        stale = not self.last_fetch or time.monotonic() - self.last_fetch > PROBE_AFTER_S
        return ctl.Measurements(
            bandwidth_bytes_per_s=self.bandwidth, prefill_tokens_per_s=self.prefill,
            decode_elements_per_s={**ctl.DEFAULT_DECODE_ELEMENTS_PER_S, **self.decode},
            elements_per_token=self.elements_per_token, layers=self.layers, rtt_ms=0.0,
            probe=stale)

    def snapshot(self) -> dict[str, object]:
        """The current estimates, for logs and benchmarks."""
        return {"bandwidth_bytes_per_s": self.bandwidth, "prefill_tokens_per_s": self.prefill,
                "decode_elements_per_s": dict(self.decode)}
