"""blend(): 100% recompute equals a full prefill, 0% equals the naive reuse, selection counts."""

from __future__ import annotations

import pytest
import torch
from _model_fixtures import make_tiny_llama

from kvcodec.client.blend import BlendError, blend
from kvcodec.client.hf_bridge import cache_to_kv, kv_to_cache
from kvcodec.client.model import prefill
from kvcodec.client.rope import reposition_keys


@pytest.fixture(scope="module")
def tiny4():
    """A 4-layer tiny random Llama (room for a check layer and a gradual filter)."""
    return make_tiny_llama(seed=3, layers=4)


def _case(seed: int = 0, sizes=(10, 15, 7), vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (3,), generator=g).tolist()
    chunks = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in sizes]
    suffix = torch.randint(0, vocab, (4,), generator=g).tolist()
    return prefix, chunks, suffix


def _with_kv(loaded, chunks):
    return [(c, *prefill(loaded, c)) for c in chunks]


def _full(loaded, ids):
    """Full prefill: (keys, values, last logits)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.config)
    with torch.no_grad():
        out = loaded.model(torch.tensor(ids)[None], past_key_values=cache, use_cache=True)
    return (*cache_to_kv(cache), out.logits[0, -1])


@pytest.mark.parametrize("schedule", ["single", "gradual"])
def test_full_ratio_equals_full_prefill(tiny4, schedule: str) -> None:
    prefix, chunks, suffix = _case()
    res = blend(tiny4, prefix, _with_kv(tiny4, chunks), suffix, 1.0, schedule=schedule)
    keys, values, logits = _full(tiny4, prefix + sum(chunks, []) + suffix)
    got_k, got_v = cache_to_kv(res.cache)
    torch.testing.assert_close(got_k, keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.logits_last, logits, atol=1e-5, rtol=1e-5)
    assert res.recomputed_per_layer == [keys.shape[2]] * 4


def test_zero_ratio_equals_naive_reuse(tiny4) -> None:
    prefix, chunks, suffix = _case(1)
    with_kv = _with_kv(tiny4, chunks)
    res = blend(tiny4, prefix, with_kv, suffix, 0.0)
    # naive: prefix prefilled, chunk keys re-rotated to their offsets, suffix on top
    rotary = tiny4.model.model.rotary_emb
    ks, vs = list(prefill(tiny4, prefix)), None
    offset = len(prefix)
    n_total = offset + sum(map(len, chunks)) + len(suffix)
    parts_k, parts_v = [ks[0]], [ks[1]]
    for ids, k, v in with_kv:
        n = len(ids)
        parts_k.append(reposition_keys(k, rotary, range(n), range(offset, offset + n),
                                       new_context_len=n_total))
        parts_v.append(v)
        offset += n
    past = kv_to_cache(torch.cat(parts_k, 2), torch.cat(parts_v, 2), tiny4.config)
    with torch.no_grad():
        out = tiny4.model(torch.tensor(suffix)[None], past_key_values=past, use_cache=True)
    keys, values = cache_to_kv(past)
    got_k, got_v = cache_to_kv(res.cache)
    torch.testing.assert_close(got_k, keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.logits_last, out.logits[0, -1], atol=1e-5, rtol=1e-5)
    assert res.recomputed_per_layer == [len(prefix) + len(suffix)] * 4
    del vs


def test_selection_counts_and_fresh_tokens(tiny4) -> None:
    prefix, chunks, suffix = _case(2, sizes=(20, 20))
    n_prefix, n_chunk = len(prefix), 40
    res = blend(tiny4, prefix, _with_kv(tiny4, chunks), suffix, 0.25, check_layer=1,
                schedule="single", query_weight=0.0)
    n_total = n_prefix + n_chunk + len(suffix)
    assert res.recomputed_per_layer == [n_total, n_total, 17, 17]  # 3 + 10 + 4
    sel = res.selected.tolist()
    assert sel == sorted(sel)
    assert set(range(n_prefix)) <= set(sel)
    assert set(range(n_total - len(suffix), n_total)) <= set(sel)
    gradual = blend(tiny4, prefix, _with_kv(tiny4, chunks), suffix, 0.25, schedule="gradual",
                    start_factor=2.0, gradual_layers=3)
    counts = gradual.recomputed_per_layer
    assert counts[:2] == [n_total, n_total] and counts[2] > counts[3] == 17


def test_partial_ratio_moves_towards_full_prefill(tiny4) -> None:
    prefix, chunks, suffix = _case(4, sizes=(16, 16, 16))
    with_kv = _with_kv(tiny4, chunks)
    _, _, logits = _full(tiny4, prefix + sum(chunks, []) + suffix)
    errors = [
        float((blend(tiny4, prefix, with_kv, suffix, r).logits_last - logits).abs().max())
        for r in (0.0, 0.5, 1.0)
    ]
    assert errors[2] < 1e-5 < errors[0]
    assert errors[1] < errors[0]


def test_cache_continues_decoding(tiny4) -> None:
    prefix, chunks, suffix = _case(5)
    res = blend(tiny4, prefix, _with_kv(tiny4, chunks), suffix, 1.0)
    nxt = int(res.logits_last.argmax())
    ids = prefix + sum(chunks, []) + suffix + [nxt]
    _, _, want = _full(tiny4, ids)
    with torch.no_grad():
        out = tiny4.model(torch.tensor([[nxt]]), past_key_values=res.cache, use_cache=True)
    torch.testing.assert_close(out.logits[0, -1], want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_blend_error(tiny4) -> None:
    prefix, chunks, suffix = _case(6)
    with_kv = _with_kv(tiny4, chunks)
    with pytest.raises(BlendError, match="ratio: 1.5"):
        blend(tiny4, prefix, with_kv, suffix, 1.5)
    with pytest.raises(BlendError, match="schedule: 'fast'"):
        blend(tiny4, prefix, with_kv, suffix, schedule="fast")
    with pytest.raises(BlendError, match="check_layer: 9"):
        blend(tiny4, prefix, with_kv, suffix, check_layer=9)
    bad = [(chunks[0] + [1], with_kv[0][1], with_kv[0][2])]
    with pytest.raises(BlendError, match="chunk 0 keys: shape"):
        blend(tiny4, prefix, bad, suffix)
    with pytest.raises(BlendError, match="no tokens"):
        blend(tiny4, [], [], [])


@pytest.mark.model
def test_full_ratio_equals_full_prefill_smollm2(smollm2) -> None:
    tok = smollm2.tokenizer
    texts = ["The GNU General Public License is a free, copyleft license. " * 3,
             "Licensed under the Apache License, Version 2.0 (the License). " * 3]
    chunks = [tok(t)["input_ids"][:40] for t in texts]
    prefix, suffix = tok("System: answer.\n")["input_ids"], tok("Question: which?")["input_ids"]
    res = blend(smollm2, prefix, _with_kv(smollm2, chunks), suffix, 1.0)
    keys, values, logits = _full(smollm2, prefix + sum(chunks, []) + suffix)
    got_k, got_v = cache_to_kv(res.cache)
    torch.testing.assert_close(got_k, keys, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_v, values, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(res.logits_last, logits, atol=2e-3, rtol=1e-4)
    naive = blend(smollm2, prefix, _with_kv(smollm2, chunks), suffix, 0.0)
    assert float((naive.logits_last - logits).abs().max()) > 1e-2


def test_cached_prefix_is_reused_exactly(tiny4) -> None:
    prefix, chunks, suffix = _case(7)
    with_kv = _with_kv(tiny4, chunks)
    cached = blend(tiny4, prefix, with_kv, suffix, 1.0, prefix_kv=prefill(tiny4, prefix))
    _, _, logits = _full(tiny4, prefix + sum(chunks, []) + suffix)
    torch.testing.assert_close(cached.logits_last, logits, atol=1e-5, rtol=1e-5)
    naive = blend(tiny4, prefix, with_kv, suffix, 0.0, prefix_kv=prefill(tiny4, prefix))
    assert naive.recomputed_per_layer == [len(suffix)] * 4
