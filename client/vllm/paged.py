"""Between vLLM's paged KV cache and kvcodec's ``[layers, kv_heads, tokens, head_dim]`` chunks.

vLLM keeps each attention layer's KV in fixed-size blocks; a request owns a list
of block ids, and token ``t`` of the request lives in slot
``block_ids[t // block_size] * block_size + t % block_size``. How a layer's
tensor holds keys and values depends on the attention backend:

==========================================  ==========================================
``[blocks, heads, block_size, 2*head_dim]``  vLLM's CPU backend: per (block, head), the
                                             block's keys then its values
``[2, blocks, block_size, heads, head_dim]``  flash-attention style (NHD)
``[2, blocks, heads, block_size, head_dim]``  HND
==========================================  ==========================================

:class:`PagedLayout` turns a layer tensor into two ``[blocks, heads, block_size,
head_dim]`` views (no copy), so :func:`gather` and :func:`scatter` work for any
block size, including blocks that straddle a chunk boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcodec.client.vllm.errors import ConnectorConfigError

__all__ = ["PagedLayout", "token_slots", "gather", "scatter"]


@dataclass(frozen=True)
class PagedLayout:
    """How one layer's paged tensor stores keys and values.

    Attributes:
        kind: ``"cpu"`` (keys and values side by side in the last dim), ``"nhd"`` or ``"hnd"``.
        block_size: tokens per block.
        kv_heads: KV heads in this worker's tensors.
        head_dim: channels per head.
    """

    kind: str
    block_size: int
    kv_heads: int
    head_dim: int

    @classmethod
    def detect(cls, tensor: torch.Tensor, block_size: int, kv_heads: int,
               head_dim: int) -> PagedLayout:
        """Recognise a layer tensor's layout from its shape.

        Raises:
            ConnectorConfigError: a shape none of the known layouts has.
        """
        shape = tuple(tensor.shape)
        if len(shape) == 4 and shape[1:] == (kv_heads, block_size, 2 * head_dim):
            return cls("cpu", block_size, kv_heads, head_dim)
        if len(shape) == 5 and shape[0] == 2 and shape[2:] == (block_size, kv_heads, head_dim):
            return cls("nhd", block_size, kv_heads, head_dim)
        if len(shape) == 5 and shape[0] == 2 and shape[2:] == (kv_heads, block_size, head_dim):
            return cls("hnd", block_size, kv_heads, head_dim)
        raise ConnectorConfigError(
            f"kv cache: layer tensor shape {shape} matches no known paged layout for block size "
            f"{block_size}, {kv_heads} KV heads, head dim {head_dim}")

    def split(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value views of a layer tensor, each ``[blocks, heads, block_size, head_dim]``."""
        if self.kind == "cpu":
            blocks = tensor.shape[0]
            both = tensor.view(blocks, self.kv_heads, 2 * self.block_size, self.head_dim)
            return both[:, :, : self.block_size], both[:, :, self.block_size :]
        if self.kind == "nhd":
            return tensor[0].permute(0, 2, 1, 3), tensor[1].permute(0, 2, 1, 3)
        return tensor[0], tensor[1]


def token_slots(block_ids: Sequence[int], block_size: int, start: int, stop: int) -> torch.Tensor:
    """Slot numbers of tokens ``start .. stop-1`` of a request whose blocks are ``block_ids``.

    Raises:
        ConnectorConfigError: the blocks do not cover ``stop`` tokens.
    """
    if stop > len(block_ids) * block_size:
        raise ConnectorConfigError(
            f"block_ids: {len(block_ids)} blocks of {block_size} cannot hold {stop} tokens")
    positions = torch.arange(start, stop, dtype=torch.long)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


def gather(layout: PagedLayout, tensor: torch.Tensor, slots: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the keys and values of ``slots`` out of one layer: each ``[heads, len(slots), head_dim]``."""
    keys, values = layout.split(tensor)
    slots = slots.to(tensor.device)
    blocks, offsets = slots // layout.block_size, slots % layout.block_size
    # advanced indices on dims 0 and 2 put the token dim first: [tokens, heads, head_dim]
    return keys[blocks, :, offsets].transpose(0, 1), values[blocks, :, offsets].transpose(0, 1)


def scatter(layout: PagedLayout, tensor: torch.Tensor, slots: torch.Tensor,
            keys: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``[heads, len(slots), head_dim]`` keys and values into one layer's ``slots``."""
    key_view, value_view = layout.split(tensor)
    slots = slots.to(tensor.device)
    blocks, offsets = slots // layout.block_size, slots % layout.block_size
    key_view[blocks, :, offsets] = keys.transpose(0, 1).to(device=tensor.device, dtype=tensor.dtype)
    value_view[blocks, :, offsets] = values.transpose(0, 1).to(device=tensor.device, dtype=tensor.dtype)
