"""Transform coding: exact integer arithmetic, round trips, and the profile a stream needs."""

from __future__ import annotations

import copy
from decimal import Decimal

import numpy as np
import pytest
import torch

from kvcodec.codec import decode, decode_layer, decode_layers, encode, inspect, substream, verify
from kvcodec.codec import transform as tr
from kvcodec.codec.errors import InvalidInput, MissingProfile, UnsupportedFormat
from kvcodec.codec.profile import Profile, load_profile, profile_from_json

from _codec_fixtures import plain_part

LAYERS, HEADS, TOKENS, DIM = 2, 2, 300, 8
INV_FREQ = (1.0 / 10000 ** (np.arange(0, DIM, 2) / DIM)).astype(np.float32)


def _kv(seed: int = 0, tokens: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated channels, per-channel offsets, keys rotated by RoPE (like a real cache)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(LAYERS, HEADS, DIM, DIM, generator=gen)
    base = torch.randn(LAYERS, HEADS, tokens, DIM, generator=gen) @ mix
    keys = base + 3 * torch.randn(LAYERS, HEADS, 1, DIM, generator=gen)
    rope = tr.Rope(INV_FREQ)
    keys = torch.stack([tr.rotate(keys[layer], rope, 0) for layer in range(LAYERS)])
    values = torch.randn(LAYERS, HEADS, tokens, DIM, generator=gen) @ mix * 0.5
    return keys.half(), values.half()


def _profile(group: int = DIM) -> Profile:
    weights = np.ones((LAYERS, 2, HEADS))
    weights[:, 1] = 4.0
    prof = Profile("tiny", LAYERS, HEADS, DIM, weights, {"high": 0.05, "balanced": 0.2, "compact": 0.5})
    prof.bases = tr.fit_bases([_kv(1)], weights, group, tr.Rope(INV_FREQ))
    prof.rope_inv_freq = INV_FREQ
    return prof


@pytest.fixture(scope="module")
def profile() -> Profile:
    return _profile()


def _reference_forward(x: np.ndarray, steps: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """The same symbols with int64 numpy arithmetic (no floating-point sums at all)."""
    heads, tokens, dim = x.shape
    scale = (np.float32(tr.SUBSTEPS) / steps).astype(np.float32)
    snapped = np.rint((x * scale[:, None, None]).astype(np.float32)).astype(np.int64)
    v = snapped.transpose(1, 0, 2).reshape(tokens, *basis.shape[:2])
    y = np.einsum("tgi,gji->tgj", v, basis.astype(np.int64))
    d = tr.SUBSTEPS << tr.SCALE_BITS
    q = np.floor_divide(2 * y + d, 2 * d)  # round half up, exact
    return q.reshape(tokens, heads, dim).transpose(1, 0, 2)


@pytest.mark.parametrize("group", [DIM, HEADS * DIM])
def test_forward_and_inverse_are_exact_integer_arithmetic(group):
    prof = _profile(group)
    t = prof.transform(0, False)
    x = t.prepare(_kv(2)[0][0].float(), 0)
    steps = np.array([0.07, 0.3], dtype=np.float32)
    q = t.forward(x, steps)
    assert np.array_equal(q.numpy(), _reference_forward(x.numpy(), steps, t.basis))
    # inverse: the integer product is exact, then one float64 multiply and one rounding
    acc = np.einsum("tgj,gji->tgi", q.numpy().transpose(1, 0, 2).reshape(TOKENS, *t.basis.shape[:2]).astype(np.int64),
                    t.basis.astype(np.int64)).reshape(TOKENS, HEADS, DIM).transpose(1, 0, 2)
    expect = (acc * (steps.astype(np.float64) * 2.0**-tr.SCALE_BITS)[:, None, None]).astype(np.float32)
    got = tr.Transform(t.basis).inverse(q, steps, 0)  # without RoPE: compare before rotation
    assert np.array_equal(got.numpy(), expect)


def test_symbols_do_not_depend_on_threads_or_token_order(profile):
    t = profile.transform(1, False)
    x = t.prepare(_kv(3)[0][1].float(), 0)
    steps = np.array([0.05, 0.11], dtype=np.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = t.forward(x, steps)
        torch.set_num_threads(max(2, before))
        many = t.forward(x, steps)
    finally:
        torch.set_num_threads(before)
    perm = torch.randperm(TOKENS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, many)
    assert torch.equal(t.forward(x[:, perm], steps), one[:, perm])


def test_rope_tables_are_correctly_rounded():
    angles = np.array([0.0, 1e-8, 0.5, 1.0, 3.0, 1234.5678, 2.0**20 + 0.25])
    cos, sin = tr._cos_sin_f32(angles)
    for a, c, s in zip(angles, cos, sin):
        exact_c, exact_s = tr._dcos(float(a)), tr._dsin(float(a))
        for got, exact in ((c, exact_c), (s, exact_s)):
            # the float32 nearest to the 40-digit value: no other float32 is closer
            err = abs(Decimal(float(got)) - exact)
            for other in (np.nextafter(got, np.float32(np.inf)), np.nextafter(got, np.float32(-np.inf))):
                assert err <= abs(Decimal(float(other)) - exact)


def test_unrotate_inverts_rotate():
    x = torch.randn(2, 50, DIM)
    rope = tr.Rope(INV_FREQ)
    back = tr.unrotate(tr.rotate(x, rope, 1000), rope, 1000)
    assert torch.allclose(back, x, atol=1e-5)


@pytest.mark.parametrize("level", ["high", "balanced", "compact"])
def test_round_trip_smaller_and_as_accurate(profile, level):
    keys, values = _kv(4)
    plain = Profile(profile.model, LAYERS, HEADS, DIM, profile.weights, dict(profile.levels))
    a = encode(keys, values, level=level, model="tiny", profile=plain)
    b = encode(keys, values, level=level, model="tiny", profile=profile)
    assert inspect(b).transform and not inspect(a).transform
    assert len(b) < len(a)
    kv_a, kv_b = decode(a), decode(b, profile=profile)
    for exact, x, y in ((keys, kv_a.keys, kv_b.keys), (values, kv_a.values, kv_b.values)):
        err_a = (x.float() - exact.float()).pow(2).mean()
        err_b = (y.float() - exact.float()).pow(2).mean()
        assert err_b < 1.5 * err_a
    assert torch.equal(kv_b.keys[:, :, 0], keys[:, :, 0])  # the sink token is stored raw


def test_every_decoder_gives_the_same_tensors(profile):
    keys, values = _kv(5)
    blob = encode(keys, values, model="tiny", profile=profile, first_position=0, token_block=128)
    ref = decode(blob, profile=profile)
    assert torch.equal(decode(blob, profile=profile, threads=2).keys, ref.keys)
    torch_kv = decode(blob, profile=profile, backend="torch")
    assert torch.equal(torch_kv.keys, ref.keys) and torch.equal(torch_kv.values, ref.values)
    for layer, k, v in decode_layers(blob, profile=profile, backend="torch", batch_layers=1):
        assert torch.equal(k, ref.keys[layer]) and torch.equal(v, ref.values[layer])
    one = decode_layer(blob, 1, profile=profile)
    assert torch.equal(one.values, ref.values[1])
    assert verify(blob, profile=profile).transform


def test_positions_matter_and_are_recorded(profile):
    keys, values = _kv(6)
    at0 = encode(keys, values, model="tiny", profile=profile, first_position=0)
    at9 = encode(keys, values, model="tiny", profile=profile, first_position=9)
    assert at0 != at9
    for blob in (at0, at9):  # keys re-rotated at the wrong positions would be far off
        err = (decode(blob, profile=profile).keys[:, :, 1:].float() - keys[:, :, 1:].float()).abs().mean()
        assert err < 0.25 * keys.float().abs().mean()
    with pytest.raises(InvalidInput, match="first_position"):
        encode(keys, values, model="tiny", profile=profile, first_position=(1 << 28))


def test_missing_or_wrong_profile_is_a_clear_error(profile, tmp_path):
    keys, values = _kv(7)
    blob = encode(keys, values, model="tiny", profile=profile)
    with pytest.raises(MissingProfile, match="neither shipped nor in .KVCODEC_PROFILE_PATH.*--profile"):
        decode(blob)
    other = copy.deepcopy(profile)
    other.levels["balanced"] = 0.21
    with pytest.raises(MissingProfile, match="given profile"):
        decode(blob, profile=other)
    path = tmp_path / "tiny.json"
    profile.save(path)
    assert torch.equal(decode(blob, profile=str(path)).keys, decode(blob, profile=profile).keys)
    assert verify(blob, full=False).substreams == inspect(blob).substreams  # CRCs need no profile


def test_profile_file_round_trip_and_validation(profile, tmp_path):
    path = tmp_path / "p.json"
    profile.save(path)
    back = load_profile(path)
    assert back.digest == profile.digest and np.array_equal(back.bases, profile.bases)
    body = profile.to_json()
    for field, value, message in (
        ("group", 3, "group 3 does not divide"),
        ("bases", "!!!", "bad or missing field"),
        ("rope_inv_freq", [0.1], "float32 numbers"),
        ("scale_bits", 12, "scale_bits 12"),
    ):
        bad = copy.deepcopy(body)
        bad["transform"][field] = value
        bad.pop("sha256")
        bad["sha256"] = __import__("kvcodec.codec.profile", fromlist=["_digest"])._digest(bad)
        with pytest.raises(InvalidInput, match=message):
            profile_from_json(bad)


def test_header_flag_needs_a_profile_digest(profile):
    from kvcodec.codec import container

    keys, values = _kv(8)
    blob = bytearray(encode(keys, values, model="tiny", profile=profile))
    layout = container.parse(bytes(blob))
    head = container.Header(**{**layout.header.__dict__, "profile": container.NO_PROFILE})
    forged = container.pack(head, [bytes(container.substream(blob, layout, i)) for i in range(len(layout.lengths))])
    with pytest.raises(UnsupportedFormat, match="transform flag needs"):
        decode(forged)


def test_cli_decode_and_verify_take_the_profile(profile, tmp_path):
    from kvcodec.cli import main
    from kvcodec.codec.kvfile import write_kv

    keys, values = _kv(9)
    kv_path, out, prof_path = tmp_path / "kv.safetensors", tmp_path / "kv.kvc", tmp_path / "tiny.json"
    write_kv(kv_path, keys, values, model="tiny")
    profile.save(prof_path)
    assert main(["encode", str(kv_path), str(out), "--profile", str(prof_path)]) == 0
    assert main(["decode", str(out), str(tmp_path / "back.safetensors")]) == 1  # profile not shipped
    assert not (tmp_path / "back.safetensors").exists()
    assert main(["decode", str(out), str(tmp_path / "back.safetensors"), "--profile", str(prof_path)]) == 0
    assert main(["verify", str(out), "--profile", str(prof_path)]) == 0
    assert main(["verify", str(out)]) == 1


def test_profiles_in_the_search_path_are_found_by_model_and_digest(profile, tmp_path, monkeypatch):
    from kvcodec.codec.profile import PROFILE_PATH_ENV, builtin_profile

    keys, values = _kv(10)
    profile.save(tmp_path / "tiny.json")
    monkeypatch.setenv(PROFILE_PATH_ENV, str(tmp_path))
    assert builtin_profile("tiny", LAYERS, HEADS, DIM).digest == profile.digest
    blob = encode(keys, values, model="tiny")  # profile="auto" finds it by model name
    assert inspect(blob).transform and inspect(blob).profile == profile.digest.hex()
    assert torch.equal(decode(blob).keys, decode(blob, profile=profile).keys)  # ... and by digest
    monkeypatch.setenv(PROFILE_PATH_ENV, str(tmp_path / "missing"))
    with pytest.raises(InvalidInput, match="KVCODEC_PROFILE_PATH: .*missing is not a directory"):
        encode(keys, values, model="tiny")


def test_identity_basis_shortcut_gives_the_matrix_product_bits():
    """``calibrate --transform rope`` ships identity bases; their elementwise shortcut must give
    exactly what the exact matrix product gives."""
    basis = tr.identity_bases(1, HEADS * DIM, DIM)[0, 0]
    fast, slow = tr.Transform(basis, tr.Rope(INV_FREQ)), tr.Transform(basis, tr.Rope(INV_FREQ))
    slow.identity = False
    assert fast.identity
    x = fast.prepare(_kv(11)[0][0].float() * 7, 3)
    steps = np.array([0.013, 0.9], dtype=np.float32)
    q = fast.forward(x, steps)
    assert torch.equal(q, slow.forward(x, steps))
    assert torch.equal(fast.inverse(q, steps, 3), slow.inverse(q, steps, 3))


def test_block_diagonal_bases_are_applied_block_by_block_with_the_same_bits():
    """``calibrate --transform mixed`` stores per-head value bases block-diagonally in a
    layer-wide group; the transform applies the blocks alone and gets the full product's bits."""
    per_head = _profile(DIM).bases[0, 1]  # [HEADS, DIM, DIM]
    full = tr.block_diagonal(per_head, HEADS * DIM)  # [1, HEADS * DIM, HEADS * DIM]
    assert full.shape == (1, HEADS * DIM, HEADS * DIM) and np.count_nonzero(full) == np.count_nonzero(per_head)
    t = tr.Transform(full)
    assert np.array_equal(t.basis, per_head)
    assert tr.split_block_diagonal(_profile(HEADS * DIM).bases[0, 0]).shape == (1, HEADS * DIM, HEADS * DIM)
    x = _kv(4)[1][0].float() * 3
    steps = np.array([0.05, 0.2], dtype=np.float32)
    q = t.forward(x, steps)
    assert np.array_equal(q.numpy(), _reference_forward(x.numpy(), steps, full))
    acc = np.einsum("tj,ji->ti", q.numpy().transpose(1, 0, 2).reshape(TOKENS, -1).astype(np.int64),
                    full[0].astype(np.int64)).reshape(TOKENS, HEADS, DIM).transpose(1, 0, 2)
    expect = (acc * (steps.astype(np.float64) * 2.0**-tr.SCALE_BITS)[:, None, None]).astype(np.float32)
    assert np.array_equal(t.inverse(q, steps, 0).numpy(), expect)


@pytest.mark.parametrize("group", [DIM, HEADS * DIM])
def test_cpu_token_major_decode_gives_dequantize_blocks_bits(group):
    """The CPU decoder writes a transform stream's symbols token-major in float32 straight for the
    basis product (substream.decode_quantized -> Transform.inverse_into); the general path
    (integer deltas, dequantize_block, what a GPU runs) must give the same bits."""
    from kvcodec.codec import rans
    from kvcodec.codec.entropy import scale_classes
    from kvcodec.codec.quantize import dequantize_block

    t = tr.Transform(_profile(group).bases[0, 0], tr.Rope(INV_FREQ))
    rng = np.random.default_rng(group)
    tokens = 37
    d = np.round(rng.laplace(size=(HEADS * DIM, tokens)) * rng.choice([0.4, 5, 60], (HEADS * DIM, 1))).astype(np.int32)
    d[3] = 0  # class 0: the channel is its centre
    a = np.abs(d)
    classes = scale_classes(a.sum(axis=1), a.max(axis=1), tokens)
    centers = rng.integers(-40, 40, HEADS * DIM).astype(np.int32)
    steps = np.array([0.021, 0.37], dtype=np.float32)
    words, escapes = rans.encode_deltas(d, classes)
    v = (d + centers[:, None]).T.astype(np.float32)  # what the CPU decoder hands inverse_into
    deltas = rans.decode_deltas(words, escapes, classes, tokens)
    part = plain_part(steps, centers, classes, words, escapes)
    for dtype in (torch.float16, torch.float32):  # the whole CPU path
        decoded = substream.decode_quantized(part, HEADS, tokens, DIM, torch.float32, dtype, transform=t, first=5)
        want = dequantize_block(steps, centers, deltas, HEADS, DIM, dtype, transform=t, first=5)
        assert torch.equal(decoded, want), dtype
    token_major = torch.from_numpy(v.T.copy()).reshape(HEADS, DIM, tokens).permute(0, 2, 1)  # as [H, T, D]
    fast = t.inverse(token_major.to(torch.int64), steps, 5).to(torch.float16)
    general = dequantize_block(steps, centers, deltas, HEADS, DIM, torch.float16, transform=t, first=5)
    assert torch.equal(fast.view(torch.int16), general.view(torch.int16))
    # the fused CPU finish (scale, RoPE, clamp, rounding in numba) into a slice of a larger output;
    # head 1's huge step overflows float16 and is clamped as dequantize_block clamps
    big_steps = np.array([0.021, 3e3], dtype=np.float32)
    assert 0 < np.abs(v).max() <= t.float32_exact_below  # this data takes the float32 product ...
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for s in (steps, big_steps):
            want = dequantize_block(s, centers, deltas, HEADS, DIM, dtype, transform=t, first=5)
            for symbols in (v, v * 97):  # ... symbols 97x larger the float64 one
                scaled = dequantize_block(s, centers * 97, deltas * 97, HEADS, DIM, dtype, transform=t, first=5)
                big = torch.full((2, HEADS, tokens + 3, DIM), 9.0, dtype=dtype)
                t.inverse_into(symbols, s, 5, big[1, :, 2 : 2 + tokens])
                assert torch.equal(big[1, :, 2 : 2 + tokens], want if symbols is v else scaled), (dtype, s)
                assert (big[0] == 9).all() and (big[1, :, :2] == 9).all() and (big[1, :, 2 + tokens :] == 9).all()
    assert np.abs(v * 97).max() > t.float32_exact_below
    assert (dequantize_block(big_steps, centers, deltas, HEADS, DIM, torch.float16, transform=t, first=5).abs() == 65504).any()


def _shaped_profile() -> tuple[Profile, np.ndarray]:
    """A profile whose keys' basis is shaped by a metric that weighs a few key directions 30x
    (like a query distribution that looks along a few directions), values orthonormal."""
    prof = _profile(HEADS * DIM)
    channels = HEADS * DIM
    gen = np.random.default_rng(3)
    directions = np.linalg.qr(gen.standard_normal((channels, channels)))[0]
    spectrum = np.where(np.arange(channels) < 4, 30.0, 1.0)
    metric = np.stack([(directions * spectrum) @ directions.T] * LAYERS)
    keys, analysis = tr.fit_shaped_bases([_kv(1)], prof.weights, metric, 0, tr.Rope(INV_FREQ))
    prof.bases = prof.bases.copy()
    prof.bases[:, 0] = keys
    prof.analysis = prof.bases.astype(np.int32)
    prof.analysis[:, 0] = analysis
    return prof, metric


@pytest.fixture(scope="module")
def shaped():
    return _shaped_profile()


def test_shaped_basis_encodes_with_its_exact_integer_inverse(shaped):
    prof, _ = shaped
    t = prof.transform(0, False)
    basis = t.basis.astype(np.float64) / 2**tr.SCALE_BITS
    assert not np.allclose(basis @ basis.transpose(0, 2, 1), np.eye(HEADS * DIM), atol=1e-2)  # not orthonormal
    # the analysis is the inverse of the synthesis' transpose, to int16 precision
    product = (t.analysis.astype(np.float64) / 2**tr.SCALE_BITS) @ basis.transpose(0, 2, 1)
    assert np.allclose(product, np.eye(HEADS * DIM), atol=2e-3)
    x = t.prepare(_kv(2)[0][0].float(), 0)
    steps = np.array([0.07, 0.3], dtype=np.float32)
    assert np.array_equal(t.forward(x, steps).numpy(), _reference_forward(x.numpy(), steps, t.analysis))
    # the symbol bound uses the analysis matrix (its rows are longer than a unit basis's)
    assert t.step_floor_factor() > np.abs(t.basis.astype(np.int64)).sum(axis=2).max() / 2**tr.SCALE_BITS


def test_shaped_basis_moves_the_key_error_out_of_the_metric(shaped):
    """Same steps: the shaped stream's key error weighs less under the metric than the
    orthonormal one's, relative to its plain energy (the error went where the metric is small)."""
    prof, metric = shaped
    ortho = _profile(HEADS * DIM)
    keys, values = _kv(9)
    rope = tr.Rope(INV_FREQ)

    def weighted_share(p):
        k = decode(encode(keys, values, level="high", model="tiny", profile=p), profile=p).keys.float()
        out = []
        for layer in range(LAYERS):
            e = tr.unrotate(k[layer, :, 1:] - keys[layer, :, 1:].float(), rope, 1)
            e = e.permute(1, 0, 2).reshape(-1, HEADS * DIM).double().numpy()
            out.append(np.einsum("tc,cd,td->", e, metric[layer], e) / np.einsum("tc,tc->", e, e))
        return np.mean(out)

    assert weighted_share(prof) < 0.6 * weighted_share(ortho)


def test_shaped_streams_decode_the_same_on_every_decoder(shaped):
    prof, _ = shaped
    keys, values = _kv(5)
    for level in ("high", "compact"):
        blob = encode(keys, values, level=level, model="tiny", profile=prof, token_block=128)
        ref = decode(blob, profile=prof)
        assert (ref.keys[:, :, 1:].float() - keys[:, :, 1:].float()).abs().mean() < 0.25 * keys.float().abs().mean()
        assert torch.equal(decode(blob, profile=prof, threads=2).keys, ref.keys)
        torch_kv = decode(blob, profile=prof, backend="torch")
        assert torch.equal(torch_kv.keys, ref.keys) and torch.equal(torch_kv.values, ref.values)
        for layer, k, v in decode_layers(blob, profile=prof, backend="torch", batch_layers=1):
            assert torch.equal(k, ref.keys[layer]) and torch.equal(v, ref.values[layer])


def test_shaped_profile_file_round_trip_and_validation(shaped, tmp_path):
    from kvcodec.codec.profile import _digest

    prof, _ = shaped
    path = tmp_path / "shaped.json"
    prof.save(path)
    back = load_profile(path)
    assert back.digest == prof.digest and np.array_equal(back.analysis, prof.analysis)
    assert back.digest != _profile(HEADS * DIM).digest
    keys, values = _kv(6)
    blob = encode(keys, values, model="tiny", profile=prof)
    assert torch.equal(decode(blob, profile=str(path)).keys, decode(blob, profile=prof).keys)
    body = prof.to_json()
    big = np.full(prof.analysis.shape, tr.MAX_ANALYSIS, dtype="<i4")
    for value, message in (
        ("!!!", "bad or missing field"),
        (__import__("base64").b64encode(b"\0" * 8).decode(), "analysis holds 8 bytes"),
        (__import__("base64").b64encode(big.tobytes()).decode(), "analysis entries must be below"),
    ):
        bad = copy.deepcopy(body)
        bad["transform"]["analysis"] = value
        bad.pop("sha256")
        bad["sha256"] = _digest(bad)
        with pytest.raises(InvalidInput, match=message):
            profile_from_json(bad)
    with pytest.raises(InvalidInput, match="transform metric: shape"):
        tr.fit_shaped_bases([_kv(1)], prof.weights, np.ones((LAYERS, 3, 3)), 0, None)


def test_each_layer_is_coded_before_its_own_rope():
    """Keys rotated with a different RoPE base per layer (Gemma 3) round-trip with a profile that
    carries a table per layer, and code smaller than with one table for every layer (which leaves
    layer 1's per-channel offsets rotating)."""
    from dataclasses import replace

    slow = (INV_FREQ * np.float32(0.25)).astype(np.float32)
    keys, values = _kv(8)
    pre = torch.stack([tr.unrotate(keys[layer].float(), tr.Rope(INV_FREQ), 0) for layer in range(LAYERS)])
    keys = torch.stack([keys[0], tr.rotate(pre[1], tr.Rope(slow), 0).half()])  # layer 1: another base
    shared = _profile()
    per_layer = replace(shared, rope_inv_freq=np.stack([INV_FREQ, slow]))
    assert per_layer.rope(1).inv_freq is not None and np.array_equal(per_layer.rope(1).inv_freq, slow)
    assert per_layer.digest != shared.digest
    back = profile_from_json(per_layer.to_json())
    assert np.array_equal(back.rope_inv_freq, per_layer.rope_inv_freq) and back.digest == per_layer.digest
    blob = encode(keys, values, level="high", profile=back)
    err = (decode(blob, profile=back).keys.float() - keys.float()).abs().mean()
    assert err < 0.05 * keys.float().abs().mean()
    assert len(blob) < len(encode(keys, values, level="high", profile=shared))
