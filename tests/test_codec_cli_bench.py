"""``kvcodec bench``: size and speed of every level, as a table or JSON."""

from __future__ import annotations

import json

import torch

from kvcodec.cli import main
from kvcodec.codec.kvfile import write_kv


def test_bench_synthetic_json(capsys) -> None:
    assert main(["bench", "--shape", "2,2,40,16", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == [2, 2, 40, 16]
    rows = {r["level"]: r for r in out["rows"]}
    assert set(rows) == {"lossless", "high", "balanced", "compact"}
    assert rows["lossless"]["max_abs_error"] == 0.0
    assert rows["compact"]["bits_per_element"] < rows["balanced"]["bits_per_element"] < rows["high"]["bits_per_element"]
    assert all(r["encode_mb_s"] > 0 and r["decode_mb_s"] > 0 for r in rows.values())


def test_bench_kv_file_table(tmp_path, capsys) -> None:
    path = tmp_path / "kv.safetensors"
    write_kv(path, torch.randn(1, 2, 24, 8).half(), torch.randn(1, 2, 24, 8).half(), model="t")
    assert main(["bench", "--kv", str(path), "--levels", "balanced", "--repeats", "1"]) == 0
    assert "balanced" in capsys.readouterr().out


def test_bench_bad_shape_is_a_usage_error(capsys) -> None:
    assert main(["bench", "--shape", "1,2,3"]) == 2
    assert "--shape" in capsys.readouterr().err
