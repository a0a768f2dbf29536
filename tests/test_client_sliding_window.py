"""Sliding-window layers and per-layer RoPE (Gemma 3's structure) on a tiny random Gemma 3:
prefill keeps every token of every layer, a loaded cache reproduces the model's logits,
blend, the per-layer RoPE tables, and a calibrated profile with a RoPE per layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from kvcodec.client.blend import blend, generate_greedy
from kvcodec.client.hf_bridge import cache_to_kv, full_cache, kv_to_cache
from kvcodec.client.model import prefill, sliding_window_layers
from kvcodec.client.rope import apply_rotary, layer_types, reposition_keys, rotary_table
from kvcodec.codec import decode, encode
from kvcodec.codec.errors import InvalidInput
from kvcodec.codec.profile import profile_from_json
from kvcodec.codec.transform import model_rope, model_ropes, unrotate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(loaded, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(torch.tensor([ids]), use_cache=False).logits[0]


def _pre_rope_keys(loaded, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's keys before RoPE, ``[kv_heads, tokens, head_dim]``, from the model's own modules."""
    with torch.no_grad():
        out = loaded.model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
        keys = []
        for layer, hidden in zip(loaded.model.model.layers, out.hidden_states):
            attn = layer.self_attn
            k = attn.k_proj(layer.input_layernorm(hidden)).view(1, len(ids), -1, attn.head_dim)
            keys.append(attn.k_norm(k).transpose(1, 2)[0])
    return keys


def test_layout_names_the_sliding_layers(tiny_gemma):
    assert sliding_window_layers(tiny_gemma.config) == ((0, 1, 3), 8)
    assert tiny_gemma.sliding_window == 8 and tiny_gemma.sliding_layers == (0, 1, 3)


def test_prefill_keeps_every_token_of_every_layer(tiny_gemma):
    ids = _ids(20)
    keys, values = prefill(tiny_gemma, ids)
    assert keys.shape == values.shape == (4, 1, 20, 32)
    chunked = prefill(tiny_gemma, ids, chunk_tokens=6)
    torch.testing.assert_close(chunked[0], keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[1], values, atol=1e-5, rtol=1e-5)


def test_the_models_own_cache_is_refused_by_name(tiny_gemma):
    cache = DynamicCache(config=tiny_gemma.config)
    with torch.no_grad():
        tiny_gemma.model(torch.tensor([_ids(20)]), past_key_values=cache, use_cache=True)
    with pytest.raises(InvalidInput, match="cache layer 0: a sliding-window layer holding the last 7 of 20"):
        cache_to_kv(cache)


@pytest.mark.parametrize("full_layers", [False, True])
def test_loaded_cache_reproduces_the_models_logits(tiny_gemma, full_layers):
    """KV of 20 tokens loaded into a cache, then 10 more tokens: the logits of one forward pass
    over all 30, whether the cache keeps the window only (transformers' own) or every token."""
    ids = _ids(30, seed=1)
    keys, values = prefill(tiny_gemma, ids[:20])
    cache = kv_to_cache(keys, values, tiny_gemma.config, full_layers=full_layers)
    assert cache.layers[0].keys.shape[2] == (20 if full_layers else 7)
    assert cache.layers[2].keys.shape[2] == 20  # the global layer keeps everything
    with torch.no_grad():
        out = tiny_gemma.model(torch.tensor([ids[20:]]), past_key_values=cache, use_cache=True)
    torch.testing.assert_close(out.logits[0], _logits(tiny_gemma, ids)[20:], atol=1e-4, rtol=1e-4)
    if full_layers:
        torch.testing.assert_close(cache_to_kv(cache)[0], prefill(tiny_gemma, ids)[0], atol=1e-5, rtol=1e-5)


