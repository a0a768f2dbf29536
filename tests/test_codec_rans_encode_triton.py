"""The device rANS encoders (Triton kernel in the CPU interpreter, torch loop) equal the numba encoder byte for byte.

Like ``test_codec_rans_triton.py``: ``TRITON_INTERPRET=1`` must be set before
triton is first imported; if another test module imported it first, the
in-process Triton tests skip and one test reruns this module in a subprocess.
"""

from __future__ import annotations

import os
import sys

_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from _triton_fixtures import compile_without_gpu, rerun_under_interpreter
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcodec.codec import decode, encode, entropy, rans, rans_triton
from kvcodec.codec.errors import InvalidInput
from kvcodec.codec.layers import decode_layers
from kvcodec.codec.rans_encode import encode_deltas_batch

needs_triton = pytest.mark.skipif(not rans_triton.available(), reason="triton is not installed (extra 'gpu')")
in_process = pytest.mark.skipif(_PREIMPORTED, reason="triton was imported before TRITON_INTERPRET=1; see the subprocess test")
BACKENDS = ["torch", pytest.param("triton", marks=[needs_triton, in_process])]


def _laplace(rng: np.random.Generator, channels: int, tokens: int, scales) -> np.ndarray:
    scale = rng.choice(scales, size=(channels, 1))
    return np.round(rng.laplace(size=(channels, tokens)) * scale).astype(np.int32)


