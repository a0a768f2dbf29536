"""What the scheduler-side connector tells the workers each step, and what they tell it back.

Both cross process boundaries (vLLM pickles them), so they hold plain data:
chunk keys, block ids, token ids and counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorMetadata,
                                                               KVConnectorWorkerMetadata)

from kvcodec.store.keys import ChunkKey

__all__ = ["LoadItem", "SaveItem", "StepMetadata", "WorkerMeasurements"]


@dataclass
class LoadItem:
    """Chunks to fetch for one request and the token range they fill.

    Attributes:
        req_id: the request.
        keys: the chunks in order (each 256 tokens, at the level the controller chose).
        start / stop: tokens ``start .. stop-1`` of the request are written (the
            engine already holds ``0 .. start-1``; ``stop`` may end inside the last chunk).
        block_ids: the request's blocks.
        salt: the request's cache_salt ("" for none).
    """

    req_id: str
    keys: list[ChunkKey]
    start: int
    stop: int
    block_ids: list[int]
    salt: str = ""


@dataclass
class SaveItem:
    """One newly computed chunk to copy out of the paged cache and save.

    Attributes:
        req_id: the request.
        key: the chunk's key at the save level.
        block_ids: the request's blocks (covering the chunk).
        token_ids: the prompt from its start to the chunk's end.
        salt: the request's cache_salt ("" for none).
    """

    req_id: str
    key: ChunkKey
    block_ids: list[int]
    token_ids: list[int]
    salt: str = ""


@dataclass
class StepMetadata(KVConnectorMetadata):
    """One engine step's work for the workers, plus the scheduler's counters to report."""

    loads: list[LoadItem] = field(default_factory=list)
    saves: list[SaveItem] = field(default_factory=list)
    scheduled_tokens: int = 0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class WorkerMeasurements(KVConnectorWorkerMetadata):
    """What the workers measured this step, for the scheduler's controller.

    Attributes:
        fetch_bytes / fetch_seconds: bytes read from the backend and the time it took.
        decode: level -> [KV elements decoded, seconds].
        prefill_tokens / prefill_seconds: tokens the engine computed in steps of at least
            one chunk, and the forward time of those steps.
    """

    fetch_bytes: int = 0
    fetch_seconds: float = 0.0
    decode: dict[str, list[float]] = field(default_factory=dict)
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Sum two workers' measurements (tensor-parallel ranks time the same step: keep the slower)."""
        if not isinstance(other, WorkerMeasurements):
            return self
        decode = {k: list(v) for k, v in self.decode.items()}
        for level, (elements, seconds) in other.decode.items():
            mine = decode.setdefault(level, [0.0, 0.0])
            mine[0], mine[1] = max(mine[0], elements), max(mine[1], seconds)
        return WorkerMeasurements(max(self.fetch_bytes, other.fetch_bytes),
                                  max(self.fetch_seconds, other.fetch_seconds), decode,
                                  max(self.prefill_tokens, other.prefill_tokens),
                                  max(self.prefill_seconds, other.prefill_seconds))

    def is_empty(self) -> bool:
        return not (self.fetch_bytes or self.decode or self.prefill_tokens)
