"""``kvcodec store …`` end to end, in-process, on a local store and on Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvcodec.cli import main
from kvcodec.codec import verify
from kvcodec.codec.kvfile import write_kv
from kvcodec.store import KeySpec, open_store

TOKENS = 600


@pytest.fixture(scope="module")
def kv_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kv") / "doc.safetensors"
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn((2, 1, TOKENS, 16), generator=gen).half()
    values = torch.randn((2, 1, TOKENS, 16), generator=gen).half()
    write_kv(path, keys, values, model="tiny-llama", token_ids=list(range(100, 100 + TOKENS)))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expected_keys(tenant: str = "") -> list[str]:
    spec = KeySpec(model="tiny-llama", tokenizer="tiny-llama", layers=2, kv_heads=1, head_dim=16,
                   dtype="float16", codec_profile="balanced", tenant=tenant)
    return [k.hex for k in spec.chunk_keys(range(100, 100 + TOKENS))]


def test_put_get_has_ls_rm(capsys, tmp_path: Path, kv_file: Path) -> None:
    url = str(tmp_path / "store")
    code, out, _ = run(capsys, "store", "--url", url, "put", str(kv_file))
    assert code == 0 and out.split() == expected_keys()
    code, out, _ = run(capsys, "store", "--url", url, "put", str(kv_file), "--json")
    rows = json.loads(out)
    assert [r["token_count"] for r in rows] == [256, 256, 88] and not any(r["created"] for r in rows)
    first = expected_keys()[0]
    assert run(capsys, "store", "--url", url, "get", first, str(tmp_path / "c.kvc"))[0] == 0
    info = verify((tmp_path / "c.kvc").read_bytes())
    assert (info.tokens, info.level, info.model) == (256, "balanced", "tiny-llama")
    assert run(capsys, "store", "--url", url, "has", first)[:2] == (0, "yes\n")
    assert sorted(run(capsys, "store", "--url", url, "ls")[1].split()) == sorted(expected_keys())
    assert run(capsys, "store", "--url", url, "rm", first)[0] == 0
    assert run(capsys, "store", "--url", url, "has", first)[:2] == (1, "no\n")
    code, _, err = run(capsys, "store", "--url", url, "get", first, str(tmp_path / "d.kvc"))
    assert code == 1 and "not in the store" in err and not (tmp_path / "d.kvc").exists()
    assert run(capsys, "store", "--url", url, "rm", first)[0] == 1


def test_tenant_changes_keys_and_hides_entries(capsys, tmp_path: Path, kv_file: Path) -> None:
    url = str(tmp_path / "store")
    run(capsys, "store", "--url", url, "put", str(kv_file))
    code, out, _ = run(capsys, "store", "--url", url, "--tenant", "acme", "put", str(kv_file))
    assert out.split() == expected_keys("acme") and not set(out.split()) & set(expected_keys())
    assert run(capsys, "store", "--url", url, "--tenant", "acme", "has", expected_keys()[0])[0] == 1


def test_verify_stats_gc(capsys, tmp_path: Path, kv_file: Path) -> None:
    url = str(tmp_path / "store")
    run(capsys, "store", "--url", url, "put", str(kv_file))
    assert run(capsys, "store", "--url", url, "verify")[0] == 0
    victim = next((tmp_path / "store" / "objects").rglob(expected_keys()[1]))
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, out, _ = run(capsys, "store", "--url", url, "verify", "--keep")
    assert code == 1 and f"BAD {expected_keys()[1]}" in out
    assert run(capsys, "store", "--url", url, "verify")[0] == 1
    assert run(capsys, "store", "--url", url, "verify")[0] == 0  # removed the first time
    stats = json.loads(run(capsys, "store", "--url", url, "stats", "--json")[1])
    assert stats["entries"] == 2 and stats["health"]["ok"] is True
    assert run(capsys, "store", "--url", url, "gc", "--max-bytes", "0")[0] == 0
    assert run(capsys, "store", "--url", url, "ls")[1] == "\n"


def test_default_url_from_environment(capsys, tmp_path: Path, kv_file: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVCODEC_STORE", str(tmp_path / "env-store"))
    assert run(capsys, "store", "put", str(kv_file))[0] == 0
    assert sorted(open_store(str(tmp_path / "env-store")).keys()) == sorted(expected_keys())


def test_redis_url(capsys, redis_server, kv_file: Path) -> None:
    redis_server.client().flushall()
    code, out, _ = run(capsys, "store", "--url", redis_server.url, "put", str(kv_file),
                       "--mode", "position_free", "--no-tail")
    assert code == 0 and len(out.split()) == 2
    assert run(capsys, "store", "--url", redis_server.url, "verify")[0] == 0


@pytest.mark.parametrize(("argv", "code", "text"), [
    (["get", "nothex", "x.kvc"], 2, "64 lowercase hex"),
    (["put", "missing.safetensors"], 2, "no such file"),
    (["put", "{kv}", "--level", "ultra"], 2, "--level"),
    (["put", "{kv}", "--chunk-tokens", "0"], 2, "--chunk-tokens"),
    (["gc", "--max-bytes", "-1"], 2, "--max-bytes"),
])
def test_usage_errors(capsys, tmp_path: Path, kv_file: Path, argv, code, text) -> None:
    argv = [a.replace("{kv}", str(kv_file)) for a in argv]
    got, _, err = run(capsys, "store", "--url", str(tmp_path / "s"), *argv)
    assert got == code and text in err


def test_bad_url_and_missing_token_ids(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "store", "--url", "ftp://x/y", "ls")
    assert code == 2 and "scheme 'ftp'" in err
    bare = tmp_path / "bare.safetensors"
    write_kv(bare, torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), model="m")
    code, _, err = run(capsys, "store", "--url", str(tmp_path / "s"), "put", str(bare))
    assert code == 1 and "token_ids" in err


def test_s3_url_with_endpoint_from_environment(capsys, moto_s3, kv_file: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    url = f"s3://{moto_s3.new_bucket()}/cli"
    code, out, _ = run(capsys, "store", "--url", url, "put", str(kv_file))
    assert code == 0 and out.split() == expected_keys()
    assert sorted(run(capsys, "store", "--url", url, "ls")[1].split()) == sorted(expected_keys())
    assert run(capsys, "store", "--url", url, "verify")[0] == 0
