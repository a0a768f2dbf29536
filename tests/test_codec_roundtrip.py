"""Round-trip properties of the codec (RELIABILITY.md case 7).

* lossless is bit-exact for every dtype, including NaN payloads, -0.0, Inf and
  subnormals (compared on the integer views);
* lossy levels reconstruct every element within ``step / 2`` (plus float32
  rounding) of the input, with ``step`` read back from the stream itself, and
  the native-dtype output is exactly the float32 reconstruction rounded;
* NaN/Inf are refused by lossy levels with an ``InvalidInput`` naming the tensor;
* ``decode_layer`` equals the slice of ``decode``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcodec.codec import container
from kvcodec.codec.api import decode, decode_layer, encode
from kvcodec.codec.errors import InvalidInput
from kvcodec.codec.levels import LEVELS
from kvcodec.codec.quantize import all_finite, block_rms, head_rms

LOSSY = [lv for lv in LEVELS if lv != "lossless"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(
    st.integers(1, 3),  # layers
    st.integers(1, 3),  # kv_heads
    st.integers(1, 37),  # tokens (1 token, not multiples of token_block)
    st.sampled_from([1, 3, 5, 8, 9]),  # head_dim, odd sizes included
)
token_blocks = st.sampled_from([1, 3, 8, 16, 256])


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Uniformly random bit patterns: NaNs with payloads, Inf, -0.0, subnormals, all of it."""
    g = torch.Generator().manual_seed(seed)
    idt = INT_VIEW[dtype]
    info = torch.iinfo(idt)
    ints = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(idt)
    return ints.view(dtype)


def kv_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int, style: str) -> torch.Tensor:
    """Finite test data in a few styles that stress the quantizer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if style == "outlier_channels":  # keys: a few channels much larger than the rest
        x[..., ::3] *= 40.0
    elif style == "constant":
        x = torch.full(shape, 1.5)
    elif style == "constant_channels":
        x = x[:, :, :1, :].expand(shape).contiguous()
    elif style == "zeros":
        x = torch.zeros(shape)
    elif style == "huge":  # near the top of the dtype's range
        x = x.sign() * torch.finfo(dtype).max * (0.5 + 0.5 * torch.rand(shape, generator=g))
    elif style == "tiny":  # subnormals of the dtype
        x = x * torch.finfo(dtype).tiny * 0.25
    elif style == "min_subnormal":  # a few ulps of the smallest subnormal: the step floor
        ulp = torch.tensor(1, dtype=INT_VIEW[dtype]).view(dtype).float()  # underflows in float32
        x = torch.randint(-3, 4, shape, generator=g).float() * ulp
    return x.to(dtype)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def substream_steps(blob: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element step sizes for keys and values, read from each substream's side info.

    Tokens a substream stores raw (the header's attention-sink ``raw_tokens``) get step 0:
    they must come back exactly.
    """
    layout = container.parse(blob)
    h = layout.header
    width = container.DTYPE_BYTES[h.dtype]
    out = [torch.zeros(h.layers, h.kv_heads, h.tokens, 1) for _ in range(2)]
    for layer in range(h.layers):
        for is_value in (False, True):
            for b in range(h.blocks_per_tensor):
                sid = h.substream_id(layer, is_value, b)
                view = container.substream(blob, layout, sid)
                n_raw = h.block_raw_tokens(b) if hasattr(h, "block_raw_tokens") else 0
                if n_raw == h.block_tokens(b):
                    continue
                pos = h.kv_heads * n_raw * h.head_dim * width
                raw = bytes(view[pos : pos + 4 * h.kv_heads])
                steps = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
                start = b * h.token_block + n_raw
                out[is_value][layer, :, start : b * h.token_block + h.block_tokens(b), 0] = steps[:, None]
    return out[0], out[1]


def check_lossy_bound(name: str, x: torch.Tensor, blob: bytes, step: torch.Tensor) -> None:
    """|x - x_hat| <= step/2 (+ float32 rounding), x_hat = the float32 reconstruction."""
    x32 = x.float()
    finfo = torch.finfo(x.dtype)
    kv32 = decode(blob, dtype=torch.float32)
    xhat = kv32.keys if name == "keys" else kv32.values
    err = (x32.double() - xhat.double()).abs()
    slack = 2.0**-22 * (x32.double().abs() + step.double())
    bound = step.double() / 2 + slack
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: error exceeds step/2 by {worst}"
    native = decode(blob)
    got = native.keys if name == "keys" else native.values
    assert got.dtype == x.dtype
    assert torch.isfinite(got).all(), f"{name}: finite input decoded to non-finite values"
    assert_bits_equal(got, xhat.clamp(finfo.min, finfo.max).to(x.dtype))


