"""Prediction from decoded symbols (header flag 8): exact integer arithmetic, smaller streams, the same tensors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kvcodec.client.calibrate import fit_prediction, fit_predictions
from kvcodec.codec import container, decode, decode_layer, decode_layers, encode, inspect, predict, verify
from kvcodec.codec import transform as tr
from kvcodec.codec.errors import InvalidInput, MissingProfile, UnsupportedFormat
from kvcodec.codec.profile import profile_from_json
from test_codec_transform import DIM, HEADS, INV_FREQ, LAYERS, _profile

LEVELS = ("high", "balanced", "compact")
CHANNELS = HEADS * DIM


def _kv(seed: int, tokens: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys as test_codec_transform's, each layer's partly the previous layer's; values a fixed
    linear map of the keys (before RoPE) plus noise — as in a model, where a layer's keys and
    values are projections of the same hidden states, which change little from layer to layer."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(LAYERS, HEADS, DIM, DIM, generator=gen)
    keys = torch.randn(LAYERS, HEADS, tokens, DIM, generator=gen) @ mix + 3 * torch.randn(LAYERS, HEADS, 1, DIM,
                                                                                            generator=gen)
    keys = torch.cumsum(keys, dim=0) / torch.arange(1, LAYERS + 1).sqrt()[:, None, None, None]
    maps = torch.randn(LAYERS, CHANNELS, CHANNELS, generator=torch.Generator().manual_seed(99)) / 4
    flat = keys.permute(0, 2, 1, 3).reshape(LAYERS, tokens, CHANNELS) @ maps
    values = flat.reshape(LAYERS, tokens, HEADS, DIM).permute(0, 2, 1, 3)
    values = values + 0.3 * torch.randn(LAYERS, HEADS, tokens, DIM, generator=gen)
    rope = tr.Rope(INV_FREQ)
    keys = torch.stack([tr.rotate(keys[layer], rope, 0) for layer in range(LAYERS)])
    return keys.half(), values.half()


@pytest.fixture(scope="module")
def profiles():
    """The tiny transform profile (with a measured-style allocation) without and with prediction
    fitted on other KV than the tests code."""
    plain = _profile()
    plain.allocation = {level: np.array([[1.0, 0.7], [1.3, 1.0]]) * (i + 1) for i, level in enumerate(LEVELS)}
    kvs = [_kv(1), _kv(2)]
    fitted = {}
    for level in LEVELS:
        maps, shifts = fit_prediction(plain, kvs, level)
        fitted[level] = predict.Maps(*maps, shifts)
    return plain, replace(plain, prediction=fitted)


def test_offsets_are_exact_integer_arithmetic():
    rng = np.random.default_rng(0)
    weights = rng.integers(-32767, 32768, (CHANNELS, 2 * CHANNELS)).astype(np.int16)
    qs = [rng.integers(-32767, 32768, (50, CHANNELS)) for _ in range(2)]
    p = predict.Predictor(weights, 2.0**-22)
    acc = sum(q.astype(np.int64) @ w.T.astype(np.int64) for q, w in zip(qs, np.split(weights, 2, axis=1)))  # exact
    expect = np.clip(np.rint(acc.astype(np.float64) * 2.0**-22), -predict.LIMIT, predict.LIMIT)
    assert np.array_equal(p.offsets(qs).numpy(), expect)
    assert np.array_equal(p.offsets([torch.from_numpy(q).float() for q in qs]).numpy(), expect)  # any integer dtype
    # ties round half to even: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2
    tie = predict.Predictor(np.eye(3, dtype=np.int16), 0.5)
    assert tie.offsets([np.array([[5, 7, -5]])]).tolist() == [[2.0, 4.0, -2.0]]
    hdt = [torch.from_numpy(q.reshape(50, HEADS, DIM)).permute(1, 0, 2) for q in qs]
    assert np.array_equal(p.offsets_hdt(hdt).permute(1, 0, 2).reshape(50, CHANNELS).numpy(), expect)


def test_sources_are_already_decoded():
    assert predict.sources(0, False) == []
    assert predict.sources(0, True) == [(0, False)]
    assert predict.sources(3, False) == [(2, False), (2, True)]
    assert predict.sources(3, True) == [(3, False), (2, False), (2, True)]


# one float32 product (partial sums below 2**24), two (symbols split in high and low parts), float64
@pytest.mark.parametrize("peak", [255, 16383, 1 << 20])
def test_products_are_exact_whichever_arithmetic_they_use(peak):
    rng = np.random.default_rng(2)
    weights = rng.integers(-2047, 2048, (CHANNELS, CHANNELS)).astype(np.int16)
    q = rng.integers(-peak, peak + 1, (40, CHANNELS))
    q[0, 0], q[1, 1] = peak, -peak
    p = predict.Predictor(weights, 2.0**-11)
    acc = q.astype(np.int64) @ weights.T.astype(np.int64)
    assert np.array_equal(p._sums(torch.from_numpy(q), 0).numpy(), acc.astype(np.float64))
    assert (peak <= p.float32_below[0]) == (peak == 255)
    expect = np.clip(np.rint(acc.astype(np.float64) * 2.0**-11), -predict.LIMIT, predict.LIMIT)
    assert np.array_equal(p.offsets([q]).numpy(), expect)
    assert np.array_equal(p.offsets([q.astype(np.float32)]).numpy(), expect)


def test_one_float32_product_where_each_rows_own_bound_allows_it(monkeypatch):
    """A few large symbols in a coordinate the map weighs little: the crude bound (largest symbol
    times longest row) fails, each row's own bound holds, so one float32 product is used — and its
    sums are the exact ones."""
    rng = np.random.default_rng(4)
    weights = rng.integers(-2047, 2048, (CHANNELS, CHANNELS)).astype(np.int16)
    weights[:, 0] = rng.integers(-2, 3, CHANNELS)  # coordinate 0 barely weighed
    q = rng.integers(-100, 101, (40, CHANNELS))
    q[:, 0] = rng.integers(-200_000, 200_001, 40)
    p = predict.Predictor(weights, 2.0**-11)
    assert np.abs(q).max() > p.float32_below[0]
    products = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",  # the products of the 40 tokens (not the bound's)
                        lambda a, b: (a.dim() == 2 and a.shape[0] == 40 and products.append(a.dtype), real(a, b))[1])
    acc = q.astype(np.int64) @ weights.T.astype(np.int64)
    assert np.array_equal(p._sums(torch.from_numpy(q), 0).numpy(), acc.astype(np.float64))
    assert products == [torch.float32]
    products.clear()
    q[:, 0] *= 100  # now even each row's own bound fails: no single float32 product
    acc = q.astype(np.int64) @ weights.T.astype(np.int64)
    assert np.array_equal(p._sums(torch.from_numpy(q), 0).numpy(), acc.astype(np.float64))
    assert products != [torch.float32]


def test_float32_products_wait_for_ieee_matmul_precision():
    rng = np.random.default_rng(3)
    weights = rng.integers(-2047, 2048, (CHANNELS, CHANNELS)).astype(np.int16)
    q = rng.integers(-255, 256, (40, CHANNELS))
    expect = predict.Predictor(weights, 2.0**-11).offsets([q])
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # may allow bfloat16 products: float64 is used
        assert not tr.float32_matmul_is_ieee("cpu")
        assert torch.equal(predict.Predictor(weights, 2.0**-11).offsets([q]), expect)
    finally:
        torch.set_float32_matmul_precision(before)
    assert tr.float32_matmul_is_ieee("cpu")


def test_to_int_keeps_the_most_precision_the_bits_allow():
    maps = np.stack([np.full((2, 2), 0.3), np.array([[1e-9, -2.0], [0.0, 0.5]]), np.zeros((2, 2))])
    assert predict.to_int(maps)[1].tolist() == [12, 9, predict.MAX_SHIFT]  # 12 bits: 0.3 * 2**12 = 1229
    ints, shifts = predict.to_int(maps, bits=16)
    assert shifts.tolist() == [16, 13, predict.MAX_SHIFT]  # 0.3 * 2**16 = 19661 fits, * 2**17 does not
    assert ints[0, 0, 0] == 19661 and ints[1, 0, 1] == -16384 and ints[1, 0, 0] == 0
    assert not ints[2].any()


def test_fit_recovers_a_linear_relation():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(6, 6))
    blocks = []
    for _ in range(4):
        b = rng.normal(size=(2, 2, 100, 6)) * 50 + rng.normal(size=(2, 2, 1, 6)) * 100  # a per-block mean too
        b[0, 1] = b[0, 0] @ truth.T + 7.0  # layer 0's values: a map of its keys
        blocks.append(b)
    keys, values = predict.fit_maps(blocks)
    assert keys.shape == (2, 6, 12) and values.shape == (2, 6, 18)
    assert not keys[0].any() and not values[0, :, 6:].any()  # what layer 0 has no source for
    assert np.allclose(values[0, :, :6], truth, rtol=3e-3, atol=1e-3)  # the ridge shrinks by ~0.1%


@pytest.mark.parametrize("level", LEVELS)
def test_prediction_shrinks_the_stream_and_changes_no_tensor(profiles, level):
    plain, pred = profiles
    keys, values = _kv(0)
    a, b = (encode(keys, values, level=level, model="tiny", profile=p) for p in profiles)
    assert [container.parse(x).header.predicted_values for x in (a, b)] == [False, True]
    assert len(b) < 0.85 * len(a)
    # the device encoder (torch on the CPU here) writes the same bytes
    assert encode(keys, values, level=level, model="tiny", profile=pred, backend="torch") == b
    da, db = decode(a, profile=plain), decode(b, profile=pred)
    assert torch.equal(da.keys, db.keys) and torch.equal(da.values, db.values)
    # every decoding entry point, CPU kernels and torch alike, predicts the same values
    for kv in (decode(b, profile=pred, threads=2), decode(b, profile=pred, backend="torch"),
               decode(b, profile=pred, dtype=torch.float32, threads=2)):
        assert torch.equal(kv.values.to(db.values.dtype), db.values)
    for backend, extra in (("numba", {"threads": 2}), ("torch", {"batch_layers": 1})):
        for layer, k, v in decode_layers(b, profile=pred, backend=backend, **extra):
            assert torch.equal(k, db.keys[layer]) and torch.equal(v, db.values[layer])
    assert torch.equal(decode_layer(b, 1, profile=pred).values, db.values[1])
    assert verify(b, profile=pred, threads=2).transform


def test_the_device_encoder_carries_the_previous_layer_between_groups(profiles, monkeypatch):
    from kvcodec.codec import device_encode

    _, pred = profiles
    keys, values = _kv(0)
    whole = encode(keys, values, level="high", model="tiny", profile=pred, backend="torch")
    monkeypatch.setattr(device_encode, "MAX_GROUP_ELEMENTS", 2 * HEADS * 300 * DIM)  # one layer per group
    assert encode(keys, values, level="high", model="tiny", profile=pred, backend="torch") == whole
    assert encode(keys, values, level="high", model="tiny", profile=pred, threads=2) == whole


def test_each_level_has_its_own_maps(profiles):
    _, pred = profiles
    assert pred.predictor("high", 0, False) is None
    for layer, is_value in ((0, True), (1, False), (1, True)):
        maps = pred.prediction["high"]
        p = pred.predictor("high", layer, is_value)
        assert p.scale == 2.0 ** -int(maps.shifts[layer, int(is_value)])
        assert p.weights.shape == (CHANNELS, CHANNELS * len(predict.sources(layer, is_value)))
    assert not np.array_equal(pred.prediction["high"].values, pred.prediction["compact"].values)


def test_a_stream_with_raw_only_blocks_and_short_blocks(profiles):
    _, pred = profiles
    keys, values = _kv(3, tokens=260)
    blob = encode(keys, values, level="balanced", model="tiny", profile=pred, token_block=1, first_position=0,
                  sink_tokens=2)
    blob2 = encode(keys, values, level="balanced", model="tiny", profile=pred, token_block=128)
    for b in (blob, blob2):
        ref = decode(b, profile=pred)
        assert torch.equal(decode(b, profile=pred, backend="torch").values, ref.values)
        verify(b, profile=pred)


def _with_flags(blob: bytes, flags: int) -> bytes:
    layout = container.parse(blob)
    header = replace(layout.header, flags=flags)
    return container.pack(header, [bytes(container.substream(blob, layout, s)) for s in range(header.n_substreams)])


def test_decoders_need_the_profiles_prediction(profiles):
    plain, pred = profiles
    keys, values = _kv(0)
    blob = encode(keys, values, level="balanced", model="tiny", profile=pred)
    with pytest.raises(MissingProfile):  # another profile (its digest differs)
        decode(blob, profile=plain)
    # a stream whose flags claim prediction that its profile does not have
    claimed = _with_flags(encode(keys, values, level="balanced", model="tiny", profile=plain),
                          container.parse(blob).header.flags)
    with pytest.raises(MissingProfile, match="no prediction for level 'balanced'"):
        decode(claimed, profile=plain)
    # the flag without the transform flag is refused by the header check
    with pytest.raises(UnsupportedFormat, match="prediction needs"):
        container.parse(_with_flags(blob, container.FLAG_PACKED_SIDE | container.FLAG_PREDICTED_VALUES))
    assert inspect(blob).transform and inspect(blob).prediction


def test_profile_json_round_trip_and_bad_fields(profiles):
    plain, pred = profiles
    body = pred.to_json()
    again = profile_from_json(json.loads(json.dumps(body)))
    assert again.digest == pred.digest and set(again.prediction) == set(LEVELS)
    for level in LEVELS:
        a, b = again.prediction[level], pred.prediction[level]
        assert np.array_equal(a.keys, b.keys) and np.array_equal(a.values, b.values)
        assert a.shifts.tolist() == b.shifts.tolist()
    assert "prediction" not in plain.to_json()  # profiles without it keep their digests

    def refused(edit, match):
        broken = json.loads(json.dumps(body))
        edit(broken["prediction"])
        broken.pop("sha256")
        from kvcodec.codec.profile import _digest
        broken["sha256"] = _digest(broken)
        with pytest.raises(InvalidInput, match=match):
            profile_from_json(broken)

    refused(lambda v: v.update(fastest=v["high"]), "'fastest': not one of")
    refused(lambda v: v["high"].update(shifts=[[0, 31], [0, 0]]), "shifts must be")
    refused(lambda v: v["high"].update(values="AAAA"), "values: 3 bytes")
    refused(lambda v: v["high"].update(keys="A=A"), "keys: not base64")
    refused(lambda v: v["high"].pop("keys"), "bad or missing field")


def test_calibration_keeps_the_maps_of_the_levels_they_shrink(profiles):
    plain, _ = profiles
    logged = []
    kept = fit_predictions(plain, [_kv(1), _kv(2)], "tiny", logged.append)
    assert set(kept) == set(LEVELS) and len(logged) == 3
    # KV whose values and layers are unrelated: nothing to predict, no maps kept
    gen = torch.Generator().manual_seed(4)
    noise = [tuple(torch.randn(LAYERS, HEADS, 300, DIM, generator=gen).half() for _ in range(2))]
    assert fit_predictions(plain, noise, "tiny", logged.append) == {}
