"""encode(backend="torch" | "triton"): the batched device pipeline writes the numba path's stream, byte for byte.

The torch back end runs here on the CPU (the same operations as on a GPU); Triton
runs in its CPU interpreter on small shapes. ``TRITON_INTERPRET=1`` must be set
before triton is first imported: if another test module imported it first, the
in-process Triton tests skip and one test reruns this module in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import torch

from kvcodec.codec import decode, device_encode, encode, inspect, quantize, rans_triton
from kvcodec.codec import transform as tr
from kvcodec.codec.profile import Profile

needs_triton = pytest.mark.skipif(not rans_triton.available(), reason="triton is not installed (extra 'gpu')")
in_process = pytest.mark.skipif(_PREIMPORTED, reason="triton was imported before TRITON_INTERPRET=1; see the subprocess test")
LAYERS, HEADS, DIM = 2, 2, 8
INV_FREQ = (1.0 / 10000 ** (np.arange(0, DIM, 2) / DIM)).astype(np.float32)
LEVELS = {"high": 0.05, "balanced": 0.2, "compact": 0.5}


def _kv(tokens: int = 40, seed: int = 0, dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Outlier channels, an escape, keys rotated by RoPE (so the transform has work to do)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(LAYERS, HEADS, tokens, DIM, generator=g) + 3 * torch.randn(LAYERS, HEADS, 1, DIM, generator=g)
    keys[..., 3] *= 30
    keys[0, 1, min(7, tokens - 1), 2] = 3000.0
    keys = torch.stack([tr.rotate(keys[layer], tr.Rope(INV_FREQ), 0) for layer in range(LAYERS)])
    values = torch.randn(LAYERS, HEADS, tokens, DIM, generator=g) * 0.3
    return keys.to(dtype), values.to(dtype)


def _profile(transform: bool) -> Profile:
    weights = np.ones((LAYERS, 2, HEADS))
    weights[:, 1] = 4.0
    prof = Profile("tiny", LAYERS, HEADS, DIM, weights, dict(LEVELS))
    if transform:
        prof.bases = tr.fit_bases([_kv(64, seed=1, dtype=torch.float32)], weights, DIM, tr.Rope(INV_FREQ))
        prof.rope_inv_freq = INV_FREQ
    return prof


def _shaped_profile() -> Profile:
    """One key basis across the heads, shaped by a metric that weighs a few directions 30x (the
    encoders multiply by the profile's analysis matrices, not the bases)."""
    prof = _profile(False)
    kv = _kv(64, seed=1, dtype=torch.float32)
    prof.bases = tr.fit_bases([kv], prof.weights, HEADS * DIM, tr.Rope(INV_FREQ))
    rot = np.linalg.qr(np.random.default_rng(2).standard_normal((HEADS * DIM, HEADS * DIM)))[0]
    metric = np.stack([(rot * np.where(np.arange(HEADS * DIM) < 3, 30.0, 1.0)) @ rot.T] * LAYERS)
    prof.bases[:, 0], keys_analysis = tr.fit_shaped_bases([kv], prof.weights, metric, 0, tr.Rope(INV_FREQ))
    prof.analysis = prof.bases.astype(np.int32)
    prof.analysis[:, 0] = keys_analysis
    prof.rope_inv_freq = INV_FREQ
    return prof


PROFILES = {"none": None, "plain": _profile(False), "transform": _profile(True), "shaped": _shaped_profile()}


def _same_stream(k, v, backend: str, **kw) -> bytes:
    ref = encode(k, v, **kw)
    got = encode(k, v, backend=backend, **kw)
    assert got == ref, f"{backend} stream differs from numba's ({len(got)} vs {len(ref)} bytes)"
    return got


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("level", ["high", "balanced", "compact"])
def test_torch_stream_equals_numba_for_every_profile_and_level(profile, level):
    k, v = _kv()
    blob = _same_stream(k, v, "torch", level=level, token_block=16, profile=PROFILES[profile], model="tiny")
    assert inspect(blob).transform == (profile in ("transform", "shaped"))
    kv = decode(blob, profile=PROFILES[profile])  # and it decodes (a transform stream needs its profile)
    assert kv.keys.shape == k.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("block", "sinks", "first"),
    [(16, 1, 0), (7, 0, 0), (40, 1, 0), (16, 20, 0), (8, 9, 0), (16, 1, 5), (16, 3, 2), (40, 40, 0)],
    ids=["3 blocks", "ragged, no sinks", "one block", "block of only raw", "raw spans 2 blocks", "past the sinks",
         "first position 2", "all raw"],
)
def test_torch_stream_equals_numba_for_blocks_and_sinks(dtype, block, sinks, first):
    k, v = _kv(dtype=dtype)
    for profile in (None, PROFILES["transform"]):
        _same_stream(k, v, "torch", level="balanced", token_block=block, sink_tokens=sinks, first_position=first,
                     profile=profile, model="tiny")


def test_groups_of_layers_one_entropy_batch_each(monkeypatch):
    k, v = _kv()
    calls = []
    batch = device_encode.encode_flat_batch
    monkeypatch.setattr(device_encode, "encode_flat_batch", lambda *a: (calls.append(len(a[2])), batch(*a))[1])
    _same_stream(k, v, "torch", level="compact", token_block=16, profile=PROFILES["transform"], model="tiny")
    assert calls == [LAYERS * 2 * 3]  # every substream of the stream in one batch
    calls.clear()
    monkeypatch.setattr(device_encode, "MAX_GROUP_ELEMENTS", 2 * HEADS * 40 * DIM)  # one layer per group
    _same_stream(k, v, "torch", level="compact", token_block=16, profile=PROFILES["transform"], model="tiny")
    assert calls == [2 * 3] * LAYERS


def test_progress_and_lossless(monkeypatch):
    k, v = _kv()
    seen = []
    encode(k, v, level="balanced", token_block=16, backend="torch", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, LAYERS * 2 * 3) for i in range(1, LAYERS * 2 * 3 + 1)]
    monkeypatch.setattr(device_encode, "encode_payloads", None)  # lossless never reaches the device path
    _same_stream(k, v, "torch", level="lossless", token_block=16)


def test_segment_statistics_are_exact_past_2_to_the_53():
    num = np.array([2**60 + 1, 3, 2**53 + 1, 2**62 - 7], dtype=np.int64)
    den = np.array([3, 7, 1, 2**40 + 3], dtype=object)
    got = quantize.exact_ratio(num, den)
    assert got.tolist() == [int(a) / int(b) for a, b in zip(num.tolist(), den.tolist())]


@needs_triton
@in_process
@pytest.mark.parametrize("profile", ["none", "transform", "shaped"])
def test_triton_stream_equals_numba_in_one_launch(profile, monkeypatch):
    from kvcodec.codec import rans_encode

    k, v = _kv(20)
    launches = []
    run = rans_encode._run_triton
    monkeypatch.setattr(rans_encode, "_run_triton", lambda b: (launches.append(len(b.counts)), run(b))[1])
    for level, dtype in (("compact", torch.float16), ("high", torch.bfloat16)):
        _same_stream(k.to(dtype), v.to(dtype), "triton", level=level, token_block=8, sink_tokens=3,
                     profile=PROFILES[profile], model="tiny")
    assert launches == [LAYERS * 2 * 3] * 2  # one launch per stream


def test_whole_module_in_subprocess_when_triton_was_imported_first():
    if not _PREIMPORTED:
        pytest.skip("triton runs in the interpreter in this process; the tests above ran here")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
