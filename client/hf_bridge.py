"""The bridge between kvcodec KV tensors and Hugging Face transformers caches.

kvcodec holds a KV cache as two tensors ``keys`` and ``values`` shaped
``[layers, kv_heads, tokens, head_dim]`` (batch 1). transformers 5.x holds it as a
:class:`transformers.DynamicCache` whose ``layers[i].keys``/``.values`` are
``[batch, kv_heads, tokens, head_dim]``. Keys are post-RoPE in both.

A DynamicCache is mutated in place by every forward pass that uses it; build a
fresh one (``kv_to_cache``) for each continuation.

Sliding-window layers (Gemma 3: 5 of every 6 layers attend to the last 512 tokens
only). kvcodec's KV always holds every token of every layer. ``kv_to_cache`` with a
config builds transformers' own cache for the model, whose sliding-window layers
keep only the last ``window - 1`` tokens (what the next token needs; the model's
mask does the rest) and count every token for positions; with ``full_layers=True``
(or :func:`full_cache`) every layer keeps everything, which is what a prefill whose
KV is read back (:func:`cache_to_kv`) needs.

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

__all__ = ["kv_to_cache", "cache_to_kv", "full_cache"]


def full_cache() -> DynamicCache:
    """An empty ``DynamicCache`` whose layers keep every token, sliding-window layers too.

    The model still masks a sliding-window layer's attention to its window (the mask
    comes from the model's config, by position), so a forward pass computes the same
    outputs as with the model's own cache; :func:`cache_to_kv` then reads every layer back.

    Returns:
        A new empty cache.
    """
    from transformers import DynamicCache

    return DynamicCache()


def kv_to_cache(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    full_layers: bool = False,
) -> DynamicCache:
    """Build a transformers ``DynamicCache`` (batch 1) holding ``keys``/``values``.

    Args:
        keys: ``[layers, kv_heads, tokens, head_dim]``.
        values: same shape as ``keys``.
        config: the model config; when given, the cache is laid out for it (and
            the layer count is checked against ``num_hidden_layers``): its
            sliding-window layers keep only the last ``window - 1`` tokens.
        dtype: cast to this dtype (e.g. the model's); default keep.
        device: move to this device; default keep.
        full_layers: every layer keeps every token (see :func:`full_cache`), so that
            :func:`cache_to_kv` can read the cache back after more tokens ran.

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
    cache = DynamicCache(config=config) if config is not None and not full_layers else DynamicCache()
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
        InvalidInput: the cache is empty, has batch size != 1, its layers differ in shape,
            or a sliding-window layer has dropped tokens (build it with :func:`full_cache`).
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
        seen = int(getattr(layer, "cumulative_length", k.shape[2]))
        if seen > k.shape[2]:
            raise InvalidInput(
                f"cache layer {i}: a sliding-window layer holding the last {k.shape[2]} of {seen} tokens; "
                "prefill with kvcodec.client.model.prefill (or a kvcodec.client.hf_bridge.full_cache) "
                "to keep every token"
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
