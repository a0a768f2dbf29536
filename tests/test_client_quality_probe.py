"""kvcodec.client.quality.QualityProbe: scoring a reconstructed prefix KV."""

from __future__ import annotations

import math

import pytest
import torch

from kvcodec.client.quality import QualityProbe, per_token_baseline
from kvcodec.codec.errors import InvalidInput


def _ids(n, vocab=128, seed=3):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny_probe(tiny_llama):
    return QualityProbe(tiny_llama, _ids(100), prefix_len=64, eval_len=32)


def _full_forward_ppl(loaded, ids, prefix_len, eval_len):
    """Perplexity of ids[prefix_len:prefix_len+eval_len] from one plain forward pass."""
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids[: prefix_len + eval_len]])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    targets = torch.tensor(ids[prefix_len : prefix_len + eval_len])
    nll = -logp[prefix_len - 1 : prefix_len + eval_len - 1].gather(-1, targets[:, None]).double()
    return math.exp(float(nll.mean())), logits[prefix_len:].argmax(-1)


def test_exact_kv_scores_perfectly(tiny_probe):
    keys, values = tiny_probe.exact_kv
    r = tiny_probe.score(keys, values)
    assert r.ppl == r.ppl_ref and r.ppl_change_pct == 0.0
    assert r.agree_pct == 100.0 and r.kl_mean == 0.0
    assert r.seconds > 0


def test_reference_equals_plain_forward(tiny_llama):
    ids = _ids(100)
    probe = QualityProbe(tiny_llama, ids, prefix_len=64, eval_len=32)
    ppl, argmax = _full_forward_ppl(tiny_llama, ids, 64, 32)
    assert probe.ppl_ref == pytest.approx(ppl, rel=1e-5)
    assert torch.equal(probe._ref_argmax, argmax)


def test_exact_kv_is_a_copy(tiny_probe):
    keys, _ = tiny_probe.exact_kv
    keys.zero_()
    assert tiny_probe.exact_kv[0].abs().sum() > 0


def test_any_dtype_is_accepted(tiny_probe):
    keys, values = tiny_probe.exact_kv
    for dtype in (torch.float16, torch.bfloat16):
        r = tiny_probe.score(keys.to(dtype), values.to(dtype))
        assert abs(r.ppl_change_pct) < 1.0 and r.kl_mean < 1e-3


def test_more_damage_scores_worse(tiny_probe):
    keys, values = tiny_probe.exact_kv
    kl = [tiny_probe.score(*per_token_baseline(keys, values, bits=b, group=16)).kl_mean for b in (4, 2, 1)]
    assert 0 < kl[0] < kl[1] < kl[2]
    g = torch.Generator().manual_seed(0)
    noise = tiny_probe.score(torch.randn(keys.shape, generator=g) * 5, torch.randn(values.shape, generator=g) * 5)
    assert noise.kl_mean > kl[2]


def test_ppl_spread_flips_the_error_not_its_size(tiny_probe):
    keys, values = tiny_probe.exact_kv
    qk, qv = per_token_baseline(keys, values, bits=4, group=16)
    spread = tiny_probe.ppl_spread(qk, qv, trials=4, block=16, seed=5)
    assert len(spread) == 4 and len(set(spread)) > 1  # different draws
    assert spread == tiny_probe.ppl_spread(qk, qv, trials=4, block=16, seed=5)  # seeded
    # the draws are of the same size as the reconstruction's own change, not of another scale
    own = abs(tiny_probe.score(qk, qv).ppl_change_pct)
    assert 0 < max(abs(x) for x in spread) < 20 * max(own, 0.01)
    # an exact reconstruction has no error to flip
    assert tiny_probe.ppl_spread(keys, values, trials=2) == [0.0, 0.0]


def test_bad_inputs_are_refused(tiny_llama, tiny_probe):
    with pytest.raises(InvalidInput, match="need prefix_len \\+ eval_len = 96"):
        QualityProbe(tiny_llama, _ids(50), prefix_len=64, eval_len=32)
    with pytest.raises(InvalidInput, match="eval_len=1"):
        QualityProbe(tiny_llama, _ids(50), prefix_len=10, eval_len=1)
    keys, values = tiny_probe.exact_kv
    with pytest.raises(InvalidInput, match="keys: shape"):
        tiny_probe.score(keys[:, :, :10], values[:, :, :10])
    with pytest.raises(InvalidInput, match="trials=1"):
        tiny_probe.ppl_spread(keys, values, trials=1)
    with pytest.raises(InvalidInput, match="values: shape"):
        tiny_probe.ppl_spread(keys, values[:, :, :10])


@pytest.mark.model
def test_smollm2_probe_short_text(smollm2, gpl_text):
    from kvcodec.client.model import tokenize_file

    ids = tokenize_file(smollm2, gpl_text, 128)
    probe = QualityProbe(smollm2, ids, prefix_len=96, eval_len=32)
    ppl, _ = _full_forward_ppl(smollm2, ids, 96, 32)
    assert probe.ppl_ref == pytest.approx(ppl, rel=1e-4)
    keys, values = probe.exact_kv
    assert keys.shape == (30, 3, 96, 64)
    r8 = probe.score(*per_token_baseline(keys, values, bits=8))
    r2 = probe.score(*per_token_baseline(keys, values, bits=2))
    assert abs(r8.ppl_change_pct) < 1.0 and r8.agree_pct >= 95.0
    assert r2.kl_mean > 10 * r8.kl_mean


def test_loss_gradients_predict_the_loss_change_to_first_order(tiny_probe):
    gk, gv = tiny_probe.loss_gradients()
    keys, values = tiny_probe.exact_kv
    assert gk.shape == keys.shape and gv.shape == values.shape and gv.abs().sum() > 0
    # a small step along the gradient raises the eval NLL by about |grad|^2 * step
    step = 1e-3
    base = tiny_probe.score(keys, values)
    moved = tiny_probe.score(keys + step * gk, values + step * gv)
    n = tiny_probe.eval_len
    rise = n * (math.log(moved.ppl) - math.log(base.ppl))
    expect = step * float((gk**2).sum() + (gv**2).sum())
    assert rise == pytest.approx(expect, rel=0.2)
