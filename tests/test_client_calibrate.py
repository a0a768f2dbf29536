"""`kvcodec calibrate`: measured rate-distortion allocation and the profile's allocation field."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from kvcodec.client.calibrate import RD_MULTIPLIERS, RateDistortion
from kvcodec.client.quality import QualityProbe
from kvcodec.codec import container, decode, encode
from kvcodec.codec.errors import InvalidInput
from kvcodec.codec.profile import Profile, _digest, load_profile, profile_from_json

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _curves(sensitivity: list[float]) -> RateDistortion:
    """Textbook curves: bits fall one per doubling of the step, KL grows as step**2 * sensitivity."""
    mults = np.asarray(RD_MULTIPLIERS)
    groups = len(sensitivity)
    bits = np.stack([np.full((groups, 2), 6.0 - np.log2(m)) for m in mults])
    kl = np.stack([np.asarray(sensitivity)[:, None].repeat(2, 1) * m**2 for m in mults])
    return RateDistortion(mults, bits, kl)


def test_allocation_gives_sensitive_groups_finer_steps():
    rd = _curves([1.0, 16.0, 1.0]).refined()
    alloc = rd.allocate(mu=0.5)
    assert alloc.shape == (3, 2)
    # KL = s * m^2, bits = 6 - log2 m: the optimum has m^2 * s constant, so 16x sensitivity -> step / 4
    assert alloc[0, 0] == pytest.approx(4 * alloc[1, 0])
    assert alloc[0, 0] == alloc[2, 1]
    # the slope trades rate for distortion monotonically, within the measured ladder
    assert np.all(rd.allocate(1e-9) == RD_MULTIPLIERS[0])
    assert np.all(rd.allocate(1e9) == RD_MULTIPLIERS[-1])
    assert np.all(rd.allocate(0.1) <= rd.allocate(1.0))


def test_refined_curves_pass_through_the_measured_points():
    rd = _curves([2.0, 3.0])
    fine = rd.refined(per_octave=4)
    assert len(fine.multipliers) == 4 * (len(RD_MULTIPLIERS) - 1) + 1
    at = [int(i) for i in np.flatnonzero(np.isin(fine.multipliers, rd.multipliers))]
    assert len(at) == len(RD_MULTIPLIERS)
    np.testing.assert_allclose(fine.bits[at], rd.bits)
    np.testing.assert_allclose(fine.kl[at], rd.kl)


def _profile(allocation=None) -> Profile:
    weights = np.ones((2, 2, 2))
    prof = Profile("m", 2, 2, 8, weights, {"balanced": 0.3, "compact": 0.6}, step_scale=0.5)
    if allocation is not None:
        prof.allocation = {"balanced": np.asarray(allocation, dtype=np.float64)}
    return prof


def test_allocation_scales_the_steps_and_survives_the_file(tmp_path):
    plain, alloc = _profile(), _profile([[1.0, 0.25], [2.0, 1.0]])
    np.testing.assert_allclose(alloc.steps("balanced", 0, True), plain.steps("balanced", 0, True) * 0.25)
    np.testing.assert_allclose(alloc.steps("balanced", 1, False), plain.steps("balanced", 1, False) * 2)
    np.testing.assert_allclose(alloc.steps("compact", 0, True), plain.steps("compact", 0, True))  # no allocation
    assert "allocation" not in plain.to_json()  # profiles without one keep their digest
    assert alloc.digest != plain.digest
    alloc.save(tmp_path / "a.json")
    back = load_profile(tmp_path / "a.json")
    assert back.digest == alloc.digest
    np.testing.assert_array_equal(back.allocation["balanced"], alloc.allocation["balanced"])


def test_streams_follow_the_allocation():
    """A finer multiplier on layer 0's values: more bytes there, smaller error; the rest unchanged."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 64, 8)
    plain, alloc = _profile(), _profile([[1.0, 0.25], [1.0, 1.0]])
    a, b = decode(encode(keys, values, profile=plain)), decode(encode(keys, values, profile=alloc))
    err = lambda kv: (kv.values[0].float() - values[0]).abs().max()  # noqa: E731
    assert err(b) < err(a) / 2
    assert torch.equal(a.values[1], b.values[1]) and torch.equal(a.keys, b.keys)
    assert len(encode(keys, values, profile=alloc)) > len(encode(keys, values, profile=plain))