def _item(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(d)
    return d, entropy.scale_classes(a.sum(axis=1), a.max(axis=1), d.shape[1])


def _random_items(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random substreams with escapes of both signs, plus every lane-count edge."""
    items = []
    for _ in range(10):
        d = _laplace(rng, int(rng.integers(1, 24)), int(rng.integers(1, 70)), [0.0, 0.05, 0.5, 2.0, 20.0, 400.0])
        for _ in range(int(rng.integers(0, 3))):
            d[rng.integers(d.shape[0]), rng.integers(d.shape[1])] = int(rng.choice([-1, 1]) * rng.integers(100, 60000))
        items.append(_item(d))
    # symbols n = 1, 63 (1 lane), 64, 65, 130 (2 lanes), 2048 (32 lanes), 2049 (32 lanes, ragged last step)
    for channels, tokens in ((1, 1), (1, 63), (2, 32), (5, 13), (10, 13), (32, 64), (1, 2049)):
        d = _laplace(rng, channels, tokens, [3.0, 30.0])
        items.append((d, np.full(channels, 9, dtype=np.uint8)))
    items.append((np.zeros((4, 9), np.int32), np.zeros(4, np.uint8)))  # nothing coded
    items.append((np.zeros((0, 5), np.int32), np.zeros(0, np.uint8)))  # no channels
    return items


def _assert_same(items, got) -> None:
    assert len(got) == len(items)
    for b, ((d, cls), (words, escapes)) in enumerate(zip(items, got)):
        ref_words, ref_escapes = rans.encode_deltas(d, cls)
        assert words.dtype == np.uint16 and escapes.dtype == np.uint16, b
        assert np.array_equal(words, ref_words), f"item {b}: words differ"
        assert np.array_equal(escapes, ref_escapes), f"item {b}: escapes differ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(2))
def test_batch_matches_numba_on_random_substreams(backend, seed):
    items = _random_items(np.random.default_rng(seed))
    got = encode_deltas_batch(items, backend=backend)  # triton: one launch for the batch
    _assert_same(items, got)
    assert sum(len(e) for _, e in got) > 0 and min(len(w) for w, _ in got) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_class_with_escapes(backend):
    rng = np.random.default_rng(5)
    classes = np.arange(1, entropy.NUM_CLASSES + 1, dtype=np.uint8)
    d = np.round(rng.laplace(size=(len(classes), 48)) * np.geomspace(0.05, 3000, len(classes))[:, None])
    d = np.clip(d, -60000, 60000).astype(np.int32)
    d[:, 0] = np.int32(rans.ESC[classes] + 1)  # every class escapes at least once (ESC+) ...
    d[:, 1] = -np.int32(rans.ESC[classes] + 1 + 65535)  # ... and at its largest magnitude (ESC-)
    items = [(d, classes), (d[::-1].copy(), classes[::-1].copy())]
    _assert_same(items, encode_deltas_batch(items, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_escape_overflow_and_bad_class_raise(backend):
    d = np.zeros((2, 70), np.int32)
    d[1, 3] = int(rans.ESC[4]) + 2 + rans.MAX_ESCAPE_MAGNITUDE
    cls = np.array([0, 4], np.uint8)
    with pytest.raises(ValueError, match="exceeds the escape range") as numba_error:
        rans.encode_deltas(d, cls)
    with pytest.raises(ValueError, match="exceeds the escape range") as device_error:
        encode_deltas_batch([(d, cls)], backend=backend)
    assert str(device_error.value) == str(numba_error.value)
    bad = entropy.NUM_CLASSES + 1
    with pytest.raises(ValueError, match=f"scale class {bad} > {entropy.NUM_CLASSES}"):
        encode_deltas_batch([(d * 0, np.array([0, bad], np.uint8))], backend=backend)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 150), st.integers(0, 2**32 - 1))
def test_torch_encoder_property(channels, tokens, seed):
    rng = np.random.default_rng(seed)
    d = _laplace(rng, channels, tokens, [0.0, 0.3, 4.0, 50.0, 900.0])
    items = [_item(d)]
    got = encode_deltas_batch(items, backend="torch")
    _assert_same(items, got)
    (words, escapes), cls = got[0], items[0][1]  # and numba decodes the device's words to the deltas
    assert np.array_equal(rans.decode_deltas(words, escapes, cls, tokens)[cls != 0], d[cls != 0])


def _kv(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, 40, 16, generator=g)
    k[..., 3] *= 30
    k[0, 1, 7, 2] = 3000.0  # an escape
    return k.half(), (torch.randn(2, 2, 40, 16, generator=g) * 0.3).half()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["compact", "high"])
def test_encode_backend_gives_the_same_stream(backend, level):
    k, v = _kv()
    ref = encode(k, v, level=level, token_block=16)
    got = encode(k, v, level=level, token_block=16, backend=backend, threads=2)
    assert got == ref
    a, b = decode(got, backend="numba"), decode(ref, backend="numba")  # device-encoded -> numba decode
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@needs_triton
@in_process
def test_numba_stream_decodes_in_one_triton_launch(monkeypatch):
    k, v = _kv(4)
    k, v = k[:, :1, :16, :4], v[:, :1, :16, :4]  # the interpreter runs ~10 ms a step: keep substreams tiny
    blob = encode(k, v, level="balanced", token_block=8)  # numba-encoded -> Triton decode
    ref = decode(blob, backend="numba")
    launches = []
    launch = rans_triton.launch
    monkeypatch.setattr(rans_triton, "launch", lambda batch, out: (launches.append(len(batch.n)), launch(batch, out))[1])
    got = decode(blob, backend="triton")
    assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)
    # 2 layers x (keys, values) x 2 blocks: one launch for the side information, one for the symbols
    assert launches == [2 * 2 * 2, 2 * 2 * 2]
    launches.clear()
    for layer, keys, values in decode_layers(blob, backend="triton", batch_layers=1):
        assert torch.equal(keys, ref.keys[layer]) and torch.equal(values, ref.values[layer])
    assert launches == [2 * 2] * 4  # still layer by layer


def test_unknown_or_unusable_backend_is_invalid_input():
    k, v = _kv()
    with pytest.raises(InvalidInput, match="backend: unknown encoder 'cuda'"):
        encode(k, v, backend="cuda")
    with pytest.raises(InvalidInput, match="not a device encoder"):
        encode_deltas_batch([], backend="numba")


def test_whole_module_in_subprocess_when_triton_was_imported_first():
    if not _PREIMPORTED:
        pytest.skip("triton runs in the interpreter in this process; the tests above ran here")
    rerun_under_interpreter(__file__)


@needs_triton
@pytest.mark.parametrize("capability", [80, 90])
def test_encoder_kernel_compiles_for_cuda_without_a_gpu(capability, tmp_path):
    cubin_bytes, global_stores = compile_without_gpu("rans_encode", capability, tmp_path, "st.global")
    assert cubin_bytes > 1000 and global_stores > 0


def test_auto_backend_is_triton_only_on_cuda(monkeypatch):
    from kvcodec.codec import container, layers

    rans = container.CODER_RANS
    assert layers.resolve_backend("auto", "cpu", rans) == "numba"
    assert layers.resolve_backend("auto", None, rans) == "numba"
    monkeypatch.setattr(rans_triton, "available", lambda: True)
    monkeypatch.setattr(rans_triton, "check_usable", lambda device: None)  # as on a CUDA machine with triton
    assert layers.resolve_backend("auto", "cuda", rans) == "triton"
    assert layers.resolve_backend("auto", "cuda", container.CODER_ANS) == "numba"  # coder 2: host only

    def unusable(device):
        raise InvalidInput("backend 'triton': interpreter mode")

    monkeypatch.setattr(rans_triton, "check_usable", unusable)
    assert layers.resolve_backend("auto", "cuda", rans) == "numba"
