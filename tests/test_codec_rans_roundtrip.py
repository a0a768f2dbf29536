"""Coder 3 (interleaved rANS): round trips, escapes, extreme classes, tables, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcodec.codec import container, decode, encode, entropy, inspect, rans, substream
from kvcodec.codec.layers import decode_layers

from _codec_fixtures import plain_part

LEGACY = Path(__file__).parent / "golden_coder2"


def _classes(d: np.ndarray) -> np.ndarray:
    a = np.abs(d)
    return entropy.scale_classes(a.sum(axis=1), a.max(axis=1), d.shape[1])


def test_tables_are_normalised_and_cover_every_class():
    assert rans.FREQ.shape[0] == entropy.NUM_CLASSES + 1
    for cls in range(1, entropy.NUM_CLASSES + 1):
        e = int(rans.ESC[cls])
        f = rans.FREQ[cls, : 2 * e + 3].astype(np.int64)
        assert f.sum() == rans.PROB_SCALE and f.min() >= 1
        assert not rans.FREQ[cls, 2 * e + 3 :].any()
        assert np.array_equal(np.bincount(rans.SLOT2SYM[cls], minlength=2 * e + 3), f)


def test_tables_digest_is_pinned():
    """The tables are normative: any change to their construction must be deliberate."""
    h = hashlib.sha256()
    for a in (rans.ESC, rans.FREQ, rans.CUM):
        h.update(a.astype("<u4").tobytes())
    assert h.hexdigest() == "d490fa20bf3a23b6f58351589a2138f55973bb42079cc1d0cee578eb0b7ab671"


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.3, 3.0, 40.0, 900.0, 30000.0])
def test_round_trip_across_classes(scale):
    rng = np.random.default_rng(int(scale * 10) + 1)
    d = np.round(rng.laplace(size=(24, 50)) * scale).astype(np.int32)
    d = np.clip(d, -65000, 65000)
    cls = _classes(d)
    words, escapes = rans.encode_deltas(d, cls)
    assert np.array_equal(rans.decode_deltas(words, escapes, cls, 50), d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_dequantized_gives_dequantize_blocks_values(dtype):
    """The CPU decoder's one-pass path: every value as dequantize_block computes it, including
    all-zero channels (their centre), escapes, and values clamped to the dtype's range."""
    from kvcodec.codec.quantize import dequantize_block

    rng = np.random.default_rng(7)
    heads, tokens, dim = 3, 40, 8
    d = np.round(rng.laplace(size=(heads * dim, tokens)) * rng.choice([0.5, 4, 300], (heads * dim, 1))).astype(np.int32)
    d[5] = 0  # class 0
    d[6, 3] = 30000  # an escape
    cls = _classes(d)
    centers = rng.integers(-50, 50, heads * dim).astype(np.int32)
    steps = np.array([0.01, 3.5, 9e3 if dtype == torch.float16 else 1e37], dtype=np.float32)  # head 2 overflows
    words, escapes = rans.encode_deltas(d, cls)
    ref = dequantize_block(steps, centers, d, heads, dim, dtype)
    finfo = torch.finfo(dtype)
    assert torch.isfinite(ref).all() and (ref.abs() == finfo.max).any()
    part = plain_part(steps, centers, cls, words, escapes)
    assert torch.equal(substream.decode_quantized(part, heads, tokens, dim, torch.float32, dtype), ref)
    # into a slice of a larger tensor (heads apart, tokens offset): nothing outside it is touched
    big = torch.full((2, heads, tokens + 9, dim), 7.0, dtype=dtype)
    substream.decode_quantized(part, heads, tokens, dim, torch.float32, dtype, out=big[1, :, 4 : 4 + tokens])
    assert torch.equal(big[1, :, 4 : 4 + tokens], ref)
    assert (big[0] == 7).all() and (big[1, :, :4] == 7).all() and (big[1, :, 4 + tokens :] == 7).all()
    with pytest.raises(Exception, match="entropy payload"):
        substream.decode_quantized(plain_part(steps, centers, cls, words[:-1], escapes), heads, tokens, dim,
                                   torch.float32, dtype)


