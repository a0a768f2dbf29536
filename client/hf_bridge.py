"""The bridge between kvcodec KV tensors and Hugging Face transformers caches.

kvcodec holds a KV cache as two tensors ``keys`` and ``values`` shaped
``[layers, kv_heads, tokens, head_dim]`` (batch 1). transformers 5.x holds it as a
:class:`transformers.DynamicCache` whose ``layers[i].keys``/``.values`` are
``[batch, kv_heads, tokens, head_dim]``. Keys are post-RoPE in both.

A DynamicCache is mutated in place by every forward pass that uses it; build a
fresh one (``kv_to_cache``) for each continuation.

Example::

    cache = kv_to_cache(keys, values, config=model.config)
    out = model(input_ids=next_ids, past_key_values=cache)
    keys2, values2 = cache_to_kv(cache)   # now holds the prefix and next_ids
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcodec.codec.errors import InvalidInput

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

__all__ = ["kv_to_cache", "cache_to_kv"]


def kv_to_cache(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DynamicCache:
    """Build a transformers ``DynamicCache`` (batch 1) holding ``keys``/``values``.

    Args:
        keys: ``[layers, kv_heads, tokens, head_dim]``.
        values: same shape as ``keys``.
        config: the model config; when given, the cache is laid out for it (and
            the layer count is checked against ``num_hidden_layers``).
        dtype: cast to this dtype (e.g. the model's); default keep.
        device: move to this device; default keep.

    Returns:
        A new cache; the input tensors are not modified by later forward passes.

    Raises:
        InvalidInput: shapes are not 4-D, differ, or disagree with ``config``.
    """
    from transformers import DynamicCache

    _check_pair(keys, values)
    layers = int(keys.shape[0])
    if config is not None:
        expected = int(config.get_text_config(decoder=True).num_hidden_layers)
        if layers != expected:
            raise InvalidInput(f"keys: {layers} layers but the model config has {expected}")
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i in range(layers):
        k = keys[i].unsqueeze(0).to(dtype=dtype or keys.dtype, device=device or keys.device)
        v = values[i].unsqueeze(0).to(dtype=dtype or values.dtype, device=device or values.device)
        cache.update(k, v, layer_idx=i)
    return cache


def cache_to_kv(cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a batch-1 transformers cache into ``(keys, values)``.

    Args:
        cache: a ``DynamicCache`` (or any transformers 5.x ``Cache`` with ``.layers``).

    Returns:
        ``(keys, values)``, each ``[layers, kv_heads, tokens, head_dim]``, in the
        cache's dtype and device (new tensors, not views of the cache).

    Raises:
        InvalidInput: the cache is empty, has batch size != 1, or its layers differ in shape.
    """
    import torch

    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(layer, "is_initialized", True) for layer in layers):
        raise InvalidInput("cache: empty or not fully initialized (no KV in some layer)")
    ks, vs = [], []
    for i, layer in enumerate(layers):
        k, v = layer.keys, layer.values
        if k is None or v is None or k.dim() != 4 or k.shape[0] != 1 or v.shape != k.shape:
            shapes = [None if t is None else tuple(t.shape) for t in (k, v)]
            raise InvalidInput(
                f"cache layer {i}: expected keys and values [1, kv_heads, tokens, head_dim], got {shapes}"
            )
        if ks and k.shape[1:] != ks[0].shape:
            raise InvalidInput(f"cache layer {i}: shape {tuple(k.shape[1:])} != layer 0 {tuple(ks[0].shape)}")
        ks.append(k[0])
        vs.append(v[0])
    return torch.stack(ks), torch.stack(vs)


def _check_pair(keys: Any, values: Any) -> None:
    import torch

    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise InvalidInput(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InvalidInput(
                f"{name}: expected [layers, kv_heads, tokens, head_dim], got shape {tuple(t.shape)}"
            )
    if keys.shape != values.shape:
        raise InvalidInput(f"values: shape {tuple(values.shape)} != keys shape {tuple(keys.shape)}")
