"""kvcodec.client.quality: the per-token group quantization baselines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcodec.client.quality import per_token_baseline, per_token_bits_per_element, quantize_per_token
from kvcodec.codec.errors import InvalidInput


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 12),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(1e-3, 1e3),
)
def test_error_is_at_most_half_a_step(bits, tokens, seed, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, tokens, 64, generator=g) * spread
    y = quantize_per_token(x, bits)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / ((1 << bits) - 1)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ((y - x).abs() <= step / 2 * (1 + 1e-4) + 1e-6 * spread).all()


def test_groups_are_independent_and_constant_groups_exact():
    x = torch.zeros(1, 1, 2, 64)
    x[..., :32] = 3.0
    x[..., 32:] = torch.linspace(-1, 1, 32)
    y = quantize_per_token(x, 4, group=32)
    assert torch.equal(y[..., :32], x[..., :32])
    assert (y[..., 32:] - x[..., 32:]).abs().max() <= 2 / 15 / 2 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_fp16_params(dtype):
    k = torch.randn(2, 2, 4, 64).to(dtype)
    kq, vq = per_token_baseline(k, k, bits=8, param_dtype=torch.float16)
    assert kq.dtype == dtype and torch.equal(kq, vq)
    assert (kq.float() - k.float()).abs().max() < 0.1


def test_bits_per_element_counts_side_info():
    assert per_token_bits_per_element(8) == 8.5
    assert per_token_bits_per_element(4) == 4.5
    assert per_token_bits_per_element(2, group=32) == 3.0


def test_bad_arguments():
    x = torch.randn(1, 1, 1, 64)
    with pytest.raises(InvalidInput, match="bits: must be in 1..16, got 0"):
        quantize_per_token(x, 0)
    with pytest.raises(InvalidInput, match="group: 48 does not divide the last dimension 64"):
        quantize_per_token(x, 4, group=48)
