"""Gemma 3 270M end to end: layout, prefill, a loaded cache against the model's own logits,
encode/decode, the store and the service, blend and the quality probe. One model load for the
module; skipped (with the reason) when the GGUF has not been fetched (scripts/get_gemma.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcodec.client.model import MODELS

pytestmark = [pytest.mark.model, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PREFIX = 600  # past the 512-token sliding window


@pytest.fixture(scope="module")
def gemma():
    from kvcodec.client.model import load_model

    path = MODELS["gemma3-270m"].path
    if not path.exists():
        pytest.skip(f"Gemma 3 270M GGUF not found at {path}: run scripts/get_gemma.sh")
    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def gpl_ids(gemma, gpl_text):
    from kvcodec.client.model import tokenize_file

    return tokenize_file(gemma, gpl_text, PREFIX + 64)


@pytest.fixture(scope="module")
def gpl_kv(gemma, gpl_ids):
    from kvcodec.client.model import prefill

    return prefill(gemma, gpl_ids[:PREFIX])


def test_layout(gemma):
    from kvcodec.codec.transform import model_ropes

    assert (gemma.num_layers, gemma.num_kv_heads, gemma.head_dim) == (18, 1, 256)
    assert gemma.sliding_window == 512
    assert gemma.sliding_layers == tuple(i for i in range(18) if i % 6 != 5)
    ropes = model_ropes(gemma.model.model.rotary_emb, 18)
    # base 10k on the sliding-window layers, 1M on the global ones: inv_freq[1] = base ** (-2 / 256)
    assert ropes[0].inv_freq[1] == pytest.approx(10_000.0 ** (-2 / 256), rel=1e-6)
    assert ropes[5].inv_freq[1] == pytest.approx(1_000_000.0 ** (-2 / 256), rel=1e-6)


def test_loaded_cache_reproduces_the_models_logits(gemma, gpl_ids, gpl_kv):
    """The prefill's KV loaded into transformers' cache (sliding-window layers keep their window),
    then 16 more tokens: the logits of one forward pass over all of them."""
    from kvcodec.client.hf_bridge import kv_to_cache

    keys, values = gpl_kv
    assert keys.shape == values.shape == (18, 1, PREFIX, 256)
    cache = kv_to_cache(keys, values, gemma.config)
    assert cache.layers[0].keys.shape[2] == 511 and cache.layers[5].keys.shape[2] == PREFIX
    tail = torch.tensor([gpl_ids[PREFIX : PREFIX + 16]])
    with torch.no_grad():
        loaded = gemma.model(tail, past_key_values=cache, use_cache=True).logits[0]
        full = gemma.model(torch.tensor([gpl_ids[: PREFIX + 16]]), use_cache=False, logits_to_keep=16).logits[0]
    torch.testing.assert_close(loaded, full, atol=2e-3, rtol=1e-3)
    assert torch.equal(loaded.argmax(-1), full.argmax(-1))


def test_encode_decode_without_a_profile(gemma, gpl_kv):
    from kvcodec.codec import decode, encode, inspect

    keys, values = (t.half() for t in gpl_kv)
    lossless = encode(keys, values, level="lossless", model=gemma.name, profile=None)
    kv = decode(lossless)
    assert torch.equal(kv.keys, keys) and torch.equal(kv.values, values)
    blob = encode(keys, values, level="balanced", model=gemma.name, profile=None)
    info = inspect(blob)
    assert (info.layers, info.kv_heads, info.tokens, info.head_dim) == (18, 1, PREFIX, 256)
    assert info.bits_per_element < 5.0 and len(blob) < len(lossless) / 2
    kv = decode(blob)
    rel = (kv.keys.float() - keys.float()).norm() / keys.float().norm()
    assert rel < 0.05


def test_cli_prefill_then_encode_and_decode(gemma, gpl_text, tmp_path, capsys):
    from kvcodec.cli import main
    from kvcodec.codec.kvfile import read_kv

    kv_path, blob, back = tmp_path / "g.safetensors", tmp_path / "g.kvc", tmp_path / "g2.safetensors"
    rc = main(["prefill", "--model", "gemma3-270m", "--text", str(gpl_text), "--out", str(kv_path),
               "--max-tokens", "40", "--dtype", "float16"])
    assert rc == 0, capsys.readouterr().err
    kv = read_kv(kv_path)
    assert tuple(kv.keys.shape) == (18, 1, 40, 256) and kv.model == gemma.name
    assert main(["encode", str(kv_path), str(blob), "--level", "lossless"]) == 0
    assert main(["decode", str(blob), str(back)]) == 0
    again = read_kv(back)
    assert torch.equal(again.keys, kv.keys) and torch.equal(again.values, kv.values)


def test_store_and_service_round_trip(gemma, gpl_ids, gpl_kv):
    """Chunks of Gemma's layout through the store's keys and a real gRPC server."""
    from kvcodec.client.grpc_client import CacheClient, CacheContext, ModelLayout
    from kvcodec.codec import encode
    from kvcodec.service.config import build_config
    from kvcodec.service.server import CacheServer
    from kvcodec.store import KeySpec, open_store

    keys, values = (t.half() for t in gpl_kv)
    layout = ModelLayout.from_loaded(gemma)
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (18, 1, 256)
    spec = KeySpec(model=gemma.name, model_fingerprint=gemma.fingerprint, tokenizer=layout.tokenizer,
                   layers=18, kv_heads=1, head_dim=256, dtype="float16", codec_profile="balanced")
    store = open_store("memory://")
    for key in spec.chunk_keys(gpl_ids[:PREFIX], chunk_tokens=256):
        part = slice(key.token_start, key.token_start + key.token_count)
        store.put(key.hex, encode(keys[:, :, part], values[:, :, part], level="balanced", model=gemma.name,
                                  first_position=key.token_start, profile=None))
        assert store.get(key.hex) is not None
    server = CacheServer(build_config(overrides={"listen": "127.0.0.1:0", "store": "memory://",
                                                 "calibrate": False})).start()
    try:
        ctx = CacheContext(layout, token_ids=gpl_ids[:PREFIX], chunk_tokens=256)
        with CacheClient(server.address) as client:
            client.put_kv(ctx, keys, values, level="lossless")
            chunks = client.fetch_kv(ctx, level="lossless")
        assert torch.equal(torch.cat([c.kv.keys for c in chunks], dim=2), keys)
        assert torch.equal(torch.cat([c.kv.values for c in chunks], dim=2), values)
    finally:
        server.stop(0)


@pytest.mark.slow
def test_blend_at_full_ratio_reproduces_the_model(gemma, gpl_ids):
    """Two chunks computed alone, fused past the sliding window: ratio 1 gives the model's own
    next-token logits; the default ratio comes closer to them than the naive reuse."""
    from kvcodec.client.blend import blend
    from kvcodec.client.model import prefill

    prefix, c1, c2, suffix = gpl_ids[:4], gpl_ids[4:260], gpl_ids[260:516], gpl_ids[516:520]
    chunks = [(c, *prefill(gemma, c)) for c in (c1, c2)]
    with torch.no_grad():
        ref = gemma.model(torch.tensor([gpl_ids[:520]]), use_cache=False, logits_to_keep=1).logits[0, -1]
    full = blend(gemma, prefix, chunks, suffix, ratio=1.0)
    torch.testing.assert_close(full.logits_last, ref, atol=2e-3, rtol=1e-3)
    assert full.keys.shape == (18, 1, 520, 256)

    def kl(logits: torch.Tensor) -> float:
        p = torch.log_softmax(ref.float(), -1)
        return float((p.exp() * (p - torch.log_softmax(logits.float(), -1))).sum())

    part, naive = blend(gemma, prefix, chunks, suffix), blend(gemma, prefix, chunks, suffix, ratio=0.0)
    assert part.recomputed_per_layer[-2] < 0.5 * 520
    assert kl(part.logits_last) < kl(naive.logits_last)


@pytest.mark.slow
def test_quality_probe_scores_gemma(gemma, gpl_ids):
    from kvcodec.client.quality import QualityProbe, per_token_baseline

    probe = QualityProbe(gemma, gpl_ids, prefix_len=PREFIX, eval_len=16)
    assert 1.0 < probe.ppl_ref < 200.0
    exact = probe.score(*probe.exact_kv)
    assert exact.ppl_change_pct == pytest.approx(0.0, abs=1e-6) and exact.agree_pct == 100.0
    coarse = probe.score(*per_token_baseline(*probe.exact_kv, bits=3))
    assert coarse.kl_mean > 0 and np.isfinite(coarse.ppl)
