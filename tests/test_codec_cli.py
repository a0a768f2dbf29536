"""``kvcodec encode | decode | inspect | verify``: in-process and as a subprocess.

Exit codes: 0 ok, 1 bad or corrupt data, 2 usage. Bad input never prints a
traceback, and a failed command never leaves an output file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcodec.cli import main
from kvcodec.codec.kvfile import read_kv, write_kv

GOLDEN = Path(__file__).parent / "golden"
KV_IN = GOLDEN / "kv_small_fp16.safetensors"
VENV_BIN = Path(sys.executable).parent
INSPECT_FIELDS = ("level", "layers", "kv_heads", "tokens", "head_dim", "total_bytes",
                  "side_info_bytes", "bits_per_element")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


@pytest.fixture
def kvc(tmp_path: Path, capsys) -> Path:
    """A balanced .kvc of the golden input, written by the CLI."""
    path = tmp_path / "small.kvc"
    code, _, _ = run(capsys, "encode", KV_IN, path, "--token-block", "8")
    assert code == 0
    return path


def corrupt(path: Path, dest: Path, offset: int = -5) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("level", ["lossless", "high", "balanced", "compact"])
def test_encode_inspect_decode_roundtrip(tmp_path, capsys, level):
    kvc_path, out_path = tmp_path / "a.kvc", tmp_path / "out.safetensors"
    code, out, _ = run(capsys, "encode", KV_IN, kvc_path, "--level", level, "--token-block", "8")
    assert code == 0 and str(kvc_path) in out and "bits/element" in out
    code, out, _ = run(capsys, "inspect", kvc_path, "--json")
    info = json.loads(out)
    assert code == 0 and set(INSPECT_FIELDS) <= set(info)
    assert (info["level"], info["layers"], info["kv_heads"], info["tokens"], info["head_dim"]) == (
        level, 2, 2, 20, 8)
    assert info["total_bytes"] == kvc_path.stat().st_size
    assert info["bits_per_element"] == pytest.approx(8 * info["total_bytes"] / (2 * 2 * 2 * 20 * 8))
    assert 0 < info["side_info_bytes"] <= info["total_bytes"]
    code, out, _ = run(capsys, "decode", kvc_path, out_path)
    assert code == 0 and out_path.exists()
    src, got = read_kv(KV_IN), read_kv(out_path)
    assert got.model == src.model and got.keys.dtype == src.keys.dtype
    assert got.keys.shape == src.keys.shape
    if level == "lossless":
        assert torch.equal(got.keys.view(torch.int16), src.keys.view(torch.int16))
        assert torch.equal(got.values.view(torch.int16), src.values.view(torch.int16))
    else:
        assert (got.keys.float() - src.keys.float()).abs().max() < 0.5 * src.keys.float().abs().max()
    code, out, _ = run(capsys, "verify", kvc_path)
    assert code == 0 and "ok" in out


def test_encode_json_and_inspect_text(tmp_path, capsys, kvc):
    code, out, _ = run(capsys, "encode", KV_IN, tmp_path / "b.kvc", "--json", "--level", "compact")
    assert code == 0 and json.loads(out)["level"] == "compact"
    code, out, _ = run(capsys, "inspect", kvc)
    assert code == 0 and "bits_per_element" in out and "balanced" in out


def test_decode_to_other_dtype(tmp_path, capsys, kvc):
    out_path = tmp_path / "f32.safetensors"
    code, _, _ = run(capsys, "decode", kvc, out_path, "--dtype", "float32", "--threads", "2")
    assert code == 0 and read_kv(out_path).keys.dtype == torch.float32


def test_verify_exit_codes(tmp_path, capsys, kvc):
    bad = corrupt(kvc, tmp_path / "bad.kvc")
    code, _, err = run(capsys, "verify", bad)
    assert code == 1 and "FAILED" in err and "crc32" in err
    code, _, err = run(capsys, "verify", "--quick", bad)
    assert code == 1
    code, out, _ = run(capsys, "verify", "--json", kvc, bad)
    results = json.loads(out)
    assert code == 1 and [r["ok"] for r in results] == [True, False]
    assert results[1]["kind"] == "ChecksumMismatch"
    code, _, err = run(capsys, "verify", tmp_path / "missing.kvc")
    assert code == 2 and "no such file" in err


@pytest.mark.parametrize("command", ["decode", "inspect", "verify"])
def test_corrupt_truncated_and_foreign_streams_exit_1(tmp_path, capsys, kvc, command):
    truncated = tmp_path / "trunc.kvc"
    truncated.write_bytes(kvc.read_bytes()[:100])
    concatenated = tmp_path / "two.kvc"
    concatenated.write_bytes(kvc.read_bytes() * 2)
    for bad, text in (
        (corrupt(kvc, tmp_path / "bad.kvc", offset=2), "magic"),
        (truncated, "ends at byte 100"),
        (concatenated, "after the last substream"),
        (KV_IN, "magic"),  # a safetensors file is not a stream
    ):
        out_path = tmp_path / "out.safetensors"
        args = [command, bad] + ([out_path] if command == "decode" else [])
        code, _, err = run(capsys, *args)
        assert code == 1, (bad, err)
        assert err.startswith("kvcodec: error:") or "FAILED" in err
        assert text in err, err
        assert not out_path.exists()


def test_payload_corruption_on_decode_names_the_substream(tmp_path, capsys, kvc):
    bad = corrupt(kvc, tmp_path / "bad.kvc")
    out_path = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "decode", bad, out_path)
    assert code == 1 and "substream" in err and "crc32" in err
    assert not out_path.exists()
    assert not list(tmp_path.glob(".out.safetensors.*"))  # no temporary left either


def test_encode_failures_leave_no_output(tmp_path, capsys, kvc):
    out_path = tmp_path / "out.kvc"
    cases = [
        (["encode", tmp_path / "missing.safetensors", out_path], 2, "no such file"),
        (["encode", kvc, out_path], 1, "not a readable safetensors"),
        (["encode", KV_IN, out_path, "--level", "ultra"], 2, "invalid choice: 'ultra'"),
        (["encode", KV_IN, out_path, "--token-block", "0"], 2, "--token-block: 0"),
        (["encode", KV_IN, tmp_path / "nodir" / "x.kvc"], 2, "does not exist"),
        (["encode", tmp_path, out_path], 2, "no such file"),
    ]
    for argv, expected, text in cases:
        code, _, err = run(capsys, *argv)
        assert code == expected, (argv, err)
        assert text in err, (argv, err)
        assert not out_path.exists()
    assert not list(tmp_path.glob(".out.kvc.*"))


def test_encode_refuses_nan_with_lossy_level_naming_the_tensor(tmp_path, capsys):
    keys = torch.zeros(1, 1, 4, 2, dtype=torch.float16)
    keys[0, 0, 1, 1] = float("nan")
    src = tmp_path / "nan.safetensors"
    write_kv(src, keys, torch.zeros_like(keys), model="m")
    code, _, err = run(capsys, "encode", src, tmp_path / "nan.kvc")
    assert code == 1 and "keys: 1 non-finite" in err
    assert not (tmp_path / "nan.kvc").exists()
    code, _, _ = run(capsys, "encode", src, tmp_path / "nan.kvc", "--level", "lossless")
    assert code == 0


def test_kv_file_missing_a_tensor(tmp_path, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "half.safetensors"
    save_file({"keys": torch.zeros(1, 1, 2, 2)}, str(src))
    code, _, err = run(capsys, "encode", src, tmp_path / "x.kvc")
    assert code == 1 and "missing tensor(s) values" in err


def test_usage_errors(capsys, kvc):
    assert run(capsys)[0] == 2
    assert run(capsys, "inspect")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "decode", kvc, "out.safetensors", "--dtype", "int8")[0] == 2
    code, out, _ = run(capsys, "encode", "--help")
    assert code == 0 and "lossless" in out


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_subprocess_python_m_round_trip(tmp_path):
    kvc_path = tmp_path / "s.kvc"
    proc = subprocess.run(
        [sys.executable, "-m", "kvcodec.cli", "encode", str(KV_IN), str(kvc_path), "--level", "high"],
        capture_output=True, text=True, timeout=120, env=_cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kvcodec.cli", "inspect", "--json", str(kvc_path)],
                          capture_output=True, text=True, timeout=120, env=_cli_env())
    assert proc.returncode == 0 and json.loads(proc.stdout)["level"] == "high"


def test_subprocess_console_script_exit_codes(tmp_path):
    script = shutil.which("kvcodec", path=_cli_env()["PATH"])
    if script is None:
        pytest.skip("the kvcodec console script is not installed")
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(b"\x89KVC\r\n\x1a\n" + bytes(40))
    proc = subprocess.run([script, "verify", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "kvcodec: error:" in proc.stderr or "FAILED" in proc.stderr
    proc = subprocess.run([script, "encode", str(KV_IN), str(tmp_path / "o.kvc"), "--level", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.kvc").exists()
