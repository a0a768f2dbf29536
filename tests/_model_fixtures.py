"""Fixtures for the real-model side (kvcodec.client.model, hf_bridge, quality).

``smollm2``     session-scoped SmolLM2-135M-Instruct (tests using it carry
                ``@pytest.mark.model``); skipped only when the GGUF is absent.
``tiny_llama``  session-scoped random-initialized 2-layer Llama (GQA: 4 heads,
                2 KV heads, head_dim 16, vocab 128): fast, no download.
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