def test_dequantized_values_round_to_half_and_bfloat16_as_torch_does():
    """The decoder stores float16 / bfloat16 bits it rounds itself (numba has no CPU float16):
    every half and bfloat16 value, the midpoints between neighbours (ties to even), one float32
    ulp either side of them, subnormals and random float32 values all convert as torch converts."""
    halves = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()  # finite, >= 0
    mids = (halves[:-1].double() + halves[1:].double()) / 2
    bf = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf_mids = (bf[:-1].double() + bf[1:].double()) / 2
    rng = np.random.default_rng(0)
    random = torch.from_numpy(rng.integers(0, 0x7F800000, 200_000, dtype=np.uint32).view(np.float32).copy())
    base = torch.cat([halves, bf, mids.float(), bf_mids.float(), random])
    near = torch.cat([base, torch.nextafter(base, torch.tensor(np.inf)), torch.nextafter(base, torch.tensor(0.0))])
    values = torch.cat([near, -near]).numpy()
    for dtype, kind in ((torch.float16, rans.OUT_FLOAT16), (torch.bfloat16, rans.OUT_BFLOAT16), (torch.float32, rans.OUT_FLOAT32)):
        finfo = torch.finfo(dtype)
        x = values[np.abs(values) <= finfo.max]  # the decoder clamps to the finite range first
        got = _bits_of(np.ascontiguousarray(x), kind)
        want = torch.from_numpy(x).to(dtype).view(torch.int16 if dtype != torch.float32 else torch.int32).numpy()
        assert np.array_equal(got.astype(np.uint32), want.astype(np.uint32) & (0xFFFFFFFF if dtype == torch.float32 else 0xFFFF)), dtype


def _bits_of(x: np.ndarray, kind: int) -> np.ndarray:
    from numba import njit

    @njit(cache=False)
    def convert(x, kind):
        values = x.copy()
        scratch = np.empty_like(values)
        table = np.empty(x.shape[0], np.uint32)
        rans.to_bits(0, x.shape[0], kind, values, values.view(np.uint32), scratch, scratch.view(np.uint32), table)
        return table

    return convert(x, kind)


def _corruptions(words: np.ndarray, escapes: np.ndarray):
    yield "run out before the last symbol", words[:-1], escapes
    yield "left over after the last symbol", np.concatenate([words, words[-1:]]), escapes
    yield "fewer words than the lanes' initial states", words[:3], escapes
    yield "escape list shorter", words, escapes[:-1]
    yield "escape list longer", words, np.concatenate([escapes, escapes[:1]])
    flipped = words.copy()
    flipped[-1] ^= 0x5A5A  # the last renormalisation word: decodes, but a lane ends off its initial state
    yield None, flipped, escapes


@pytest.mark.parametrize("tokens", [50, 255, 256])  # lane runs that wrap mid-channel, and that do not
def test_corrupt_payloads_are_refused_not_misread(tokens):
    """Every damaged payload is a CorruptStream (never an out-of-bounds read or a silent result),
    through the word-level decoder and a whole substream; the kernel checks word bounds once per
    channel."""
    from kvcodec.codec.errors import CorruptStream

    rng = np.random.default_rng(tokens)
    d = np.round(rng.laplace(size=(16, tokens)) * rng.choice([0.5, 3, 40], (16, 1))).astype(np.int32)
    d[2, 7] = 20000  # escapes
    d[9, 1] = -15000
    cls = _classes(d)
    words, escapes = rans.encode_deltas(d, cls)
    assert len(escapes) >= 2
    out = torch.empty((2, tokens, 8), dtype=torch.float16)
    centers, steps = np.zeros(16, np.int32), np.ones(2, np.float32)
    for message, w, e in _corruptions(words, escapes):
        with pytest.raises(CorruptStream, match=message or "entropy payload"):
            rans.decode_deltas(w, e, cls, tokens)
        with pytest.raises(CorruptStream, match=message or "entropy payload"):
            substream.decode_quantized(plain_part(steps, centers, cls, w, e), 2, tokens, 8, torch.float16,
                                       torch.float16, out=out)


def test_escapes_cover_rare_outliers_and_the_extremes():
    d = np.zeros((4, 300), dtype=np.int32)
    d[0, ::7] = 1
    d[0, 5] = 65534  # largest |delta| the quantizer can produce
    d[0, 6] = -65534
    d[1] = np.arange(300) % 5 - 2
    d[1, 100] = -3000
    d[3, 299] = 1
    cls = _classes(d)
    words, escapes = rans.encode_deltas(d, cls)
    assert len(escapes) >= 3
    assert np.array_equal(rans.decode_deltas(words, escapes, cls, 300), d)


def test_every_symbol_of_every_class_round_trips():
    for cls in (1, 20, 40, 60, 70, 80, 107):
        e = int(rans.ESC[cls])
        row = np.arange(-e - 3, e + 4, dtype=np.int32)
        d = np.tile(row, (2, 1))
        c = np.full(2, cls, dtype=np.uint8)
        words, escapes = rans.encode_deltas(d, c)
        assert np.array_equal(rans.decode_deltas(words, escapes, c, d.shape[1]), d)


