"""kvcodec.client.model.prefill: KV caches from a forward pass."""

from __future__ import annotations

import pytest
import torch

from kvcodec.client.model import prefill, tokenize_file


def _ids(n, vocab=128, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_shape_and_dtype(tiny_llama):
    keys, values = prefill(tiny_llama, _ids(17))
    assert keys.shape == values.shape == (2, 2, 17, 16)
    assert keys.dtype == torch.float32
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()


def test_prefill_is_deterministic_and_causal(tiny_llama):
    ids = _ids(24)
    k1, v1 = prefill(tiny_llama, ids)
    k2, v2 = prefill(tiny_llama, ids[:10])
    torch.testing.assert_close(k1[:, :, :10], k2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v1[:, :, :10], v2, rtol=1e-5, atol=1e-5)
    assert torch.equal(prefill(tiny_llama, ids)[0], k1)


def test_prefill_with_past_equals_one_pass(tiny_llama):
    ids = _ids(30)
    keys, values = prefill(tiny_llama, ids)
    past = prefill(tiny_llama, ids[:21])
    past_copy = (past[0].clone(), past[1].clone())
    k2, v2 = prefill(tiny_llama, ids[21:], past=past)
    assert k2.shape[2] == 30
    torch.testing.assert_close(k2, keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, values, rtol=1e-5, atol=1e-5)
    assert torch.equal(past[0], past_copy[0])  # the caller's past is not modified


def test_chunked_prefill_matches_one_pass_and_reports_progress(tiny_llama):
    ids = _ids(50)
    keys, values = prefill(tiny_llama, ids)
    seen = []
    k2, v2 = prefill(tiny_llama, ids, chunk_tokens=16, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(16, 50), (32, 50), (48, 50), (50, 50)]
    torch.testing.assert_close(k2, keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_tokens: must be positive, got 0"):
        prefill(tiny_llama, ids, chunk_tokens=0)


def test_prefill_accepts_tensor_ids_and_refuses_empty(tiny_llama):
    k, _ = prefill(tiny_llama, torch.tensor(_ids(5)))
    assert k.shape[2] == 5
    with pytest.raises(ValueError, match="token_ids"):
        prefill(tiny_llama, [])
    with pytest.raises(ValueError, match="token_ids"):
        prefill(tiny_llama, torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.model
def test_smollm2_prefill_chunked_equals_one_pass(smollm2, gpl_text):
    ids = tokenize_file(smollm2, gpl_text, 96)
    keys, values = prefill(smollm2, ids)
    assert keys.shape == (30, 3, 96, 64)
    k2, v2 = prefill(smollm2, ids[64:], past=prefill(smollm2, ids[:64]))
    torch.testing.assert_close(k2, keys, rtol=0, atol=1e-3)
    torch.testing.assert_close(v2, values, rtol=0, atol=1e-3)