@pytest.mark.parametrize("value, message", [
    ({"balanced": [[1.0, 1.0]]}, r"shape \(1, 2\) != \(2, 2\)"),
    ({"balanced": [[1.0, 0.0], [1.0, 1.0]]}, "must be positive"),
    ({"balanced": [["x", 1.0], [1.0, 1.0]]}, "not numbers"),
    ([1.0], "must map level names"),
])
def test_bad_allocation_is_named(value, message):
    body = copy.deepcopy(_profile().to_json())
    body.pop("sha256")
    body["allocation"] = value
    body["sha256"] = _digest(body)
    with pytest.raises(InvalidInput, match=message):
        profile_from_json(json.loads(json.dumps(body)))


def test_calibrate_measures_curves_and_allocates_on_a_model(tiny_llama):
    """The measured path end to end on a small real transformer (random weights, random tokens)."""
    from kvcodec.client.calibrate import calibrate_tokens

    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 128, (64,), generator=gen).tolist() for _ in range(2)]
    logs = []
    prof = calibrate_tokens(tiny_llama, ids, ["a", "b"], prefix_len=48, eval_len=16, transform="head",
                            fixed={"high": 0.05, "compact": 0.8}, log=logs.append)
    assert set(prof.allocation) == {"balanced"}  # fixed levels get none
    alloc = prof.allocation["balanced"]
    assert alloc.shape == (2, 2) and RD_MULTIPLIERS[0] <= alloc.min() <= alloc.max() <= RD_MULTIPLIERS[-1]
    assert prof.calibration["allocation"] == "measured" and prof.calibration["slopes"]["balanced"] > 0
    curve = [m for m in logs if "rate-distortion: step" in m]
    assert len(curve) == len(RD_MULTIPLIERS)
    rates = [float(m.split(": ")[2].split()[0]) for m in curve]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1] + 2  # bits fall as steps grow
    back = profile_from_json(json.loads(json.dumps(prof.to_json())))
    assert back.digest == prof.digest
    # each level's side-information prior, and streams coded against it
    assert set(back.side_priors) == {"high", "balanced", "compact"}
    assert np.array_equal(back.side_priors["balanced"]["classes"], prof.side_priors["balanced"]["classes"])
    k, v = QualityProbe(tiny_llama, ids[0], 48, 16).exact_kv
    assert container.parse(encode(k.half(), v.half(), level="compact", profile=back)).header.predicted_side

    # retune: the stored curves serve another floor without measuring again
    logs.clear()
    loose = calibrate_tokens(tiny_llama, ids, ["a", "b"], prefix_len=48, eval_len=16,
                             levels={"balanced": (1e3, 1.0)}, retune=back, log=logs.append)
    assert not any("rate-distortion: step" in m for m in logs)
    assert np.array_equal(loose.bases, back.bases) and np.array_equal(loose.weights, back.weights)
    assert np.all(loose.allocation["balanced"] >= alloc) and loose.allocation["balanced"].max() > alloc.max()
    assert loose.levels["high"] == 0.05 and loose.calibration["retuned_on"] == ["a", "b"]
    # a slope chosen elsewhere (e.g. by checking held-out texts) is taken as given, not searched
    pinned = calibrate_tokens(tiny_llama, ids, ["a", "b"], prefix_len=48, eval_len=16,
                              levels={}, slopes={"balanced": 1e-3}, retune=back, log=logs.append)
    curves = RateDistortion.from_json(back.calibration["rate_distortion"], 2).refined()
    assert np.array_equal(pinned.allocation["balanced"], curves.allocate(1e-3))
    assert pinned.calibration["slopes_given"] == {"balanced": 1e-3} and pinned.levels["high"] == 0.05
    keys = torch.randn(2, 2, 48, 16)
    kv = decode(encode(keys, keys, level="balanced", profile=back), profile=back)
    assert (kv.keys.float() - keys).abs().mean() < 0.5 * keys.abs().mean()


