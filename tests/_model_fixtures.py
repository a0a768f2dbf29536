"""Fixtures for the real-model side (kvcodec.client.model, hf_bridge, quality).

``smollm2``     session-scoped SmolLM2-135M-Instruct (tests using it carry
                ``@pytest.mark.model``); skipped only when the GGUF is absent.
``tiny_llama``  session-scoped random-initialized 2-layer Llama (GQA: 4 heads,
                2 KV heads, head_dim 16, vocab 128): fast, no download.
``tiny_gemma``  session-scoped random-initialized 4-layer Gemma 3 (sliding window 8 on
                layers 0, 1 and 3, RoPE base 10k there and 1M on the global layer 2;
                2 heads, 1 KV head, head_dim 32): Gemma's structure without a download.
``gpl_text``    path of a real English text on the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def make_tiny_llama(seed: int = 0, *, layers: int = 2, vocab: int = 128):
    """Return a random-initialized tiny Llama wrapped as a ``LoadedModel``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcodec.client.model import from_model

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return from_model(model, name=f"tiny-llama-{layers}l-seed{seed}")


def make_tiny_gemma(seed: int = 0, *, window: int = 8):
    """Return a random-initialized tiny Gemma 3 (text) wrapped as a ``LoadedModel``."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from kvcodec.client.model import from_model

    config = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # random norms: Gemma's RMSNorm weights start at 0 (scale 1)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    return from_model(model, name=f"tiny-gemma3-seed{seed}")


@pytest.fixture(scope="session")
def tiny_gemma():
    """A tiny random Gemma 3 with sliding-window layers (LoadedModel, tokenizer None)."""
    return make_tiny_gemma()


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random Llama (LoadedModel, tokenizer None)."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (LoadedModel); skipped if the GGUF is absent."""
    from kvcodec.client.model import default_model_path, load_model

    path = default_model_path()
    if not path.exists():
        pytest.skip(f"SmolLM2 GGUF not found at {path}: run scripts/get_model.sh")
    return load_model(path)


@pytest.fixture(scope="session")
def gpl_text() -> Path:
    """A real text file (Debian's GPL-3 text)."""
    if not GPL3.is_file():
        pytest.skip(f"{GPL3} not present")
    return GPL3
