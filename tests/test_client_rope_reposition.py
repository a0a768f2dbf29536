"""Re-rotated keys equal keys computed directly at the new positions, for every RoPE type."""

from __future__ import annotations

import pytest
import torch

from kvcodec.client.rope import (
    RopeError,
    apply_rotary,
    remove_rotary,
    reposition_keys,
    rotary_table,
)

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    },
    "yarn": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
        "original_max_position_embeddings": 16,
    },
}
MAX_POS = 32  # small, so the fused context (> 32) exercises dynamic-NTK growth


def _tiny(rope: dict, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=MAX_POS, rope_parameters=dict(rope),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _keys_at(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Keys [layers, kv_heads, tokens, head_dim] from a forward pass at ``positions``."""
    fresh = type(model)(model.config).eval()  # a fresh rotary state (dynamic NTK is stateful)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = fresh(ids[None], position_ids=positions[None], use_cache=True)
    return torch.stack([layer.keys[0] for layer in out.past_key_values.layers])


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_reposition_equals_direct_computation(rope: str) -> None:
    model = _tiny(ROPES[rope])
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(1))
    old, new = torch.arange(20), torch.arange(20) + 37
    direct = _keys_at(model, ids, new)
    moved = reposition_keys(_keys_at(model, ids, old), model.model.rotary_emb, old, new)
    # Layer 0's pre-RoPE keys do not depend on positions: the check is exact for every type.
    torch.testing.assert_close(moved[0], direct[0], atol=2e-6, rtol=1e-5)
    assert not torch.allclose(_keys_at(model, ids, old)[0], direct[0], atol=1e-2)
    if rope != "dynamic":
        # Relative-position invariance: deeper layers agree too (frequencies do not change).
        torch.testing.assert_close(moved, direct, atol=2e-5, rtol=1e-4)


def test_yarn_attention_factor_is_divided_out() -> None:
    model = _tiny(ROPES["yarn"])
    assert model.model.rotary_emb.attention_scaling != pytest.approx(1.0)
    cos, sin = rotary_table(model.model.rotary_emb, 40)
    x = torch.randn(2, 3, 40, 16)
    torch.testing.assert_close(remove_rotary(apply_rotary(x, cos, sin), cos, sin), x)


def test_dynamic_uses_the_new_context_length() -> None:
    model = _tiny(ROPES["dynamic"])
    short = rotary_table(model.model.rotary_emb, MAX_POS)[0]
    long = rotary_table(model.model.rotary_emb, 4 * MAX_POS)[0]
    assert not torch.allclose(short[:MAX_POS], long[:MAX_POS])
    # the model's own module is left untouched (no growth recorded)
    assert model.model.rotary_emb.max_seq_len_cached == MAX_POS


def test_partial_rotary_leaves_the_tail() -> None:
    x = torch.randn(1, 2, 5, 16)
    angle = torch.rand(5, 4).repeat(1, 2) * 6.0  # RoPE tables repeat their angles per half
    cos, sin = 1.3 * angle.cos(), 1.3 * angle.sin()
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(remove_rotary(y, cos, sin), x)


def test_errors_name_the_field() -> None:
    model = _tiny(ROPES["default"], layers=1)
    keys = torch.randn(1, 2, 4, 16)
    with pytest.raises(RopeError, match="positions: 3 old"):
        reposition_keys(keys, model.model.rotary_emb, range(3), range(4))
    with pytest.raises(RopeError, match="negative position"):
        reposition_keys(keys, model.model.rotary_emb, [-1, 0, 1, 2], range(4))
    with pytest.raises(RopeError, match="context_len"):
        reposition_keys(keys, model.model.rotary_emb, range(4), range(4), new_context_len=2)


@pytest.mark.model
def test_reposition_smollm2_matches_prefill_at_offset(smollm2) -> None:
    model = smollm2.model
    ids = torch.tensor(smollm2.tokenizer("The quick brown fox jumps over the lazy dog, " * 6)
                       ["input_ids"][:48])
    old, new = torch.arange(48), torch.arange(48) + 700
    with torch.no_grad():
        direct = torch.stack([lay.keys[0] for lay in model(
            ids[None], position_ids=new[None], use_cache=True).past_key_values.layers])
        base = torch.stack([lay.keys[0] for lay in model(
            ids[None], position_ids=old[None], use_cache=True).past_key_values.layers])
    moved = reposition_keys(base, model.model.rotary_emb, old, new)
    torch.testing.assert_close(moved[0], direct[0], atol=1e-5, rtol=1e-5)
    err = (moved - direct).abs().max() / direct.abs().max()
    assert err < 1e-4, f"relative error {err:.2e} across layers"
