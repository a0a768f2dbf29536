"""Side-information priors (header flag 4): exact predictions, smaller streams, same tensors."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kvcodec.codec import container, decode, decode_layer, decode_layers, encode, inspect, verify
from kvcodec.codec.entropy import NUM_CLASSES
from kvcodec.codec.errors import InvalidInput, UnsupportedFormat
from kvcodec.codec.profile import profile_from_json
from kvcodec.codec.entropy import scale_classes
from kvcodec.codec.sideprior import SidePrior, _histograms, choose_side, fit_prior, quarter_octaves
from kvcodec.client.calibrate import fit_side_priors
from test_codec_transform import _kv, _profile

LEVELS = ("high", "balanced", "compact")


@pytest.fixture(scope="module")
def profiles():
    """The tiny transform profile without and with priors fitted on other KV than the tests code."""
    plain = _profile()
    fitted = replace(plain, side_priors=fit_side_priors(plain, [_kv(5), _kv(6)], "tiny"))
    return plain, fitted


def test_quarter_octaves_is_round_4_log2_computed_exactly():
    x = np.random.default_rng(0).uniform(1e-6, 1e6, 200_000)
    assert np.array_equal(quarter_octaves(x), np.round(4 * np.log2(x)))
    assert quarter_octaves(np.array([1.0, 2.0, 0.5, 2**0.25, 2**-30])).tolist() == [0, 4, -4, 1, -120]
    # either side of every boundary 2**(k/4 + 1/8): the first float below rounds down, the boundary up
    for k in range(-8, 8):
        edge = np.float64(2.0 ** (k / 4 + 0.125))
        below = np.nextafter(edge, 0)
        assert quarter_octaves(np.array([below]))[0] == (k if np.log2(below) * 4 < k + 0.5 else k + 1)


def test_prediction_follows_the_steps():
    prior = SidePrior(np.array([0.5, 1.0], np.float32), np.array([10, 0, 20, NUM_CLASSES]),
                      np.array([8, -3, 100, 5]))
    cls, cen = prior.predict(np.array([0.5, 1.0], np.float32))
    assert cls.tolist() == [10, 0, 20, NUM_CLASSES] and cen.tolist() == [8, -3, 100, 5]
    cls, cen = prior.predict(np.array([1.0, 0.25], np.float32))  # head 0 one octave coarser, head 1 two finer
    assert cls.tolist() == [6, 0, 28, NUM_CLASSES]  # clipped to 0..NUM_CLASSES
    assert cen.tolist() == [4, -2, 400, 20]  # rint(8 / 2), rint(-3 / 2) = -2 (half to even)


def test_fit_prior_pools_substreams_at_the_common_steps():
    s = np.array([1.0], np.float32)
    prior = fit_prior([s, s, 2 * s], [np.array([10, 4]), np.array([12, 4]), np.array([7, 0])],
                      [np.array([6, 0]), np.array([8, 0]), np.array([2, 1])])
    assert prior.steps.tolist() == [1.0]
    assert prior.classes.tolist() == [11, 4]  # the coarser substream's classes moved up 4 quarter octaves
    assert prior.centres.tolist() == [6, 1]  # ... and its centres doubled: mean(6, 8, 4), mean(0, 0, 2)


@pytest.mark.parametrize("level", LEVELS)
def test_priors_shrink_the_side_information_and_change_no_tensor(profiles, level):
    plain, fitted = profiles
    keys, values = _kv(0)
    a = encode(keys, values, level=level, model="tiny", profile=plain)
    b = encode(keys, values, level=level, model="tiny", profile=fitted)
    assert not container.parse(a).header.predicted_side and container.parse(b).header.predicted_side
    ia, ib = inspect(a), inspect(b)
    assert ib.side_info_bytes < ia.side_info_bytes and ib.total_bytes < ia.total_bytes
    da, db = decode(a, profile=plain), decode(b, profile=fitted)
    assert torch.equal(da.keys, db.keys) and torch.equal(da.values, db.values)
    # every decoding entry point reads the flag
    torch_kv = decode(b, profile=fitted, backend="torch", threads=2)
    assert torch.equal(torch_kv.keys, db.keys) and torch.equal(torch_kv.values, db.values)
    for layer, k, v in decode_layers(b, profile=fitted, backend="torch", batch_layers=1):
        assert torch.equal(k, db.keys[layer]) and torch.equal(v, db.values[layer])
    assert torch.equal(decode_layer(b, 1, profile=fitted).values, db.values[1])
    assert verify(b, profile=fitted).transform


def test_a_wrong_prior_costs_bytes_not_correctness(profiles):
    """Garbage priors (far classes, huge centres) still code every substream exactly."""
    plain, fitted = profiles
    rng = np.random.default_rng(1)
    junk = {level: {"steps": t["steps"] * np.float32(3.0),
                     "classes": rng.integers(0, NUM_CLASSES + 1, t["classes"].shape).astype(np.uint8),
                     "centres": rng.integers(-32768, 32768, t["centres"].shape).astype(np.int16)}
            for level, t in fitted.side_priors.items()}
    bad = replace(plain, side_priors=junk)
    keys, values = _kv(2)
    blob = encode(keys, values, level="balanced", model="tiny", profile=bad)
    ref = decode(encode(keys, values, level="balanced", model="tiny", profile=plain), profile=plain)
    out = decode(blob, profile=bad)
    assert torch.equal(out.keys, ref.keys) and torch.equal(out.values, ref.values)


@pytest.mark.parametrize("token_block, sinks", [(256, 4), (16, 1), (7, 0)])
def test_device_encoder_writes_the_same_bytes(profiles, token_block, sinks):
    _, fitted = profiles
    keys, values = _kv(3)
    kw = dict(level="compact", model="tiny", profile=fitted, token_block=token_block, sink_tokens=sinks)
    host = encode(keys, values, **kw)
    device = encode(keys, values, backend="torch", **kw)
    assert device == host


def _measured_side(deltas, centers, classes, predicted):
    return np.asarray(centers, np.int64), np.asarray(classes, np.uint8), np.zeros(len(centers), np.int64)


@pytest.mark.parametrize("level", LEVELS)
def test_side_chosen_against_the_prior_shrinks_the_stream_and_changes_no_tensor(profiles, level, monkeypatch):
    import kvcodec.codec.substream as substream

    _, fitted = profiles
    keys, values = _kv(4)
    calls = []

    def spy(deltas, centers, classes, predicted):
        out = choose_side(deltas, centers, classes, predicted)
        calls.append((np.array_equal(out[0], centers), np.array_equal(out[1], classes)))
        return out

    monkeypatch.setattr(substream, "choose_side", spy)
    chosen = encode(keys, values, level=level, model="tiny", profile=fitted)
    monkeypatch.setattr(substream, "choose_side", _measured_side)
    measured = encode(keys, values, level=level, model="tiny", profile=fitted)
    assert not all(same_cen for same_cen, _ in calls) and not all(same_cls for _, same_cls in calls)
    ic, im = inspect(chosen), inspect(measured)
    assert ic.side_info_bytes < im.side_info_bytes
    # the choice minimises ideal code lengths; the coder rounds each substream to u16 words
    assert ic.total_bytes <= im.total_bytes + 2 * container.parse(chosen).header.n_substreams
    a, b = decode(chosen, profile=fitted), decode(measured, profile=fitted)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_choose_side_weighs_symbol_bits_against_side_bits():
    rng = np.random.default_rng(3)
    few = rng.laplace(0, 3, (1, 8)).round().astype(np.int64)  # 8 symbols: the side symbol dominates
    many = rng.laplace(0, 3, (1, 4096)).round().astype(np.int64)  # 4096: the symbols dominate
    for deltas, expect_prior in ((few, True), (many, False)):
        mean = np.abs(deltas).sum(axis=1)
        measured = scale_classes(mean, np.abs(deltas).max(axis=1), deltas.shape[1]).astype(np.int64)
        pred_cls, pred_cen = measured + 2, np.array([1])
        cen, cls, shift = choose_side(deltas, np.array([0]), measured, (pred_cls, pred_cen))
        assert cen[0] - shift[0] == 0  # the new centre minus the shift is the measured one: every value is kept
        assert (cls[0] == pred_cls[0]) == expect_prior, cls
    # symbols that sit as well on either centre take the predicted one (a side symbol of 0)
    halfway = np.tile([0, 1], 8)[None].astype(np.int64)
    measured = scale_classes(np.array([8]), np.array([1]), 16).astype(np.int64)
    cen, cls, shift = choose_side(halfway, np.array([0]), measured, (measured, np.array([1])))
    assert cen.tolist() == [1] and shift.tolist() == [1] and cls.tolist() == measured.tolist()
    # a channel already at the prediction is left alone; class 0 only codes all-zero channels
    zeros = np.zeros((2, 16), np.int64)
    zeros[1, 3] = 5
    cen, cls, shift = choose_side(zeros, np.array([0, 0]), np.array([0, 30]), (np.array([0, 0]), np.array([0, 0])))
    assert cls.tolist()[0] == 0 and cls[1] > 0 and shift.tolist() == [0, 0]


def test_choose_side_histograms_keep_every_symbol():
    """The per-channel histograms choose_side prices candidates on: narrow channels, channels
    with symbols beyond ±tokens (kept one by one), and enough distinct symbols to grow the buffer."""
    rng = np.random.default_rng(5)
    tokens = 64
    deltas = rng.laplace(0, 1, (40, tokens)).round().astype(np.int32)
    deltas[3, 7] = tokens + 1  # wide: kept symbol by symbol
    deltas[4, 0] = -tokens - 9
    deltas[5:25] = rng.integers(-tokens, tokens + 1, (20, tokens))  # ~50 distinct symbols each
    todo = np.array([0, 3, 4, *range(5, 25), 39], dtype=np.int64)
    values, counts, starts = _histograms(deltas, todo)
    for i, c in enumerate(todo):
        v, n = values[starts[i]:starts[i + 1]], counts[starts[i]:starts[i + 1]]
        assert sorted(np.repeat(v, n).tolist()) == sorted(deltas[c].tolist()), c


def test_priors_survive_the_file_and_bad_ones_are_named(profiles, tmp_path):
    _, fitted = profiles
    body = json.loads(json.dumps(fitted.to_json()))
    back = profile_from_json(body)
    assert back.digest == fitted.digest
    for level in LEVELS:
        for name in ("steps", "classes", "centres"):
            assert np.array_equal(back.side_priors[level][name], fitted.side_priors[level][name])

    def broken(edit) -> str:
        spoiled = json.loads(json.dumps(body))
        edit(spoiled)
        spoiled["sha256"] = None
        spoiled["sha256"] = profile_from_json.__globals__["_digest"](spoiled)
        with pytest.raises(InvalidInput) as err:
            profile_from_json(spoiled, "p.json")
        return str(err.value)

    def b64(a) -> str:
        return base64.b64encode(np.asarray(a).tobytes()).decode()

    assert "side_priors 'high': classes: 3 bytes" in broken(
        lambda b: b["side_priors"]["high"].update(classes=b64(np.zeros(3, np.uint8))))
    assert "side_priors 'high': steps: not base64" in broken(
        lambda b: b["side_priors"]["high"].update(steps="@@"))
    assert "classes must be 0..107" in broken(lambda b: b["side_priors"]["high"].update(
        classes=b64(np.full(fitted.side_priors["high"]["classes"].shape, 200, np.uint8))))
    assert "steps must be positive" in broken(lambda b: b["side_priors"]["high"].update(
        steps=b64(np.zeros(fitted.side_priors["high"]["steps"].shape, "<f4"))))
    assert "needs exactly the fields" in broken(lambda b: b["side_priors"]["high"].pop("centres"))
    assert "side_priors need a transform" in broken(lambda b: b.pop("transform"))


def test_header_flag_4_needs_the_packed_and_transform_flags(profiles):
    _, fitted = profiles
    keys, values = _kv(0)
    blob = bytearray(encode(keys, values, level="balanced", model="tiny", profile=fitted))
    layout = container.parse(bytes(blob))
    header = replace(layout.header, flags=container.FLAG_PACKED_SIDE | container.FLAG_PREDICTED_SIDE)
    bad = container.pack(header, [bytes(container.substream(bytes(blob), layout, s))
                                  for s in range(header.n_substreams)])
    with pytest.raises(UnsupportedFormat, match="predicted side information needs"):
        container.parse(bad)
