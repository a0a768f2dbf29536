"""The controller's decisions, table-driven: inputs -> (action, level) per chunk."""

from __future__ import annotations

import pytest

from kvcodec.service.controller import (BLEND, LOAD_KV, LOAD_TEXT, BandwidthEstimator, ChunkInput,
                                        Measurements, StoredCopy, decide_chunk, plan)

GBPS = 1e9 / 8  # bytes/s in one Gb/s
TOKENS = 256
EPT = 11_520  # SmolLM2: 2 * 30 layers * 3 heads * 64 dims
SIZES = {"lossless": 5_600_000, "high": 1_500_000, "balanced": 900_000, "compact": 600_000}
DECODE = {"lossless": 1.2e9, "high": 1e9, "balanced": 1e9, "compact": 1e9}  # GPU-class decoder


def _chunk(exact=("lossless", "high", "balanced", "compact"), free=()):
    return ChunkInput(0, TOKENS, tuple(StoredCopy(lv, f"{lv}-key", SIZES[lv]) for lv in exact),
                      tuple(StoredCopy(lv, f"pf-{lv}", SIZES[lv]) for lv in free))


def _m(gbps, prefill=2000.0, decode=None):
    return Measurements(gbps * GBPS, prefill, decode or DECODE, EPT, layers=30)


# (name, chunk, measurements, floor, allow_blend, expected (action, level))
TABLE = [
    ("fast link: lossless is free", _chunk(), _m(100), "balanced", True, (LOAD_KV, "lossless")),
    ("1 Gb/s: smallest admissible", _chunk(), _m(1), "balanced", True, (LOAD_KV, "balanced")),
    ("1 Gb/s, compact allowed", _chunk(), _m(1), "compact", True, (LOAD_KV, "compact")),
    ("floor high excludes balanced", _chunk(), _m(1), "high", True, (LOAD_KV, "high")),
    ("exact floor over slow link", _chunk(), _m(0.1), "exact", True, (LOAD_TEXT, "")),
    ("exact floor over fast link", _chunk(), _m(100), "exact", True, (LOAD_KV, "lossless")),
    ("0.1 Gb/s: recompute wins", _chunk(), _m(0.1, prefill=5000), "balanced", True, (LOAD_TEXT, "")),
    ("slow prefill: KV wins at 0.1", _chunk(), _m(0.1, prefill=200), "balanced", True,
     (LOAD_KV, "balanced")),
    ("nothing stored", _chunk(exact=()), _m(10), "compact", True, (LOAD_TEXT, "")),
    ("position-free copy: blend", _chunk(exact=(), free=("high",)), _m(10, prefill=500),
     "balanced", True, (BLEND, "high")),
    ("blend disabled", _chunk(exact=(), free=("high",)), _m(10, prefill=500), "balanced", False,
     (LOAD_TEXT, "")),
    ("blend below floor", _chunk(exact=(), free=("balanced",)), _m(10, prefill=500), "balanced",
     True, (LOAD_TEXT, "")),
    ("decode-bound tie: higher quality", _chunk(), _m(1, decode={lv: 150e6 for lv in DECODE}),
     "balanced", True, (LOAD_KV, "high")),
    ("slow decode makes text win", _chunk(), _m(100, prefill=20_000, decode={
        lv: 1e6 for lv in DECODE}), "balanced", True, (LOAD_TEXT, "")),
]


@pytest.mark.parametrize("name,chunk,m,floor,blend,expected", TABLE, ids=[t[0] for t in TABLE])
def test_decision_table(name, chunk, m, floor, blend, expected):
    d = decide_chunk(chunk, m, floor, blend)
    assert (d.action, d.level) == expected, d.reason
    assert d.reason.startswith(d.action) and "ms" in d.reason
    if d.action != LOAD_TEXT:
        assert d.expected_bytes == SIZES[d.level]
        assert d.expected_ms == pytest.approx(max(d.transfer_ms, d.decode_ms) + d.compute_ms)


def test_decision_numbers_are_explained():
    d = decide_chunk(_chunk(exact=("balanced",)), _m(1), "balanced")
    assert d.transfer_ms == pytest.approx(900_000 / GBPS * 1000)
    assert d.decode_ms == pytest.approx(TOKENS * EPT / 1e9 * 1000)
    assert "0.90 MB: transfer 7.2 ms" in d.reason and "LOAD_TEXT 128.0 ms" in d.reason


def test_plan_sums_and_budget():
    chunks = [_chunk(), _chunk(exact=())]
    result = plan(chunks, _m(1), "balanced", budget_ms=50)
    assert [d.action for d in result.decisions] == [LOAD_KV, LOAD_TEXT]
    assert result.expected_ttft_ms == pytest.approx(1.0 + sum(d.expected_ms for d in result.decisions))
    assert not result.within_budget and "over budget 50 ms" in result.explanation
    assert plan(chunks, _m(1), budget_ms=1e6).within_budget


def test_unknown_floor_is_named():
    with pytest.raises(ValueError, match="quality_floor: 'great'"):
        decide_chunk(_chunk(), _m(1), "great")


def test_bandwidth_ewma_per_client():
    est = BandwidthEstimator(default=1e8, alpha=0.5, max_clients=2)
    assert est.estimate("a") == 1e8
    est.observe("a", 10_000_000, 1.0)
    assert est.estimate("a") == 1e7
    est.observe("a", 30_000_000, 1.0)
    assert est.estimate("a") == 2e7
    est.observe("a", 1000, 1.0)  # too small to time: ignored
    assert est.estimate("a") == 2e7
    est.observe_rate("b", 5e6)
    est.observe_rate("c", 6e6)  # evicts the least recently updated ("a")
    assert est.estimate("a") == 1e8 and est.estimate("c") == 6e6


def test_stale_estimate_probes_with_one_chunk():
    clock = [0.0]
    est = BandwidthEstimator(default=1e9, stale_after_s=10, clock=lambda: clock[0])
    est.observe_rate("c", 0.1 * GBPS)  # slow link: recompute wins
    m = _m(0.1, prefill=5000)
    chunks = [_chunk(), _chunk()]
    assert [d.action for d in plan(chunks, m).decisions] == [LOAD_TEXT, LOAD_TEXT]
    assert not est.stale("c")
    clock[0] = 11.0
    assert est.stale("c")
    probing = Measurements(**{**m.__dict__, "probe": True})
    decisions = plan(chunks, probing).decisions
    assert [d.action for d in decisions] == [LOAD_KV, LOAD_TEXT]
    assert decisions[0].level == "balanced" and decisions[0].reason.startswith("probe")


def test_start_up_decode_calibration_times_the_shipped_transform_path(monkeypatch):
    """By default the server times streams coded with the shipped profile's transform (what a
    calibrated model's chunks decode through), not profile-less ones."""
    from kvcodec.codec import api, container
    from kvcodec.service.controller import calibrate_decode

    seen = []
    real = api._encode

    def spy(keys, values, *args, **kwargs):
        blob = real(keys, values, *args, **kwargs)
        seen.append((tuple(keys.shape), container.parse(blob).header.transformed))
        return blob

    monkeypatch.setattr(api, "_encode", spy)
    speeds = calibrate_decode(["balanced"], tokens=32)
    assert set(speeds) == {"balanced"} and speeds["balanced"] > 0
    assert seen == [((30, 3, 32, 64), True)]  # SmolLM2's shape, coded with its profile's transform
    plain = calibrate_decode(["compact"], tokens=32, layers=2, profile=None)
    assert plain["compact"] > 0 and seen[-1] == ((2, 3, 32, 64), False)
