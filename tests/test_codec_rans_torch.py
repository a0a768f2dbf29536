"""The torch rANS decoder (the GPU path, run here on the CPU) equals the numba one bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcodec.codec import decode, encode, entropy, rans, rans_torch
from kvcodec.codec.layers import decode_layers


def _random_substream(rng: np.random.Generator) -> tuple[rans_torch.Substream, np.ndarray]:
    channels, tokens = int(rng.integers(1, 48)), int(rng.integers(1, 90))
    scale = rng.choice([0.0, 0.05, 0.5, 2.0, 20.0, 400.0], size=(channels, 1))
    d = np.round(rng.laplace(size=(channels, tokens)) * scale).astype(np.int32)
    if rng.random() < 0.3:  # a rare outlier -> escape
        d[rng.integers(channels), rng.integers(tokens)] = int(rng.choice([-1, 1]) * rng.integers(100, 60000))
    a = np.abs(d)
    cls = entropy.scale_classes(a.sum(axis=1), a.max(axis=1), tokens)
    words, escapes = rans.encode_deltas(d, cls)
    return rans_torch.Substream(words, escapes, cls, tokens), d


@pytest.mark.parametrize("seed", range(6))
def test_torch_decoder_matches_numba_on_random_substreams(seed):
    rng = np.random.default_rng(seed)
    pairs = [_random_substream(rng) for _ in range(25)]
    out = rans_torch.decode_symbols([s for s, _ in pairs])
    for (sub, d), got in zip(pairs, out):
        ref = rans.decode_deltas(sub.words, sub.escapes, sub.classes, sub.tokens)
        assert np.array_equal(ref, d)
        assert np.array_equal(got.numpy(), ref)


def test_stream_decodes_identically_on_both_backends():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, 150, 16, generator=g)
    k[..., 5] *= 25
    v = torch.randn(3, 2, 150, 16, generator=g) * 0.2
    for level in ("high", "compact"):
        blob = encode(k.half(), v.half(), level=level, token_block=64)
        a = decode(blob, backend="numba", threads=2)
        b = decode(blob, backend="torch")
        assert torch.equal(a.keys.view(torch.int16), b.keys.view(torch.int16))
        assert torch.equal(a.values.view(torch.int16), b.values.view(torch.int16))
        for (la, ka, va), (lb, kb, vb) in zip(decode_layers(blob), decode_layers(blob, backend="torch", batch_layers=1)):
            assert la == lb and torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_decode_matches_cpu():
    k = torch.randn(2, 2, 100, 16).half()
    blob = encode(k, k * 0.5, token_block=32)
    a = decode(blob)
    for backend in ("numba", "torch"):
        b = decode(blob, device="cuda", backend=backend)
        assert torch.equal(a.keys, b.keys.cpu()) and torch.equal(a.values, b.values.cpu())
    assert encode(k.cuda(), k.cuda() * 0.5, token_block=32) == blob
