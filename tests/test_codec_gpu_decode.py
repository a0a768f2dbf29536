"""The grouped device decoder (codec/gpu_decode.py), run by Triton's CPU interpreter, equals numba bit for bit.

Covers what the per-substream path handles one substream at a time: raw (sink) tokens, a
partial last block, RoPE keys with per-head and layer-wide bases, side-information priors,
float32 and bfloat16 streams, and every kind of damage (reported as the other decoders report it).
See test_codec_rans_triton.py for why TRITON_INTERPRET is set at import.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from _triton_fixtures import rerun_under_interpreter
import torch

from kvcodec.codec import container, decode, encode, rans_triton
from kvcodec.codec.errors import ChecksumMismatch, CorruptStream
from kvcodec.codec.layers import decode_layers
from kvcodec.client.calibrate import fit_side_priors
from test_codec_transform import DIM, HEADS, _kv, _profile

pytestmark = pytest.mark.skipif(not rans_triton.available(), reason="triton is not installed (extra 'gpu')")
in_process = pytest.mark.skipif(_PREIMPORTED, reason="triton was imported before TRITON_INTERPRET=1; see the subprocess test")
TOKENS = 35  # blocks of 16: a partial last block


@pytest.fixture(scope="module")
def profiles():
    """Per-head bases with priors, and layer-wide bases (one group of all heads) without."""
    head = _profile()
    return {"head+prior": replace(head, side_priors=fit_side_priors(head, [_kv(5), _kv(6)], "tiny")),
            "layer": _profile(group=HEADS * DIM)}


def _same(a, b) -> bool:
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


def _assert_decoders_agree(blob: bytes, profile=None, by_layer: bool = False) -> None:
    ref = decode(blob, backend="numba", profile=profile)
    got = decode(blob, backend="triton", profile=profile)
    assert _same(got.keys, ref.keys) and _same(got.values, ref.values)
    if by_layer:  # one group per layer
        for layer, keys, values in decode_layers(blob, backend="triton", batch_layers=1, profile=profile):
            assert _same(keys, ref.keys[layer]) and _same(values, ref.values[layer])


@in_process
@pytest.mark.parametrize("level,sinks,name", [("high", 0, "head+prior"), ("compact", 5, "layer"),
                                              ("balanced", 20, "head+prior")])
def test_transform_streams_decode_like_numba(profiles, name, level, sinks):
    prof = profiles[name]
    k, v = _kv(3, TOKENS)
    blob = encode(k, v, level=level, token_block=16, sink_tokens=sinks, profile=prof)
    assert container.parse(blob).header.predicted_side == (name == "head+prior")
    _assert_decoders_agree(blob, prof, by_layer=level == "compact")


@in_process
def test_predicted_streams_decode_and_encode_like_numba():
    """Header flag 8 takes the per-layer Triton path (the grouped decoder declines it), and the
    Triton device encoder carries the previous layer's symbols: the same tensors and bytes."""
    from kvcodec.client.calibrate import fit_prediction
    from kvcodec.codec.predict import Maps
    from test_codec_predict import _kv as correlated_kv

    base = _profile()
    maps, shifts = fit_prediction(base, [correlated_kv(1), correlated_kv(2)], "high")
    prof = replace(base, prediction={"high": Maps(*maps, shifts)})
    k, v = correlated_kv(3, TOKENS)
    blob = encode(k, v, level="high", token_block=16, sink_tokens=3, profile=prof)
    assert container.parse(blob).header.predicted_values
    _assert_decoders_agree(blob, prof, by_layer=True)
    assert encode(k, v, level="high", token_block=16, sink_tokens=3, profile=prof, backend="triton") == blob


@in_process
def test_plain_float32_stream_decodes_like_numba():
    k, v = _kv(4, TOKENS)
    k[0, 1, 7, 3] = 3000.0  # an outlier: escapes
    k = k.float()
    k[1, 0, 20, 5] = 1e6  # beyond float16: clamped to its largest value when decoded to it
    blob = encode(k, v.float(), level="balanced", token_block=16, sink_tokens=3)
    _assert_decoders_agree(blob)
    for dtype in (torch.float16, torch.bfloat16):
        ref, got = decode(blob, dtype=dtype), decode(blob, backend="triton", dtype=dtype)
        assert _same(got.keys, ref.keys) and _same(got.values, ref.values)
    assert float(got.keys.float().abs().max()) < 1.1e6 and bool(torch.isfinite(ref.keys).all())


def _repack(blob: bytes, sid: int, edit) -> bytes:
    """``blob`` with substream ``sid`` replaced by ``edit(payload)``, every CRC made valid again."""
    layout = container.parse(blob)
    payloads = [bytes(blob[o : o + n]) for o, n in zip(layout.offsets, layout.lengths)]
    payloads[sid] = edit(bytearray(payloads[sid]))
    return container.pack(layout.header, payloads)


