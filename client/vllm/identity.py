"""Chunk keys for the engine's requests: the same keys ``kvcodec store put`` and the client derive.

A key commits to the model (name and weights fingerprint), the tokenizer, the KV
layout (layers, KV heads, head dim, the engine's KV dtype), the codec level, the
tenant and the tokens, chained chunk by chunk (:class:`kvcodec.store.KeySpec`,
``mode="prefix"``, 256-token chunks). The model identity comes from
:func:`kvcodec.client.model.model_identity` on the directory vLLM serves, so a
GGUF, its converted copy and the engine agree; the tokenizer identity is the
model name (the store CLI's default). ``model_name``, ``model_fingerprint`` and
``tokenizer`` in the connector settings override them.

Example::

    layout = engine_layout(vllm_config, settings)
    keys = chunk_keys(layout, "balanced", tenant="", token_ids=prompt)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcodec.client.vllm.errors import ConnectorConfigError
from kvcodec.client.vllm.settings import CHUNK_TOKENS, ConnectorSettings
from kvcodec.store.keys import ChunkKey, KeySpec, ModelLayout, canonical_dtype, config_fingerprint

__all__ = ["engine_layout", "chunk_keys", "kv_dtype_name"]


def kv_dtype_name(vllm_config: Any) -> str:
    """The engine's KV cache dtype as kvcodec names it ("bfloat16", "float16", "float32").

    Raises:
        ConnectorConfigError: a quantized KV cache (fp8), which the codec does not take.
    """
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    dtype = vllm_config.model_config.dtype if cache_dtype == "auto" else cache_dtype
    try:
        return canonical_dtype(str(dtype))
    except ValueError:
        raise ConnectorConfigError(
            f"cache_dtype: {cache_dtype!r} (model dtype {dtype}) is not float16, bfloat16 or "
            "float32; kvcodec codes unquantized KV caches") from None


def _model_identity(model: str, hf_config: Any) -> tuple[str, str]:
    """(name, fingerprint) of the served model: kvcodec's identity for a local directory,
    else the model id and a fingerprint of its config."""
    path = Path(model).expanduser()
    if path.is_dir():
        from kvcodec.client.model import ModelError, model_identity

        try:
            ident = model_identity(path)
            return ident.name, ident.fingerprint
        except ModelError:
            pass  # a directory kvcodec cannot hash (e.g. no weight files): fall back to the config
    return model, config_fingerprint(hf_config.to_dict())


def engine_layout(vllm_config: Any, settings: ConnectorSettings) -> ModelLayout:
    """The model identity and KV layout the engine's chunk keys commit to.

    Args:
        vllm_config: the engine's ``VllmConfig``.
        settings: connector settings (identity overrides).

    Returns:
        A :class:`kvcodec.store.keys.ModelLayout`.

    Raises:
        ConnectorConfigError: a model kvcodec cannot describe (KV dtype, heads).
    """
    mc = vllm_config.model_config
    name, fingerprint = settings.model_name, settings.model_fingerprint
    if not name or not fingerprint:
        auto_name, auto_fp = _model_identity(str(mc.model), mc.hf_config)
        name, fingerprint = name or auto_name, fingerprint or auto_fp
    parallel = vllm_config.parallel_config
    for field in ("tensor_parallel_size", "pipeline_parallel_size"):
        size = int(getattr(parallel, field, 1) or 1)
        if size != 1:
            raise ConnectorConfigError(f"{field}: {size}; KVCodecConnector stores whole-model "
                                       "chunks and supports one worker per engine (1)")
    layers = int(mc.get_num_layers(parallel))
    kv_heads = int(mc.get_num_kv_heads(parallel))
    head_dim = int(mc.get_head_size())
    if layers < 1 or kv_heads < 1 or head_dim < 1:
        raise ConnectorConfigError(f"model {name!r}: layers {layers}, kv heads {kv_heads}, "
                                   f"head dim {head_dim}: not a KV layout kvcodec codes")
    return ModelLayout(name, fingerprint, settings.tokenizer or name, layers, kv_heads, head_dim,
                       kv_dtype_name(vllm_config))


def chunk_keys(layout: ModelLayout, level: str, tenant: str, token_ids: Sequence[int],
               chunks: int | None = None) -> list[ChunkKey]:
    """Chained prefix keys of the leading full 256-token chunks of ``token_ids``.

    Args:
        layout: from :func:`engine_layout`.
        level: codec level (the key's codec profile).
        tenant: the tenant namespace (a request's ``cache_salt``; "" for none).
        token_ids: the prompt's tokens.
        chunks: at most this many chunks (default: every full chunk).

    Returns:
        One :class:`ChunkKey` per full chunk.
    """
    full = len(token_ids) // CHUNK_TOKENS
    count = full if chunks is None else min(chunks, full)
    if count <= 0:
        return []
    spec = KeySpec(**layout.__dict__, codec_profile=level, tenant=tenant)
    return spec.chunk_keys(list(token_ids[: count * CHUNK_TOKENS]), CHUNK_TOKENS, "prefix")
