"""Positional correction of cached keys: move rotated (post-RoPE) keys to new positions.

Cached keys in a Llama-family KV cache are stored *after* the rotary embedding, so a chunk
computed on its own (positions 0..n-1) cannot simply be dropped at positions p..p+n-1 of a
longer context. Re-rotating fixes that: remove the rotation the keys got at their old
positions, then apply the rotation of their new positions.

The cosine/sine tables come from the model's own rotary embedding class (transformers'
``*RotaryEmbedding`` with its ``rope_init_fn``), built fresh for a given context length, so
every scaling transformers supports is handled the way a full prefill of that length
handles it:

- ``default`` / ``linear`` / ``llama3``: the frequencies do not depend on the context length;
  un-rotate + re-rotate equals a rotation by the position delta, exactly.
- ``yarn`` (and ``longrope``): cos/sin are multiplied by an attention factor ``a``. Removing a
  rotation divides by ``cos^2 + sin^2 = a^2`` per element, so the factor is not applied twice.
- ``dynamic`` (NTK): the frequencies depend on the context length. The old table is built for
  the length the chunk was computed with, the new one for the fused context's length — what a
  fresh full prefill of that context would use.

Partial rotary embeddings (``partial_rotary_factor < 1``) rotate the first ``rot_dim``
dimensions and leave the rest untouched.

Models whose layers use different RoPE bases (Gemma 3: base 10k on the sliding-window layers,
1M on the global ones) have one rotary module with a table per *layer type*; every function
here takes the ``layer_type`` (``config.layer_types[layer]``) and :func:`layer_types` lists
them per layer (``[None] * layers`` for a model with one RoPE).

Example:
    >>> rotary = model.model.rotary_emb
    >>> moved = reposition_keys(keys, rotary, old_positions=torch.arange(256),
    ...                         new_positions=torch.arange(256) + 40, new_context_len=1100)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "RopeError",
    "rotary_table",
    "layer_types",
    "apply_rotary",
    "remove_rotary",
    "rerotation_table",
    "reposition_keys",
]


class RopeError(ValueError):
    """Positions or tensors that cannot be re-rotated (shape or range mismatch)."""


def layer_types(rotary_emb: nn.Module, num_layers: int) -> list[str | None]:
    """The RoPE ``layer_type`` of each layer: ``config.layer_types`` where the rotary module keeps
    a table per layer type (Gemma 3), else ``None`` for every layer.

    Args:
        rotary_emb: the model's rotary embedding module.
        num_layers: the model's layer count.

    Returns:
        ``num_layers`` entries.

    Raises:
        RopeError: the config lists another number of layer types.
    """
    kinds = getattr(rotary_emb, "layer_types", None)
    if not kinds:
        return [None] * num_layers
    per_layer = list(getattr(rotary_emb.config, "layer_types", None) or [])
    if len(per_layer) < num_layers:
        raise RopeError(f"layer_types: {len(per_layer)} entries for {num_layers} layers")
    return per_layer[:num_layers]


def rotary_table(
    rotary_emb: nn.Module,
    context_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    layer_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin of the model's RoPE for positions ``0..context_len-1``.

    A fresh instance of ``rotary_emb``'s class is built from its config, so the stateful
    dynamic-NTK update of the model's own module is neither read nor disturbed: the result is
    what a fresh full prefill of ``context_len`` tokens computes.

    Args:
        rotary_emb: the model's rotary embedding module (e.g. ``model.model.rotary_emb``).
        context_len: number of positions of the context the table is for (>= 1).
        dtype: dtype of the returned tables (the model computes in fp32, then casts).
        device: device of the returned tables (default: that of ``rotary_emb``'s buffers).
        layer_type: for a rotary module with a table per layer type (:func:`layer_types`),
            which one; ignored otherwise.

    Returns:
        ``(cos, sin)``, each ``[context_len, rot_dim]``, attention scaling included.

    Raises:
        RopeError: if ``context_len`` < 1, or the module needs a ``layer_type`` it does not know.
    """
    if context_len < 1:
        raise RopeError(f"context_len: {context_len} < 1")
    kinds = getattr(rotary_emb, "layer_types", None)
    if kinds and layer_type not in kinds:
        raise RopeError(f"layer_type: {layer_type!r} not one of the rotary module's {sorted(kinds)}")
    if device is None:
        buf = next(iter(rotary_emb.buffers()), None)
        device = buf.device if isinstance(buf, torch.Tensor) else torch.device("cpu")
    fresh = type(rotary_emb)(config=rotary_emb.config).to(device)
    positions = torch.arange(context_len, device=device)[None, :]
    probe = torch.empty(0, dtype=dtype, device=device)
    cos, sin = fresh(probe, positions, layer_type) if kinds else fresh(probe, positions)
    return cos[0], sin[0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _split(x: torch.Tensor, rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if rot_dim > x.shape[-1] or rot_dim % 2:
        raise RopeError(f"rot_dim: {rot_dim} does not fit head_dim {x.shape[-1]}")
    return x[..., :rot_dim], x[..., rot_dim:]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (pre-RoPE) with per-token ``cos``/``sin`` — transformers' formula.

    Args:
        x: ``[..., tokens, head_dim]``.
        cos: ``[tokens, rot_dim]`` (broadcast over the leading dims).
        sin: like ``cos``.

    Returns:
        The rotated tensor, same shape and dtype as ``x``.

    Raises:
        RopeError: if ``rot_dim`` does not fit ``head_dim``.
    """
    rot, rest = _split(x, cos.shape[-1])
    out = rot * cos + _rotate_half(rot) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def remove_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rotary` with the same tables, attention scaling divided out.

    Args:
        x: rotated tensor ``[..., tokens, head_dim]``.
        cos: the ``cos`` the rotation used, ``[tokens, rot_dim]``.
        sin: the ``sin`` the rotation used.

    Returns:
        The un-rotated (pre-RoPE) tensor.

    Raises:
        RopeError: if ``rot_dim`` does not fit ``head_dim``.
    """
    rot, rest = _split(x, cos.shape[-1])
    out = (rot * cos - _rotate_half(rot) * sin) / (cos * cos + sin * sin)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rerotation_table(
    cos_old: torch.Tensor, sin_old: torch.Tensor, cos_new: torch.Tensor, sin_new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One table doing :func:`remove_rotary` (old) then :func:`apply_rotary` (new).

    Both steps are scaled rotations of the same dimension pairs, so their product is one:
    ``apply_rotary(x, *rerotation_table(...))`` equals the two steps (exact algebraically,
    half the work on the keys).

    Args:
        cos_old: the ``cos`` the keys were rotated with, ``[tokens, rot_dim]``.
        sin_old: its ``sin``.
        cos_new: the ``cos`` of the new positions, same shape.
        sin_new: its ``sin``.

    Returns:
        ``(cos, sin)`` of the combined re-rotation.
    """
    norm = cos_old * cos_old + sin_old * sin_old
    return (
        (cos_new * cos_old + sin_new * sin_old) / norm,
        (sin_new * cos_old - cos_new * sin_old) / norm,
    )


def _as_positions(positions: torch.Tensor | range | list[int], name: str) -> torch.Tensor:
    pos = torch.as_tensor(list(positions) if isinstance(positions, range) else positions)
    if pos.ndim != 1 or pos.dtype.is_floating_point:
        raise RopeError(f"{name}: expected a 1-D integer tensor, got shape {tuple(pos.shape)}")
    if pos.numel() and int(pos.min()) < 0:
        raise RopeError(f"{name}: negative position {int(pos.min())}")
    return pos.long()


def reposition_keys(
    keys: torch.Tensor,
    rotary_emb: nn.Module,
    old_positions: torch.Tensor | range | list[int],
    new_positions: torch.Tensor | range | list[int],
    *,
    old_context_len: int | None = None,
    new_context_len: int | None = None,
    layer_type: str | None = None,
) -> torch.Tensor:
    """Move post-RoPE keys from ``old_positions`` to ``new_positions``.

    Equivalent to applying the rotary embedding at the new positions to the pre-RoPE keys.
    Computed in fp32 and cast back to ``keys.dtype``.

    Args:
        keys: ``[..., tokens, head_dim]`` rotated keys (e.g. ``[layers, kv_heads, tokens, hd]``).
        rotary_emb: the model's rotary embedding module.
        old_positions: the position of each token when its key was computed.
        new_positions: the position of each token in the new context.
        old_context_len: context length the keys were computed with (dynamic NTK only
            depends on it); default ``max(old_positions) + 1``.
        new_context_len: length of the new context; default ``max(new_positions) + 1``.
        layer_type: the RoPE of which layer type (:func:`layer_types`; models with one RoPE: None).

    Returns:
        Keys rotated for the new positions, same shape and dtype as ``keys``.

    Raises:
        RopeError: on a token count mismatch, bad positions, or context lengths too short.
    """
    old = _as_positions(old_positions, "old_positions")
    new = _as_positions(new_positions, "new_positions")
    tokens = keys.shape[-2]
    if old.numel() != tokens or new.numel() != tokens:
        raise RopeError(
            f"positions: {old.numel()} old / {new.numel()} new for {tokens} key tokens"
        )
    if tokens == 0:
        return keys.clone()
    old_len = int(old.max()) + 1 if old_context_len is None else old_context_len
    new_len = int(new.max()) + 1 if new_context_len is None else new_context_len
    if old_len <= int(old.max()) or new_len <= int(new.max()):
        raise RopeError(f"context_len: {old_len}/{new_len} too short for the positions given")
    device = keys.device
    cos_o, sin_o = rotary_table(rotary_emb, old_len, device=device, layer_type=layer_type)
    cos_n, sin_n = rotary_table(rotary_emb, new_len, device=device, layer_type=layer_type)
    old, new = old.to(device), new.to(device)
    cos, sin = rerotation_table(cos_o[old], sin_o[old], cos_n[new], sin_n[new])
    return apply_rotary(keys.float(), cos, sin).to(keys.dtype)