@pytest.mark.model
@pytest.mark.slow
def test_calibrate_cli_writes_a_measured_allocation(smollm2, gpl_text, tmp_path, capsys):
    """End to end on the real model with a short prefix: curves, slope bisection, a usable profile."""
    from kvcodec.cli import main

    out = tmp_path / "p.json"
    rc = main(["calibrate", "--text", str(gpl_text), "--out", str(out), "--prefix", "40", "--eval", "8",
               "--lambda", "high=0.05", "--lambda", "compact=0.8"])
    assert rc == 0
    prof = load_profile(out)
    assert set(prof.allocation) == {"balanced"}  # fixed levels get none
    alloc = prof.allocation["balanced"]
    assert alloc.shape == (prof.layers, 2)
    assert RD_MULTIPLIERS[0] <= alloc.min() and alloc.max() <= RD_MULTIPLIERS[-1]
    assert prof.calibration["allocation"] == "measured" and prof.calibration["slopes"]["balanced"] > 0
    assert "rate-distortion" in capsys.readouterr().err
    keys = torch.randn(prof.layers, prof.kv_heads, 40, prof.head_dim, dtype=torch.float16)
    kv = decode(encode(keys, keys, level="balanced", profile=prof), profile=prof)
    assert (kv.keys.float() - keys.float()).abs().mean() < 0.5 * keys.float().abs().mean()

    again = tmp_path / "q.json"
    assert main(["calibrate", "--text", str(gpl_text), "--out", str(again), "--prefix", "40", "--eval", "8",
                 "--retune", str(out), "--floor", "balanced=100,1"]) == 0
    retuned = load_profile(again)
    assert np.array_equal(retuned.bases, prof.bases) and retuned.calibration["aliases"] == []
    assert np.all(retuned.allocation["balanced"] >= alloc)


def test_streams_of_a_retired_shipped_profile_still_decode():
    """A recalibration replaces the shipped profile; streams coded with the old one (transform
    streams need it) decode by digest, and the old one is never picked for new streams."""
    from kvcodec.codec.profile import _retired_profiles, builtin_profile

    retired = _retired_profiles()
    assert retired, "the previous SmolLM2 profile ships in kvcodec/profiles/retired"
    digest, old = retired[0]
    current = builtin_profile("smollm2-135m", old.layers, old.kv_heads, old.head_dim)
    assert current is not None and current.digest != digest
    keys = torch.randn(old.layers, old.kv_heads, 8, old.head_dim, dtype=torch.float16)
    blob = encode(keys, keys, level="balanced", profile=old)
    assert decode(blob).keys.shape == keys.shape  # found by digest, no profile passed


