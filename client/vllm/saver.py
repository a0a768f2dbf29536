"""Saving newly computed chunks off the forward path.

The worker copies a finished chunk's KV out of the paged cache during the step
(a gather, microseconds per layer) and hands it to :class:`AsyncSaver`: one
background thread, at the lowest CPU priority, encodes it with the codec and
stores it. The queue is bounded; when it is full the chunk is dropped and
counted — saving never makes the engine wait.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvcodec.store.keys import ChunkKey

__all__ = ["SaveJob", "AsyncSaver"]

log = logging.getLogger("kvcodec.vllm")


@dataclass
class SaveJob:
    """One chunk to encode and store.

    Attributes:
        key: its chunk key (level and tenant included).
        keys / values: ``[layers, kv_heads, 256, head_dim]`` in the engine's KV dtype.
        token_ids: the prompt from its first token to the chunk's end.
        sink_keys: ``[layers, kv_heads, head_dim]`` keys of the prompt's first token
            (the attention sink, for the codec's patches), None for the first chunk.
        salt: the request's cache_salt ("" for none).
    """

    key: ChunkKey
    keys: torch.Tensor
    values: torch.Tensor
    token_ids: list[int]
    sink_keys: torch.Tensor | None = None
    salt: str = ""


class AsyncSaver:
    """A bounded queue and one low-priority thread that encodes and stores chunks.

    Args:
        store_chunk: ``store_chunk(job, blob) -> bool`` stores an encoded chunk.
        model: model name written into each stream.
        max_chunks: queue bound; a full queue drops new chunks.
    """

    def __init__(self, store_chunk: Callable[[SaveJob, bytes], bool], model: str,
                 max_chunks: int = 64) -> None:
        self._store_chunk, self._model = store_chunk, model
        self._queue: queue.Queue[SaveJob | None] = queue.Queue(maxsize=max_chunks)
        self._lock = threading.Lock()
        self.counts = {"queued": 0, "dropped": 0, "saved": 0, "existing": 0, "failed": 0,
                       "bytes": 0}
        self.seconds: list[float] = []
        self._logged_failure = False
        self._thread = threading.Thread(target=self._run, name="kvcodec-saver", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> bool:
        """Queue a chunk; False (and counted as dropped) when the queue is full."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count(dropped=1)
            return False
        self._count(queued=1)
        return True

    def take_stats(self) -> dict[str, Any]:
        """Counters since the last call, and the save latencies measured (seconds)."""
        with self._lock:
            counts, seconds = dict(self.counts), self.seconds
            self.counts = dict.fromkeys(self.counts, 0)
            self.seconds = []
        return {**counts, "save_seconds": seconds}

    def pending(self) -> int:
        """Chunks waiting in the queue."""
        return self._queue.qsize()

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued chunks (up to ``timeout_s``) and stop the thread."""
        deadline = time.monotonic() + timeout_s
        while self._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self._queue.put(None, timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Full:
            return
        self._thread.join(max(deadline - time.monotonic(), 0.01))

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                self.counts[name] += value

    def _run(self) -> None:
        _lowest_priority()
        while True:
            job = self._queue.get()
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                blob = self._encode(job)
                created = self._store_chunk(job, blob)
            except Exception as exc:  # a failed save is a future miss, never an engine error
                self._count(failed=1)
                if not self._logged_failure:
                    self._logged_failure = True
                    log.warning("kvcodec: saving chunk %s failed (%s: %s); further failures are "
                                "counted, not logged", job.key.hex[:12], type(exc).__name__, exc)
                continue
            with self._lock:
                self.counts["saved" if created else "existing"] += 1
                self.counts["bytes"] += len(blob) if created else 0
                self.seconds.append(time.perf_counter() - t0)

    def _encode(self, job: SaveJob) -> bytes:
        from kvcodec.codec import encode

        spec = job.key.spec
        level = spec.codec_profile if spec is not None else "balanced"
        return encode(job.keys, job.values, level=level, model=self._model,
                      first_position=job.key.token_start, sink_keys=job.sink_keys)


def _lowest_priority() -> None:
    """Run this thread (and threads it starts) at nice 19 so encoding yields to the engine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