def _errors(blob: bytes) -> tuple[str, str]:
    messages = []
    for backend in ("numba", "triton"):
        with pytest.raises(CorruptStream) as info:
            decode(blob, backend=backend)
        messages.append(str(info.value))
    return messages[0], messages[1]


@in_process
def test_damage_is_reported_like_numba():
    k, v = _kv(2, TOKENS)
    blob = encode(k, v, level="balanced", token_block=16, sink_tokens=2)
    layout = container.parse(blob)
    sid = 4  # layer 1, keys, block 1

    def flip_words(p):
        p[-6] ^= 0x5A
        return bytes(p)

    def huge_side_count(p):
        p[4 * HEADS + 6 : 4 * HEADS + 10] = (1 << 20).to_bytes(4, "little")
        return bytes(p)

    def bad_step(p):
        p[0:4] = np.float32(-1.0).tobytes()
        return bytes(p)

    def odd_words(p):
        return bytes(p) + b"\x00"

    for edit, text in ((flip_words, "entropy payload"), (huge_side_count, "do not fit"),
                       (bad_step, "step sizes"), (odd_words, "whole number of u16 words")):
        numba_msg, triton_msg = _errors(_repack(blob, sid, edit))
        assert triton_msg.startswith(layout.header.describe(sid)) and text in triton_msg, triton_msg
        assert numba_msg.startswith(layout.header.describe(sid)), numba_msg

    def infinite_sink(p):
        p[0:2] = np.float16(np.inf).tobytes()
        return bytes(p)

    numba_msg, triton_msg = _errors(_repack(blob, 0, infinite_sink))
    assert triton_msg == numba_msg == f"{layout.header.describe(0)}: raw tokens: non-finite value in a quantized stream"
    damaged = bytearray(blob)
    damaged[layout.offsets[sid] + 20] ^= 1  # no CRC fix-up: the checksum names it first
    with pytest.raises(ChecksumMismatch, match=f"substream {sid} "):
        decode(bytes(damaged), backend="triton")


@in_process
def test_fuzzed_payloads_fail_or_decode_like_numba(profiles):
    """Random damage inside substream payloads (CRCs made valid again, so it reaches the parsers
    and kernels): the grouped decoder accepts exactly what numba accepts, with the same
    tensors, and raises only codec errors."""
    import random

    from kvcodec.codec.errors import KVCodecError

    k, v = _kv(7, TOKENS)
    prof = profiles["head+prior"]
    seeds = [(encode(k, v, level=level, token_block=16, sink_tokens=2, profile=p), p)
             for level, p in (("balanced", None), ("compact", prof))]
    rng = random.Random(20261123)
    outcomes = []
    for _ in range(6):  # ~10 s each in the interpreter
        blob, p = rng.choice(seeds)
        sid = rng.randrange(container.parse(blob).header.n_substreams)

        def damage(payload):
            for _ in range(rng.choice([1, 1, 2, 3])):
                at = rng.randrange(len(payload))
                if rng.random() < 0.3 and at + 4 <= len(payload):
                    payload[at : at + 4] = rng.choice([0, 1, 255, 65535, 1 << 20, 2**32 - 1]).to_bytes(4, "little")
                else:
                    payload[at] = rng.randrange(256)
            return bytes(payload)

        data = _repack(blob, sid, damage)
        results = []
        for backend in ("numba", "triton"):
            try:
                results.append(decode(data, profile=p, backend=backend))
            except KVCodecError as exc:
                results.append(type(exc))
        ref, got = results
        if isinstance(ref, type) or isinstance(got, type):
            assert ref is got, (sid, ref, got)
        else:
            assert _same(got.keys, ref.keys) and _same(got.values, ref.values), sid
        outcomes.append(isinstance(ref, type))
    assert any(outcomes)  # damage was found


def test_whole_module_in_subprocess_when_triton_was_imported_first():
    if not _PREIMPORTED:
        pytest.skip("triton runs in the interpreter in this process; the tests above ran here")
    rerun_under_interpreter(__file__)


@in_process
def test_per_layer_rope_streams_decode_like_numba():
    """A profile with a RoPE table per layer (Gemma 3: bases 10k and 1M): the Triton decoder
    rotates each layer's keys with its own table, as the CPU decoder does."""
    from test_codec_transform import INV_FREQ

    prof = replace(_profile(), rope_inv_freq=np.stack([INV_FREQ, INV_FREQ * np.float32(0.25)]))
    k, v = _kv(7, TOKENS)
    blob = encode(k, v, level="balanced", token_block=16, sink_tokens=1, profile=prof)
    _assert_decoders_agree(blob, prof, by_layer=True)