def test_magnitude_beyond_the_escape_range_is_refused():
    d = np.array([[0, 70000]], dtype=np.int32)
    with pytest.raises(ValueError, match="escape range"):
        rans.encode_deltas(d, np.array([1], dtype=np.uint8))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 200), st.floats(0, 50), st.integers(0, 2**31))
def test_property_round_trip(channels, tokens, scale, seed):
    rng = np.random.default_rng(seed)
    d = np.round(rng.laplace(size=(channels, tokens)) * scale * rng.uniform(0, 1, (channels, 1))).astype(np.int32)
    cls = _classes(d)
    words, escapes = rans.encode_deltas(d, cls)
    assert np.array_equal(rans.decode_deltas(words, escapes, cls, tokens), d)


def test_encoder_is_deterministic_across_threads():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(4, 2, 70, 16, generator=g).half()
    v = torch.randn(4, 2, 70, 16, generator=g).half()
    blobs = {encode(k, v, token_block=32, threads=t) for t in (1, 2, 3) for _ in range(2)}
    assert len(blobs) == 1
    assert inspect(blobs.pop()).coder == "rans-interleaved"


@pytest.mark.parametrize("level", ["high", "balanced", "compact"])
def test_stream_round_trip_and_layers_iterator(level):
    g = torch.Generator().manual_seed(5)
    k = torch.randn(3, 2, 40, 8, generator=g)
    k[..., 2] *= 30
    v = torch.randn(3, 2, 40, 8, generator=g).to(torch.bfloat16)
    k = k.to(torch.bfloat16)
    blob = encode(k, v, level=level, token_block=16)
    kv = decode(blob)
    seen = []
    for layer, keys, values in decode_layers(blob, threads=2):
        assert torch.equal(keys, kv.keys[layer]) and torch.equal(values, kv.values[layer])
        seen.append(layer)
    assert seen == [0, 1, 2]
    assert (kv.keys.float() - k.float()).abs().max() < 0.6 * k.float().abs().max()


def test_size_within_one_percent_of_coder_2():
    rng = np.random.default_rng(9)
    d = np.round(rng.laplace(size=(256, 255)) * rng.uniform(0.2, 6, (256, 1))).astype(np.int32)
    a = np.abs(d)
    cls = _classes(d)
    words, escapes = rans.encode_deltas(d, cls)
    new = 2 * len(words) + 2 * len(escapes) + 4 + len(cls)
    old = len(entropy.encode_symbols(d, a.max(axis=1), cls)) + 3 * len(cls)
    assert new < 1.01 * old


@pytest.mark.parametrize("name", ["small_fp16.balanced.kvc", "tiny_fp32.high.kvc"])
def test_coder_2_streams_still_decode(name):
    entry = json.loads((LEGACY / "digests.json").read_text())[name]
    blob = (LEGACY / name).read_bytes()
    assert blob[15] == container.CODER_ANS
    kv = decode(blob)
    width = {torch.float16: "<i2", torch.float32: "<i4"}[kv.keys.dtype]
    for t, key in ((kv.keys, "keys_sha256"), (kv.values, "values_sha256")):
        h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().astype(width).tobytes())
        assert h.hexdigest() == entry[key]
    for layer, keys, _ in decode_layers(blob, backend="torch"):  # coder 2 falls back to constriction
        assert torch.equal(keys, kv.keys[layer])


@pytest.mark.parametrize("tokens", [1, 2, 33, 255])
def test_numba_channel_deltas_equal_quantize_block(tokens):
    from kvcodec.codec.quantize import head_steps, quantize_block, symbols

    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(3, tokens, 16, generator=g) * torch.rand(1, 1, 16, generator=g) * 5 - 2.5
    steps = head_steps(x, 0.3)
    ref = quantize_block(x, steps)
    q = torch.round(x / torch.from_numpy(steps)[:, None, None]).to(torch.int32).numpy()
    assert np.array_equal(symbols(x, steps), q)  # the CPU encoder's numba quantizer
    ties = (torch.arange(-20, 20, dtype=torch.float32) + 0.5)[None, :, None] * torch.from_numpy(steps)[:, None, None]
    assert np.array_equal(symbols(ties, steps), torch.round(ties / torch.from_numpy(steps)[:, None, None]).to(torch.int32).numpy())
    centers, deltas, kmax, abs_sums = rans.channel_deltas(q)
    for a, b in ((centers, ref.centers), (deltas, ref.deltas), (kmax, ref.kmax), (abs_sums, ref.abs_sums)):
        assert np.array_equal(a, b)
    assert np.array_equal(entropy.scale_classes(abs_sums, kmax, tokens), _classes(ref.deltas))
