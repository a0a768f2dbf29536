"""``kvcodec serve`` as a real process (no arguments, env config, SIGTERM drain) and
``kvcodec client`` against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _service_fixtures import toy_context, toy_kv
from _store_fixtures import free_port

from kvcodec.cli import main
from kvcodec.client.grpc_client import CacheClient, encode_chunks, put_messages
from kvcodec.codec.kvfile import write_kv

KVCODEC = str(Path(sys.executable).parent / "kvcodec")


@pytest.fixture
def served(tmp_path):
    """`kvcodec serve` with no arguments; port and calibration via the environment."""
    port = free_port()
    env = {**os.environ, "HOME": str(tmp_path), "KVCODEC_LISTEN": f"127.0.0.1:{port}",
           "KVCODEC_CALIBRATE": "false", "KVCODEC_GRACE_S": "5"}
    env.pop("KVCODEC_STORE", None)
    proc = subprocess.Popen([KVCODEC, "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert f"listening on 127.0.0.1:{port}" in line, line + proc.stderr.read()
    yield proc, f"127.0.0.1:{port}", tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_serve_defaults_and_client_cli(served, tmp_path, capsys):
    proc, address, home = served
    assert main(["client", "--server", address, "health"]) == 0
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=31)
    keys, values = toy_kv(ctx, 31)
    kvfile = tmp_path / "doc.safetensors"
    write_kv(kvfile, keys, values, model=ctx.layout.model, token_ids=list(ctx.token_ids))
    common = ["--chunk-tokens", "32", "--fingerprint", ctx.layout.model_fingerprint,
              "--tokenizer", ctx.layout.tokenizer]
    assert main(["client", "--server", address, "put", str(kvfile), "--level", "high", *common]) == 0
    capsys.readouterr()
    assert main(["client", "--server", address, "--json", "lookup", str(kvfile), *common]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [sorted(r["levels"]) for r in rows] == [["high"], ["high"]]
    out = tmp_path / "fetched.safetensors"
    assert main(["client", "--server", address, "get", str(kvfile), "--level", "high",
                 "-o", str(out), *common]) == 0
    assert out.exists()
    assert main(["client", "--server", address, "get", str(kvfile), "--level", "compact",
                 *common]) == 1
    capsys.readouterr()
    assert main(["client", "--server", address, "--json", "plan", str(kvfile), "--prefill-tps",
                 "50", *common]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [d["action"] for d in plan["decisions"]] == ["LOAD_KV", "LOAD_KV"]
    # the default store is the embedded local store under the user's cache
    assert any((home / ".cache" / "kvcodec").rglob("*")), "default local store not used"
    assert main(["client", "--server", address, "lookup"]) == 2  # usage: no context
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert {"serving", "draining", "stopped"} <= {entry["msg"] for entry in logs}
    assert any(e["msg"] == "rpc" and e["method"] == "Put" and e["code"] == "OK" for e in logs)
    assert main(["client", "--server", address, "--timeout", "2", "health"]) == 1


def test_sigterm_drains_in_flight_put(served):
    proc, address, _ = served
    ctx = toy_context(tokens=64, chunk_tokens=32, seed=32)
    chunks = encode_chunks(ctx, *toy_kv(ctx, 32), level="high")
    started, release = threading.Event(), threading.Event()

    def slow():
        msgs = list(put_messages(ctx, chunks, piece=64))
        yield from msgs[:2]
        started.set()
        release.wait(10)
        yield from msgs[2:]

    with CacheClient(address) as client:
        future = client.stub.Put.future(slow(), timeout=20)
        assert started.wait(5)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still draining
        release.set()
        assert [r.created for r in future.result().results] == [True, True]
    assert proc.wait(15) == 0
