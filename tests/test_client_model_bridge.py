"""kvcodec.client.hf_bridge: KV tensors <-> transformers DynamicCache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcodec.client.hf_bridge import cache_to_kv, kv_to_cache
from kvcodec.client.model import prefill
from kvcodec.codec.errors import InvalidInput


def _random_kv(layers=2, heads=2, tokens=5, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, heads, tokens, dim, generator=g).to(dtype)
    v = torch.randn(layers, heads, tokens, dim, generator=g).to(dtype)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(dtype, tiny_llama):
    k, v = _random_kv(dtype=dtype)
    cache = kv_to_cache(k, v, tiny_llama.config)
    assert isinstance(cache, DynamicCache)
    assert cache.get_seq_length() == 5
    assert cache.layers[1].keys.shape == (1, 2, 5, 16)
    k2, v2 = cache_to_kv(cache)
    assert k2.dtype == dtype and torch.equal(k2, k) and torch.equal(v2, v)


def test_round_trip_without_config_single_token():
    k, v = _random_kv(layers=3, tokens=1)
    k2, v2 = cache_to_kv(kv_to_cache(k, v))
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_dtype_and_device_cast(tiny_llama):
    k, v = _random_kv(dtype=torch.float16)
    cache = kv_to_cache(k, v, tiny_llama.config, dtype=torch.float32, device="cpu")
    assert cache.layers[0].keys.dtype == torch.float32
    k2, _ = cache_to_kv(cache)
    assert torch.equal(k2, k.float())


def test_result_does_not_alias_inputs_or_cache(tiny_llama):
    k, v = _random_kv()
    k_before = k.clone()
    cache = kv_to_cache(k, v, tiny_llama.config)
    cache.layers[0].keys.add_(1.0)
    assert torch.equal(k, k_before)
    k2, _ = cache_to_kv(cache)
    k2.zero_()
    assert cache.layers[0].keys.abs().sum() > 0


def test_layer_count_must_match_config(tiny_llama):
    k, v = _random_kv(layers=3)
    with pytest.raises(InvalidInput, match="3 layers but the model config has 2"):
        kv_to_cache(k, v, tiny_llama.config)


def test_bad_shapes_are_refused():
    k, v = _random_kv()
    with pytest.raises(InvalidInput, match="values: shape"):
        kv_to_cache(k, v[:, :, :3])
    with pytest.raises(InvalidInput, match="keys: expected"):
        kv_to_cache(k[0], v[0])
    with pytest.raises(InvalidInput, match="values: expected a torch.Tensor"):
        kv_to_cache(k, v.numpy())


def test_empty_or_batched_cache_is_refused():
    with pytest.raises(InvalidInput, match="empty"):
        cache_to_kv(DynamicCache())
    cache = DynamicCache()
    cache.update(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4), layer_idx=0)
    with pytest.raises(InvalidInput, match=r"cache layer 0: expected keys and values \[1,"):
        cache_to_kv(cache)


def _continuation_logits(loaded, ids, split):
    """(full-forward logits for ids[split:], logits continuing from prefill(ids[:split]))."""
    model = loaded.model
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids])).logits[0, split:]
        keys, values = prefill(loaded, ids[:split])
        cache = kv_to_cache(keys, values, loaded.config)
        cont = model(input_ids=torch.tensor([ids[split:]]), past_key_values=cache).logits[0]
    return full, cont


def test_continuation_matches_full_forward_tiny(tiny_llama):
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    full, cont = _continuation_logits(tiny_llama, ids, 29)
    torch.testing.assert_close(cont, full, rtol=1e-5, atol=1e-5)


@pytest.mark.model
def test_continuation_matches_full_forward_smollm2(smollm2, gpl_text):
    from kvcodec.client.model import tokenize_file

    ids = tokenize_file(smollm2, gpl_text, 96)
    full, cont = _continuation_logits(smollm2, ids, 64)
    # fp32 through 30 layers, different matmul blocking: differences ~1e-5 on logits ~10.
    torch.testing.assert_close(cont, full, rtol=0, atol=5e-4)
    assert torch.equal(cont.argmax(-1), full.argmax(-1))
