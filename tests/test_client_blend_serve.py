"""Serving a RAG request from stored chunk caches: codec round trip, blend, generate."""

from __future__ import annotations

import pytest
import torch
from _model_fixtures import make_tiny_llama

from kvcodec.client.blend import BlendError, blend, generate_greedy
from kvcodec.client.model import prefill
from kvcodec.codec import decode, encode


@pytest.fixture(scope="module")
def tiny4():
    return make_tiny_llama(seed=7, layers=4)


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy_full(loaded, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = loaded.model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_lossless_chunks_blended_generate_like_full_prefill(tiny4) -> None:
    prefix, suffix = _ids(1, 4), _ids(2, 5)
    chunks = [_ids(10 + i, n) for i, n in enumerate((12, 9, 14))]
    stored = []
    for c in chunks:  # what a chunk store holds: each chunk's own KV, encoded
        keys, values = prefill(tiny4, c)
        stored.append((c, encode(keys, values, level="lossless", model=tiny4.name)))
    fetched = [(c, *decode(blob)) for c, blob in stored]
    res = blend(tiny4, prefix, fetched, suffix, ratio=1.0)
    want = _greedy_full(tiny4, prefix + sum(chunks, []) + suffix, 6)
    assert generate_greedy(tiny4, res, 6) == want


@pytest.mark.parametrize("schedule", ["single", "gradual"])
def test_query_aware_selection_keeps_counts_and_exactness(tiny4, schedule: str) -> None:
    prefix, suffix = _ids(3, 3), _ids(4, 4)
    chunks = [(c, *prefill(tiny4, c)) for c in (_ids(20, 20), _ids(21, 20))]
    plain = blend(tiny4, prefix, chunks, suffix, 0.25, schedule=schedule, query_weight=0.0)
    aware = blend(tiny4, prefix, chunks, suffix, 0.25, schedule=schedule, query_weight=2.0)
    assert aware.recomputed_per_layer == plain.recomputed_per_layer
    assert aware.selected.numel() == plain.selected.numel()
    full = blend(tiny4, prefix, chunks, suffix, 1.0, query_weight=2.0)
    ref = blend(tiny4, prefix, chunks, suffix, 1.0, query_weight=0.0)
    torch.testing.assert_close(full.logits_last, ref.logits_last)


def test_generate_limits(tiny4) -> None:
    chunks = [(c, *prefill(tiny4, c)) for c in (_ids(30, 8),)]
    res = blend(tiny4, _ids(5, 2), chunks, _ids(6, 3), 0.15)
    assert generate_greedy(tiny4, res, 0) == []
    first = int(res.logits_last.argmax())
    assert generate_greedy(tiny4, res, 5, eos_token_id=first) == [first]
    with pytest.raises(BlendError, match="max_new_tokens"):
        generate_greedy(tiny4, res, -1)
