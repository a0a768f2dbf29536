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
from kvcodec.codec.sideprior import SidePrior, fit_prior, quarter_octaves
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


def test_device_encoder_writes_the_same_bytes(profiles):
    _, fitted = profiles
    keys, values = _kv(3)
    host = encode(keys, values, level="compact", model="tiny", profile=fitted)
    device = encode(keys, values, level="compact", model="tiny", profile=fitted, backend="torch")
    assert device == host


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