def test_rotary_tables_follow_each_layers_rope(tiny_gemma):
    """Post-RoPE keys = the layer type's table applied to the model's pre-RoPE keys, and the
    codec's per-layer RoPE removes exactly that rotation."""
    ids = _ids(12, seed=2)
    keys, _ = prefill(tiny_gemma, ids)
    rotary = tiny_gemma.model.model.rotary_emb
    kinds = layer_types(rotary, 4)
    assert kinds == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    ropes = model_ropes(rotary, 4)
    assert model_rope(rotary) is None  # one RoPE per layer type, none for the module as a whole
    assert not np.array_equal(ropes[2].inv_freq, ropes[0].inv_freq)
    assert np.array_equal(ropes[0].inv_freq, ropes[3].inv_freq)
    for layer, pre in enumerate(_pre_rope_keys(tiny_gemma, ids)):
        cos, sin = rotary_table(rotary, 12, layer_type=kinds[layer])
        torch.testing.assert_close(apply_rotary(pre, cos, sin), keys[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unrotate(keys[layer].float(), ropes[layer], 0), pre, atol=1e-4, rtol=1e-4)
    moved = reposition_keys(keys[2], rotary, range(12), range(5, 17), layer_type="full_attention")
    cos, sin = rotary_table(rotary, 17, layer_type="full_attention")
    torch.testing.assert_close(moved, apply_rotary(_pre_rope_keys(tiny_gemma, ids)[2], cos[5:], sin[5:]),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layer_type: None not one of"):
        rotary_table(rotary, 4)


def test_blend_at_full_ratio_equals_a_full_prefill(tiny_gemma):
    """Chunks computed alone and fused past the sliding window: ratio 1 gives the model's logits
    and KV, and decoding continues as from the model's own prefill."""
    prefix, c1, c2, suffix = _ids(3, 3), _ids(9, 4), _ids(11, 5), _ids(4, 6)
    chunks = [(c, *prefill(tiny_gemma, c)) for c in (c1, c2)]
    whole = prefix + c1 + c2 + suffix
    res = blend(tiny_gemma, prefix, chunks, suffix, ratio=1.0)
    torch.testing.assert_close(res.logits_last, _logits(tiny_gemma, whole)[-1], atol=1e-4, rtol=1e-4)
    exact = prefill(tiny_gemma, whole)
    torch.testing.assert_close(res.keys, exact[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.values, exact[1], atol=1e-4, rtol=1e-4)
    assert res.cache.layers[0].keys.shape[2] == 7  # transformers' sliding-window layer: its window
    steps = generate_greedy(tiny_gemma, res, 5)
    with torch.no_grad():
        ref = tiny_gemma.model.generate(torch.tensor([whole]), max_new_tokens=5, do_sample=False)[0, len(whole):]
    assert steps == ref.tolist()


def test_blend_moves_each_layers_keys_with_its_own_rope(tiny_gemma):
    """Naive reuse (ratio 0): layer 0's keys depend on the token alone, so a chunk computed at
    positions from 0 and moved to its place equals the full prefill's keys there."""
    prefix, chunk, suffix = _ids(6, 7), _ids(10, 8), _ids(2, 9)
    keys, values = prefill(tiny_gemma, chunk)
    kept = keys.clone()
    res = blend(tiny_gemma, prefix, [(chunk, keys, values)], suffix, ratio=0.0)
    exact, _ = prefill(tiny_gemma, prefix + chunk + suffix)
    torch.testing.assert_close(res.keys[0, :, 6:16], exact[0, :, 6:16], atol=1e-4, rtol=1e-4)
    assert torch.equal(keys, kept)  # the caller's chunk is not modified


@pytest.mark.slow
def test_calibrated_profile_carries_a_rope_per_layer(tiny_gemma, tmp_path):
    """calibrate on the tiny Gemma: keys coded before each layer's own RoPE; the profile file keeps
    the per-layer tables and streams round-trip with it."""
    from kvcodec.client.calibrate import calibrate_tokens
    from kvcodec.client.quality import QualityProbe

    ids = [_ids(64, seed) for seed in (10, 11)]
    prof = calibrate_tokens(tiny_gemma, ids, ["a", "b"], prefix_len=48, eval_len=16, transform="mixed",
                            fixed={"high": 0.05, "balanced": 0.2, "compact": 0.8}, prediction=False,
                            log=lambda m: None)
    ropes = model_ropes(tiny_gemma.model.model.rotary_emb, 4)
    assert prof.rope_inv_freq.shape == (4, 16)
    for layer in range(4):
        assert np.array_equal(prof.rope(layer).inv_freq, ropes[layer].inv_freq)
        assert np.array_equal(prof.transform(layer, False).rope.inv_freq, ropes[layer].inv_freq)
    path = tmp_path / "tiny-gemma.json"
    prof.save(path)
    back = profile_from_json(json.loads(path.read_text()))
    assert back.digest == prof.digest and np.array_equal(back.rope_inv_freq, prof.rope_inv_freq)
    k, v = QualityProbe(tiny_gemma, ids[0], 48, 16).exact_kv
    kv = decode(encode(k.half(), v.half(), level="high", profile=back), profile=back)
    assert (kv.keys.float() - k).abs().mean() < 0.2 * k.abs().mean()
    assert (kv.values.float() - v).abs().mean() < 0.2 * v.abs().mean()
    body = json.loads(path.read_text())
    body["transform"]["rope_inv_freq"] = body["transform"]["rope_inv_freq"][:3]  # 3 lists for 4 layers
    from kvcodec.codec.profile import _digest

    body["sha256"] = _digest(body)
    with pytest.raises(InvalidInput, match=r"rope_inv_freq must be .* or 4 such lists .* shape \(3, 16\)"):
        profile_from_json(body)
