"""Paged KV gather/scatter: every layout vLLM uses, block sizes that do and do not divide a chunk."""

from __future__ import annotations

import pytest
import torch

from kvcodec.client.vllm.errors import ConnectorConfigError
from kvcodec.client.vllm.paged import PagedLayout, gather, scatter, token_slots

HEADS, DIM = 3, 64


def _tensor(kind: str, blocks: int, block_size: int, dtype=torch.bfloat16) -> torch.Tensor:
    shape = {"cpu": (blocks, HEADS, block_size, 2 * DIM),
             "nhd": (2, blocks, block_size, HEADS, DIM),
             "hnd": (2, blocks, HEADS, block_size, DIM)}[kind]
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("kind", ["cpu", "nhd", "hnd"])
@pytest.mark.parametrize("block_size", [16, 96, 128, 256])
def test_scatter_then_gather_returns_the_tokens_in_their_blocks(kind: str, block_size: int) -> None:
    tokens, start, stop = 700, 130, 612  # a range that starts and ends inside blocks
    blocks_needed = -(-tokens // block_size)
    block_ids = list(torch.randperm(blocks_needed + 5)[:blocks_needed].tolist())  # shuffled pages
    tensor = _tensor(kind, blocks_needed + 5, block_size)
    layout = PagedLayout.detect(tensor, block_size, HEADS, DIM)
    assert layout.kind == kind
    keys = torch.randn(HEADS, stop - start, DIM).bfloat16()
    values = torch.randn(HEADS, stop - start, DIM).bfloat16()
    slots = token_slots(block_ids, block_size, start, stop)
    scatter(layout, tensor, slots, keys, values)
    got_k, got_v = gather(layout, tensor, slots)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    # token t sits at block_ids[t // block_size], offset t % block_size, and nothing else was written
    k_view, v_view = layout.split(tensor)
    t = start + 17
    assert torch.equal(k_view[block_ids[t // block_size], :, t % block_size], keys[:, 17])
    assert torch.equal(v_view[block_ids[t // block_size], :, t % block_size], values[:, 17])
    assert int((k_view != 0).any(dim=-1).sum()) == HEADS * (stop - start)


def test_cpu_layout_matches_the_cpu_backend_view() -> None:
    """vLLM's CPU attention reads keys as view(blocks, heads, 2*block_size, dim)[:, :, :bs]."""
    block_size = 128
    tensor = _tensor("cpu", 4, block_size)
    layout = PagedLayout.detect(tensor, block_size, HEADS, DIM)
    slots = token_slots([2, 0], block_size, 0, 200)
    keys, values = torch.randn(2, HEADS, 200, DIM).bfloat16()
    scatter(layout, tensor, slots, keys, values)
    backend_view = tensor.view(4, HEADS, 2 * block_size, DIM)
    key_cache, value_cache = backend_view.chunk(2, dim=2)
    assert torch.equal(key_cache[2, :, 5], keys[:, 5])
    assert torch.equal(value_cache[0, :, 199 - 128], values[:, 199])


def test_unknown_shape_and_short_block_list_are_refused_by_name() -> None:
    with pytest.raises(ConnectorConfigError, match="matches no known paged layout"):
        PagedLayout.detect(torch.zeros(4, 5, 6), 16, HEADS, DIM)
    with pytest.raises(ConnectorConfigError, match="block_ids: 2 blocks of 16 cannot hold 40 tokens"):
        token_slots([0, 1], 16, 0, 40)