@PROPS
@given(shape=shapes, dtype=st.sampled_from(DTYPES), block=token_blocks, seed=st.integers(0, 2**31))
def test_lossless_is_bit_exact_for_any_bit_pattern(shape, dtype, block, seed):
    keys = random_bits(shape, dtype, seed)
    values = random_bits(shape, dtype, seed + 1)
    blob = encode(keys, values, level="lossless", token_block=block, model="m")
    kv = decode(blob)
    assert_bits_equal(kv.keys, keys)
    assert_bits_equal(kv.values, values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_keeps_special_values(dtype):
    fi = torch.finfo(dtype)
    idt = INT_VIEW[dtype]
    nan_payload = torch.tensor([0x7E01 if idt == torch.int16 else 0x7FC00123], dtype=idt).view(dtype)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), fi.tiny, fi.tiny / 4, -fi.tiny / 2,
         fi.max, fi.min, 1.0],
        dtype=dtype,
    )
    row = torch.cat([specials, nan_payload, -nan_payload])
    keys = row.reshape(1, 1, -1, 1).repeat(2, 1, 1, 3)
    values = keys.flip(2).contiguous()
    kv = decode(encode(keys, values, level="lossless", token_block=5))
    assert_bits_equal(kv.keys, keys)
    assert_bits_equal(kv.values, values)


@PROPS
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    level=st.sampled_from(LOSSY),
    block=token_blocks,
    seed=st.integers(0, 2**31),
    style=st.sampled_from(
        ["normal", "normal", "outlier_channels", "constant", "constant_channels", "zeros",
         "huge", "tiny", "min_subnormal"]
    ),
)
def test_lossy_error_within_half_step(shape, dtype, level, block, seed, style):
    keys = kv_values(shape, dtype, seed, style)
    values = kv_values(shape, dtype, seed + 7, "normal" if style == "huge" else style)
    blob = encode(keys, values, level=level, token_block=block)
    ksteps, vsteps = substream_steps(blob)
    assert torch.all(ksteps >= 0) and torch.all(torch.isfinite(ksteps))
    check_lossy_bound("keys", keys, blob, ksteps)
    check_lossy_bound("values", values, blob, vsteps)


def test_constant_tensor_decodes_to_itself():
    """Regression: a constant channel used to quantize to symbol 32768, whose int16
    centre wrapped to -32768 and decoded as -x (silently wrong KV)."""
    keys = torch.ones(1, 1, 4, 4)
    for level in LOSSY:
        kv = decode(encode(keys, -keys, level=level))
        assert torch.equal(kv.keys, keys), level
        assert torch.equal(kv.values, -keys), level


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", LOSSY)
def test_smallest_subnormals_round_trip(dtype, level):
    """Regression: for float32 the step floor (a fraction of absmax) underflows; the step
    must stay positive and every symbol must fit the int16 centres."""
    ulp = torch.tensor(1, dtype=INT_VIEW[dtype]).view(dtype)
    pattern = torch.tensor([3, -2, 1, 0, 3, 3, -3, 2], dtype=torch.float32)
    keys = (pattern.reshape(1, 1, 8, 1).repeat(2, 2, 1, 3) * ulp.float()).to(dtype)
    keys[:, :, :, 1] = keys[:, :, :1, 1]  # a constant channel too
    blob = encode(keys, keys.flip(2).contiguous(), level=level, sink_tokens=0)
    kv = decode(blob)
    ksteps, _ = substream_steps(blob)
    assert torch.all(ksteps > 0)
    check_lossy_bound("keys", keys, blob, ksteps)
    assert kv.keys.shape == keys.shape


def test_fp16_near_max_never_decodes_to_inf():
    """Regression: 65504 reconstructed as 65536+ in float32 used to round to fp16 Inf."""
    x = torch.tensor([65504.0, 0.0] * 10, dtype=torch.float16).reshape(1, 1, 20, 1).repeat(3, 1, 1, 2)
    for level in LOSSY:
        kv = decode(encode(x, x, level=level))
        assert torch.isfinite(kv.keys).all() and torch.isfinite(kv.values).all(), level


@pytest.mark.parametrize("level", LOSSY)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["keys", "values"])
def test_lossy_refuses_non_finite_naming_the_tensor(level, bad, which):
    good = torch.randn(1, 2, 5, 4, dtype=torch.float16)
    spoilt = good.clone()
    spoilt[0, 1, 3, 2] = bad
    keys, values = (spoilt, good) if which == "keys" else (good, spoilt)
    with pytest.raises(InvalidInput, match=rf"^{which}: 1 non-finite"):
        encode(keys, values, level=level)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_reads_the_bits_as_isfinite_does(dtype):
    info = torch.finfo(dtype)
    edge = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, info.tiny / 4, -1.5], dtype=dtype)
    assert all_finite(edge) and all_finite(edge[::2])  # subnormals and the largest values are finite
    for bad in (float("nan"), float("inf"), float("-inf"), -float("nan")):
        for at in (0, 6):
            spoilt = edge.clone()
            spoilt[at] = bad
            assert not all_finite(spoilt), (bad, at)
            assert not all_finite(spoilt.reshape(7, 1).t()) and all_finite(spoilt[1:6])
    x = torch.randn(3, 9, 5).to(dtype)
    assert all_finite(x.permute(2, 0, 1)) == bool(torch.isfinite(x).all())