@pytest.mark.parametrize("extra, message", [
    (["--floor", "balanced=abc"], "--floor: 'balanced=abc' is not LEVEL=PPL,AGREE"),
    (["--floor", "ultra=1,95"], "level must be one of high, balanced, compact"),
    (["--floor", "compact=1,120"], "0 < AGREE <= 100"),
    (["--retune", "NOPROFILE"], "--retune: profile: NOPROFILE: no such file"),
    (["--retune", "PLAIN"], "holds no measured rate-distortion curves"),
    (["--slope", "balanced=x"], "--slope: 'balanced=x' is not LEVEL=NUMBER"),
    (["--slope", "balanced=-1"], "--slope: 'balanced=-1': level must be one of"),
    (["--slope", "balanced=1e-4", "--allocation", "fisher"], "--slope: needs --allocation measured"),
    (["--shape-text", "NOPROFILE"], "--shape-text: NOPROFILE: no such file"),
    (["--shape-text", "GPL", "--no-shape"], "--shape-text: only shapes a new profile's keys"),
    (["--shape-text", "GPL", "--transform", "head"], "--shape-text: only shapes a new profile's keys"),
])
def test_calibrate_cli_rejects_bad_floors_and_retune_profiles(extra, message, gpl_text, tmp_path, capsys):
    from kvcodec.cli import main

    _profile().save(tmp_path / "plain.json")
    names = {"PLAIN": tmp_path / "plain.json", "NOPROFILE": tmp_path / "none.json", "GPL": gpl_text}
    extra = [str(names.get(x, x)) for x in extra]
    message = message.replace("NOPROFILE", str(tmp_path / "none.json"))
    out = tmp_path / "p.json"
    assert main(["calibrate", "--text", str(gpl_text), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_mixed_transform_decorrelates_keys_across_heads_and_values_per_head(tiny_llama):
    """``--transform mixed``: one key basis across a layer's heads, value bases per head (stored
    block-diagonally); streams round-trip with it."""
    from kvcodec.client.calibrate import calibrate_tokens
    from kvcodec.codec.transform import split_block_diagonal

    gen = torch.Generator().manual_seed(4)
    ids = [torch.randint(0, 128, (64,), generator=gen).tolist() for _ in range(2)]
    prof = calibrate_tokens(tiny_llama, ids, ["a", "b"], prefix_len=48, eval_len=16, transform="mixed",
                            fixed={"high": 0.05, "balanced": 0.2, "compact": 0.8}, log=lambda m: None)
    heads, dim = prof.kv_heads, prof.head_dim
    assert prof.bases.shape == (prof.layers, 2, 1, heads * dim, heads * dim)
    assert prof.calibration["transform"] == "mixed"
    for layer in range(prof.layers):
        assert split_block_diagonal(prof.bases[layer, 0]).shape == (1, heads * dim, heads * dim)  # keys mix heads
        assert split_block_diagonal(prof.bases[layer, 1]).shape[0] >= heads  # values do not
    k, v = QualityProbe(tiny_llama, ids[0], 48, 16).exact_kv
    blob = encode(k.half(), v.half(), level="balanced", profile=prof)
    kv = decode(blob, profile=prof)
    assert container.parse(blob).header.transformed and container.parse(blob).header.predicted_side
    assert (kv.values.float() - v).abs().mean() < 0.5 * v.abs().mean()
    assert (kv.keys.float() - k).abs().mean() < 0.5 * k.abs().mean()
    # keys are shaped by their measured gradient metric: a synthesis that is not orthonormal and
    # the encoder's inverse of it; values keep orthonormal bases (their own analysis)
    assert prof.calibration["shape"] == "keys" and prof.analysis is not None
    keys_basis = prof.bases[0, 0, 0].astype(np.float64) / 2**14
    assert not np.allclose(keys_basis @ keys_basis.T, np.eye(heads * dim), atol=1e-2)
    assert np.array_equal(prof.analysis[:, 1], prof.bases[:, 1])
    # the metric measured on other texts than the curves' gives other bases
    other = [torch.randint(0, 128, (64,), generator=gen).tolist() for _ in range(2)]
    apart = calibrate_tokens(tiny_llama, ids, ["a", "b"], prefix_len=48, eval_len=16, transform="mixed",
                             fixed={"high": 0.05}, prediction=False, shape_ids=other, shape_names=["c", "d"],
                             log=lambda m: None)
    assert apart.calibration["shape_texts"] == ["c", "d"] and prof.calibration["shape_texts"] == ["a", "b"]
    assert not np.array_equal(apart.bases[:, 0], prof.bases[:, 0])
    assert np.array_equal(apart.bases[:, 1], prof.bases[:, 1])
    plain = calibrate_tokens(tiny_llama, ids, ["a", "b"], prefix_len=48, eval_len=16, transform="mixed",
                             fixed={"high": 0.05}, shape=False, prediction=False, log=lambda m: None)
    assert plain.analysis is None and "shape" not in plain.calibration
    keys_basis = plain.bases[0, 0, 0].astype(np.float64) / 2**14
    assert np.allclose(keys_basis @ keys_basis.T, np.eye(heads * dim), atol=1e-3)
