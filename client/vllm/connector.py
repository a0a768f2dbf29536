"""``KVCodecConnector``: kvcodec as a vLLM KV connector (API v1).

Load it with::

    --kv-transfer-config '{"kv_connector": "KVCodecConnector",
                           "kv_connector_module_path": "kvcodec.client.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"store": "redis://10.0.0.5:6379/0"}}'

or ``vllm.LLM(..., kv_transfer_config=KVTransferConfig(...))`` with the same
fields. The scheduler role lives in :mod:`kvcodec.client.vllm.scheduler`, the
worker role in :mod:`kvcodec.client.vllm.worker`; settings in
:mod:`kvcodec.client.vllm.settings`. A load that fails is recomputed: the
connector sets vLLM's ``kv_load_failure_policy`` to ``"recompute"`` (a cache
miss must never fail a request).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from kvcodec.client.vllm.identity import engine_layout
from kvcodec.client.vllm.metadata import StepMetadata, WorkerMeasurements
from kvcodec.client.vllm.settings import ConnectorSettings
from kvcodec.client.vllm.stats import KVCodecPromMetrics, KVCodecStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput

__all__ = ["KVCodecConnector"]

log = logging.getLogger("kvcodec.vllm")


class KVCodecConnector(KVConnectorBase_V1):
    """vLLM KV connector over kvcodec's codec, chunk stores and cache server.

    Args:
        vllm_config: the engine configuration (``kv_transfer_config`` included).
        role: scheduler or worker.
        kv_cache_config: the engine's KV cache configuration.

    Raises:
        ConnectorConfigError: bad ``kv_connector_extra_config`` or an engine setup
            kvcodec cannot serve (quantized KV cache, unknown paged layout).
    """

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _log_like_vllm()
        settings = ConnectorSettings.from_extra_config(
            self._kv_transfer_config.kv_connector_extra_config)
        layout = engine_layout(vllm_config, settings)
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        self.settings, self.layout = settings, layout
        self._scheduler = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from kvcodec.client.vllm.scheduler import SchedulerSide

            self._scheduler = SchedulerSide(settings, layout)
            log.info("kvcodec connector: %s, level %s, keys for %s (%s, fingerprint %.12s…)",
                     settings.server or settings.store or "default local store", settings.level,
                     layout.model, layout.dtype, layout.model_fingerprint)
        else:
            from kvcodec.client.vllm.worker import WorkerSide

            _quiet_thread_warnings()
            self._worker = WorkerSide(settings, layout, vllm_config.cache_config.block_size)

    # ---------------------------------------------------------- scheduler
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        measured = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(measured, WorkerMeasurements):
            self._scheduler.observe(measured)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._scheduler.finished(request.request_id)
        return False, None

    # ------------------------------------------------------------- worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            self._worker.start_step()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, StepMetadata):
            self._worker.load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, StepMetadata):
            self._worker.save_layer(layer_name, kv_layer, meta)

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, StepMetadata):
                self._worker.finish_step(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> WorkerMeasurements | None:
        return self._worker.take_measurements() if self._worker is not None else None

    def get_kv_connector_stats(self) -> KVCodecStats | None:
        if self._worker is None:
            return None
        stats = KVCodecStats(data=self._worker.take_stats())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVCodecStats:
        return KVCodecStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVCodecPromMetrics:
        return KVCodecPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()


def _log_like_vllm() -> None:
    """Send kvcodec's connector logs through vLLM's handlers (same format and level)."""
    from vllm.logger import init_logger

    ours = logging.getLogger("kvcodec.vllm")
    if ours.handlers:
        return
    theirs = init_logger("vllm")
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.getEffectiveLevel())
    ours.propagate = not theirs.handlers


def _quiet_thread_warnings() -> None:
    """vLLM's CPU worker replaces ``torch.set_num_threads`` with a warning; the codec asks
    for one thread around each encode and decode, so the warning would repeat per chunk."""
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
        lambda record: "torch.set_num_threads" not in record.getMessage())