def test_head_rms_on_the_cpu_matches_the_device_statistics():
    """head_rms's one-pass numba kernel gives block_rms's numbers (the device encoder's) exactly."""
    g = torch.Generator().manual_seed(1)
    wild = torch.randn(4, 256, 128, generator=g) * torch.logspace(-3, 3, 128)
    wild[1] = 0  # an all-zero head: grid 1
    wild[2, 17, 5] = 3e4  # one outlier sets the grid
    cases = [wild, torch.randn(3, 255, 64, generator=g) * 1e-40, torch.randn(2, 7, 3, generator=g) * 1e30]
    for x in cases:
        seg = torch.zeros(x.shape[1], dtype=torch.int64)
        rms, absmax = block_rms(x, seg, [x.shape[1]])
        got = head_rms(x)
        assert np.array_equal(got[0], rms[0]) and np.array_equal(got[1], absmax[0])


@pytest.mark.parametrize(
    "keys, values, field",
    [
        (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), "keys"),
        (torch.zeros(1, 1, 4, 2, dtype=torch.float64), torch.zeros(1, 1, 4, 2), "keys"),
        (torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 5, 2), "values"),
        (torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2, dtype=torch.float16), "values"),
        (torch.zeros(1, 0, 4, 2), torch.zeros(1, 0, 4, 2), "keys"),
    ],
)
def test_encode_rejects_bad_tensors(keys, values, field):
    with pytest.raises(InvalidInput, match=f"^{field}: "):
        encode(keys, values)


@pytest.mark.parametrize("kwargs, field", [
    ({"level": "ultra"}, "level"), ({"token_block": 0}, "token_block"),
    ({"token_block": 4097}, "token_block"), ({"model": "x" * 257}, "model"),
])
def test_encode_rejects_bad_options(kwargs, field):
    kv = torch.zeros(1, 1, 4, 2)
    with pytest.raises(InvalidInput, match=f"^{field}: "):
        encode(kv, kv, **kwargs)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_layer_equals_slice_of_decode(level, dtype):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 2, 11, 5, generator=g).to(dtype)
    values = torch.randn(3, 2, 11, 5, generator=g).to(dtype)
    blob = encode(keys, values, level=level, token_block=4)
    full = decode(blob)
    threaded = decode(blob, threads=2)
    for layer in range(3):
        k, v = decode_layer(blob, layer)
        assert_bits_equal(k, full.keys[layer])
        assert_bits_equal(v, full.values[layer])
    assert_bits_equal(threaded.keys, full.keys)
    assert_bits_equal(threaded.values, full.values)
    with pytest.raises(InvalidInput, match="^layer: 3"):
        decode_layer(blob, 3)


def test_header_records_model_and_first_position():
    from kvcodec.codec.api import inspect

    kv = torch.zeros(1, 1, 3, 2)
    info = inspect(encode(kv, kv, model="smöllm2", first_position=1234))
    assert info.model == "smöllm2" and info.first_position == 1234


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lossless_decode_to_another_dtype_and_verify(dtype):
    """Regression: decode(dtype=...) and verify(full=True) used to read the byte planes
    of a 2-byte lossless stream as float32 and fail with CorruptStream."""
    from kvcodec.codec.api import verify

    keys = torch.randn(2, 1, 6, 3).to(dtype)
    blob = encode(keys, keys, level="lossless", token_block=4)
    assert verify(blob, full=True).substreams == 2 * 2 * 2
    kv = decode(blob, dtype=torch.float32)
    assert kv.keys.dtype == torch.float32 and torch.equal(kv.keys, keys.float())


def test_profile_given_as_object_str_or_path(tmp_path):
    """Regression: a pathlib.Path profile raised AttributeError (not a KVCodecError)."""
    import numpy as np

    from kvcodec.codec.profile import Profile

    prof = Profile("m", 1, 2, 3, np.array([[[1.0, 4.0], [2.0, 0.5]]]), {"balanced": 0.2})
    path = tmp_path / "p.json"
    prof.save(path)
    keys = torch.randn(1, 2, 6, 3, generator=torch.Generator().manual_seed(0))
    blobs = {encode(keys, keys, level="balanced", profile=p) for p in (prof, str(path), path)}
    assert len(blobs) == 1
    assert container.parse(blobs.pop()).header.profile == prof.digest
    with pytest.raises(InvalidInput, match="^profile: expected a Profile"):
        encode(keys, keys, profile=42)
    with pytest.raises(InvalidInput, match="^profile: m is for 1 layers"):
        encode(keys.repeat(2, 1, 1, 1), keys.repeat(2, 1, 1, 1), profile=prof)
    with pytest.raises(InvalidInput, match="no such file"):
        encode(keys, keys, profile=tmp_path / "missing.json")


def test_crc32_many_on_threads_equals_one_by_one():
    from kvcodec.codec import container

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 300_000, 60)]
    assert sum(map(len, parts)) > container._PARALLEL_CRC_BYTES  # the threaded path
    assert container.crc32_many(parts) == [container.crc32(p) for p in parts]
