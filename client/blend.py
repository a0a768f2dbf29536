"""CacheBlend-style fusion: reuse chunk caches anywhere in a context.

In RAG the retrieved chunks are rarely a prefix: each chunk's KV was computed on its own, at
positions from 0, without attention to what precedes it in the final prompt. :func:`blend`
assembles the fused context ``[prefix | chunk 1 | ... | chunk n | suffix]`` from those caches
and repairs it at a fraction of a full prefill's cost:

1. **Positional correction** — each chunk's keys are re-rotated to its offset in the fused
   context (:mod:`kvcodec.client.rope`, exact for every RoPE scaling transformers supports).
2. **Check layer(s)** — the layers before ``check_layer`` run on every token, and so does
   the K/V projection of the check layer itself. There the fresh K of each chunk token is
   compared with its cached K; the tokens with the highest deviation (``ratio`` of the chunk
   tokens) are kept. Every token's K/V at and below the check layer is the fresh one.
3. **Selective recompute** — through the later layers only the kept tokens (plus the prefix,
   when it has no cache, and the suffix, which are always fresh) are computed, attending over
   the full fused context: cached K/V for the others, fresh K/V for themselves, with a causal
   mask at their true positions. The other tokens keep their (re-rotated) cached K/V.

``schedule="gradual"`` (default) is the paper's gradual filter: keep ``start_factor * ratio``
at the check layer and shrink geometrically to ``ratio`` over ``gradual_layers`` more layers,
choosing each time by the deviation at that layer; ``"single"`` selects once, as LMCache does.
``query_weight`` (default 1) adds, beyond CacheBlend, the attention the suffix (the question)
pays each token at the selecting layer to its normalized deviation. On SmolLM2 both measured
better than one deviation-only check layer at equal time (benchmarks/RESULTS.md, "Blend").
``ratio=1`` reproduces a full prefill; ``ratio=0`` is the naive reuse (positions fixed, no
recompute; only the fresh tokens are computed). The last layer computes only the last
position's output (the others' K/V at that layer are all it needs).

Llama-family and Gemma 3 decoders are supported: per-layer RoPE bases (Gemma 3's sliding-window
layers use base 10k, its global layers 1M; each layer's keys are re-rotated with its own), q/k
norms, the extra norms around Gemma's attention and MLP blocks, and sliding-window attention
(a recomputed token of a sliding-window layer attends to the last ``window`` positions only, as
in the model). The fused context's KV is kept for every layer and token (:attr:`BlendResult.keys`);
the returned cache is transformers' own for the model (its sliding-window layers hold their window).

Errors::

    BlendError (ValueError)   bad shapes, token counts, ratio or schedule
    RopeError (ValueError)    from kvcodec.client.rope

Example:
    >>> res = blend(loaded, prefix_ids, [(ids1, k1, v1), (ids2, k2, v2)], question_ids)
    >>> next_token = int(res.logits_last.argmax())
    >>> answer = generate_greedy(loaded, res, max_new_tokens=32)  # or decode with res.cache
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .hf_bridge import kv_to_cache
from .rope import apply_rotary, layer_types, rerotation_table, rotary_table

__all__ = [
    "BlendError", "BlendResult", "ChunkKV", "blend", "generate_greedy", "SCHEDULES", "DEVIATIONS",
]

SCHEDULES = ("single", "gradual")
DEVIATIONS = ("k", "v", "kv")

ChunkKV = tuple[Sequence[int] | torch.Tensor, torch.Tensor, torch.Tensor]
"""One chunk: ``(token_ids, keys, values)``, K/V ``[layers, kv_heads, tokens, head_dim]``,
computed on its own at positions ``0..tokens-1``."""


class BlendError(ValueError):
    """Inputs that cannot be blended (shape, token count, ratio or schedule)."""


@dataclass
class BlendResult:
    """Output of :func:`blend`.

    Attributes:
        cache: a ``DynamicCache`` for the whole fused context, ready to continue decoding.
        logits_last: logits of the last position of the fused context, ``[vocab]``.
        selected: positions whose K/V is fresh in the last layer (chunk tokens chosen by
            deviation, plus the always-fresh tokens), sorted, 1-D long.
        timings: seconds per stage (``reposition``, ``layers``, ``total``).
        recomputed_per_layer: number of tokens computed at each layer.
        keys: the fused context's keys, every layer and token, ``[layers, kv_heads, N, head_dim]``
            (the cache's sliding-window layers keep only their window).
        values: likewise.
    """

    cache: object
    logits_last: torch.Tensor
    selected: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    recomputed_per_layer: list[int] = field(default_factory=list)
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


@dataclass
class _Context:
    """The fused context: token ids, which tokens reuse a cache, and that cache."""

    ids: torch.Tensor  # [N]
    reuse: torch.Tensor  # [N] bool, True where the cached K/V may be kept
    keys: torch.Tensor  # [L, H, N, D] cached keys at their new positions (0 where fresh)
    values: torch.Tensor  # [L, H, N, D]
    n_suffix: int  # the suffix is the last n_suffix tokens
    kinds: list[str | None]  # each layer's RoPE layer type (None: the model has one RoPE)
    tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]]  # layer type -> [N, rot_dim] cos, sin (fp32)


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise BlendError(f"model: {type(model).__name__} is not a Llama-family or Gemma 3 causal LM")
    for i, layer in enumerate(inner.layers):
        if getattr(layer.self_attn, "attn_logit_softcapping", None) is not None:
            raise BlendError(f"model: layer {i} soft-caps its attention logits (not supported)")
    return inner


def _ids(tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(tokens, dtype=torch.long).reshape(-1)


def _check_kv(keys: torch.Tensor, values: torch.Tensor, n: int, cfg, name: str) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    want = (cfg.num_hidden_layers, cfg.num_key_value_heads, n, head_dim)
    for what, t in (("keys", keys), ("values", values)):
        if tuple(t.shape) != want:
            raise BlendError(f"{name} {what}: shape {tuple(t.shape)} != expected {want}")


def _build_context(
    model: nn.Module,
    prefix_ids: torch.Tensor,
    chunks: Sequence[ChunkKV],
    suffix_ids: torch.Tensor,
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
    fix_positions: bool = True,
) -> _Context:
    """Concatenate the token ids and place every cache at its position in the fused context."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    parts = [(prefix_ids, prefix_kv, "prefix")] + [
        (_ids(c[0]), (c[1], c[2]), f"chunk {i}") for i, c in enumerate(chunks)
    ]
    parts.append((suffix_ids, None, "suffix"))
    n_total = sum(int(p[0].numel()) for p in parts)
    if n_total == 0:
        raise BlendError("context: no tokens (prefix, chunks and suffix are all empty)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, n_total, head_dim)
    keys = torch.zeros(shape, dtype=dtype, device=device)
    values = torch.zeros(shape, dtype=dtype, device=device)
    reuse = torch.zeros(n_total, dtype=torch.bool, device=device)
    rotary = _decoder(model).rotary_emb
    kinds = layer_types(rotary, cfg.num_hidden_layers)
    tables = {kind: rotary_table(rotary, n_total, device=device, layer_type=kind) for kind in set(kinds)}
    offset = 0
    for ids, kv, name in parts:
        n = int(ids.numel())
        if kv is not None and n:
            _check_kv(kv[0], kv[1], n, cfg, name)
            k = kv[0].to(device=device)
            if offset and fix_positions:
                k = _reposition(k, rotary, kinds, tables, offset)
            keys[:, :, offset : offset + n] = k.to(dtype)
            values[:, :, offset : offset + n] = kv[1].to(device=device, dtype=dtype)
            reuse[offset : offset + n] = True
        offset += n
    reuse[-1] = False  # the last token is always computed: its logits are returned
    ids = torch.cat([p[0] for p in parts]).to(device)
    return _Context(
        ids=ids, reuse=reuse, keys=keys, values=values, n_suffix=max(1, int(suffix_ids.numel())),
        kinds=kinds, tables=tables,
    )


def _reposition(keys: torch.Tensor, rotary: nn.Module, kinds: list[str | None],
                tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]], offset: int) -> torch.Tensor:
    """Keys ``[L, H, n, D]`` computed at positions ``0..n-1`` re-rotated to ``offset..``, each
    layer with its own RoPE (fp32)."""
    n = keys.shape[2]
    out = keys.to(torch.float32, copy=True)  # the caller's chunk stays as it was
    new = slice(offset, offset + n)
    for kind in set(kinds):
        layers = [i for i, k in enumerate(kinds) if k == kind]
        old = rotary_table(rotary, n, device=keys.device, layer_type=kind)
        cos, sin = tables[kind]
        out[layers] = apply_rotary(out[layers], *rerotation_table(*old, cos[new], sin[new]))
    return out


def _keep_plan(
    ratio: float, schedule: str, check_layer: int, num_layers: int,
    start_factor: float, gradual_layers: int,
) -> dict[int, float]:
    """Layer -> share of the reusable tokens still computed after that layer's selection."""
    if ratio <= 0.0:
        return {0: 0.0}
    if ratio >= 1.0:
        return {}
    if schedule == "single" or gradual_layers < 1:
        return {check_layer: ratio}
    start = min(1.0, start_factor * ratio)
    steps = min(gradual_layers, num_layers - 2 - check_layer)
    if steps < 1:
        return {check_layer: ratio}
    return {check_layer + i: start * (ratio / start) ** (i / steps) for i in range(steps + 1)}


def _project(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[1, heads, S, D]`` before RoPE (q/k norms applied where the model has them)."""
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    v = attn.v_proj(x).view(shape)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _deviation(k, v, cached_k, cached_v, how: str) -> torch.Tensor:
    """Per-token squared L2 distance between fresh and cached K and/or V ``[1,H,S,D]``."""
    dev = torch.zeros(k.shape[2], dtype=torch.float32, device=k.device)
    if how in ("k", "kv"):
        dev += (k - cached_k).float().pow(2).sum(dim=(0, 1, 3))
    if how in ("v", "kv"):
        dev += (v - cached_v).float().pow(2).sum(dim=(0, 1, 3))
    return dev


def _select(
    pos: torch.Tensor, reuse: torch.Tensor, dev: torch.Tensor, keep_share: float, n_reuse: int
) -> torch.Tensor:
    """Indices (into ``pos``) to keep: every fresh token plus the top-deviation reusable ones."""
    cand = reuse[pos]
    n_keep = min(int(cand.sum()), math.ceil(keep_share * n_reuse - 1e-9))
    score = torch.where(cand, dev, torch.full_like(dev, -1.0))
    top = torch.topk(score, n_keep).indices if n_keep > 0 else score.new_empty(0).long()
    keep = ~cand
    keep[top] = True
    return keep.nonzero().flatten()


def _window(attn: nn.Module) -> int | None:
    """The sliding window a layer's attention is limited to (None: the whole causal context)."""
    window = getattr(attn, "sliding_window", None)
    return int(window) if window else None


def _attend(attn, q, k_ctx, v_ctx, pos, full: bool, groups: int = 4) -> torch.Tensor:
    """Attention of the computed tokens over the whole context, causal at their positions
    (and, in a sliding-window layer, limited to the last ``window`` positions).

    The (sorted) queries are split into blocks; each block only reads the keys from its first
    position's window to its last position, so masked-out keys cost nothing.
    """
    window = _window(attn)
    if full and window is None:
        out = F.scaled_dot_product_attention(
            q, k_ctx, v_ctx, is_causal=True, scale=attn.scaling, enable_gqa=True
        )
    else:
        if window is not None:
            groups = max(groups, pos.numel() // window)
        outs = []
        for block in torch.tensor_split(torch.arange(pos.numel()), min(groups, pos.numel())):
            p = pos[block]
            begin = 0 if window is None else max(0, int(p[0]) - window + 1)
            end = int(p[-1]) + 1
            j = torch.arange(begin, end, device=q.device)[None, :]
            mask = j <= p[:, None]
            if window is not None:
                mask &= j > p[:, None] - window
            outs.append(F.scaled_dot_product_attention(
                q[:, :, block], k_ctx[:, :, begin:end], v_ctx[:, :, begin:end], attn_mask=mask,
                scale=attn.scaling, enable_gqa=True,
            ))
        out = torch.cat(outs, dim=2)
    return attn.o_proj(out.transpose(1, 2).reshape(*q.shape[:1], q.shape[2], -1))


def _suffix_attention(attn, q_suffix, keys, pos_suffix) -> torch.Tensor:
    """Mean attention probability each context token gets from the suffix queries, ``[N]``."""
    h_kv, n, d = keys.shape
    q = q_suffix[0].reshape(h_kv, -1, d)  # [kv_heads, groups * S, D]
    scores = (q @ keys.transpose(1, 2)) * attn.scaling
    s_len = pos_suffix.numel()
    j = torch.arange(n, device=keys.device)[None, :]
    mask = j > pos_suffix[:, None]  # [S, N]
    window = _window(attn)
    if window is not None:
        mask |= j <= pos_suffix[:, None] - window
    scores = scores.view(h_kv, -1, s_len, n).masked_fill(mask, float("-inf"))
    return scores.softmax(-1).mean(dim=(0, 1, 2))


def _residual(layer: nn.Module, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of a decoder layer after its attention: residual adds and the MLP (Gemma 3 puts
    a norm after the attention and around the MLP; Llama normalises only the MLP's input)."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        h = h + layer.post_attention_layernorm(attn_out)
        return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
    h = h + attn_out
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _logits(model: nn.Module, h_last: torch.Tensor) -> torch.Tensor:
    """Next-token logits of the last hidden state (final soft-capping where the model has it)."""
    logits = model.lm_head(_decoder(model).norm(h_last))[0]
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _run_layers(
    model: nn.Module, ctx: _Context, plan: dict[int, float], deviation: str,
    query_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Run the decoder over the fused context, computing only the tokens the plan keeps.

    Writes the fresh K/V of every computed token into ``ctx.keys``/``ctx.values`` in place.

    Returns:
        ``(hidden of the last position [1, hidden], computed positions, count per layer)``.
    """
    dec = _decoder(model)
    n = int(ctx.ids.numel())
    n_reuse = int(ctx.reuse.sum())
    tables = {kind: (cos.to(ctx.keys.dtype), sin.to(ctx.keys.dtype)) for kind, (cos, sin) in ctx.tables.items()}
    pos = torch.arange(n, device=ctx.ids.device)
    if plan == {0: 0.0}:  # naive reuse: only the fresh tokens are ever computed
        pos, plan = (~ctx.reuse).nonzero().flatten(), {}
    h = dec.embed_tokens(ctx.ids[pos])[None]
    counts: list[int] = []
    selected = pos
    for li, layer in enumerate(dec.layers):
        attn = layer.self_attn
        counts.append(int(pos.numel()))
        q, k, v = _project(attn, layer.input_layernorm(h))
        cos, sin = tables[ctx.kinds[li]]
        q, k = apply_rotary(q, cos[pos], sin[pos]), apply_rotary(k, cos[pos], sin[pos])
        keys, values = ctx.keys[li], ctx.values[li]
        keep = None
        if li in plan:
            dev = _deviation(k, v, keys[None][:, :, pos], values[None][:, :, pos], deviation)
        keys[:, pos] = k[0]
        values[:, pos] = v[0]
        if li in plan:
            if query_weight > 0:
                cand = ctx.reuse[pos]
                att = _suffix_attention(attn, q[:, :, -ctx.n_suffix :], keys, pos[-ctx.n_suffix :])
                att = att[pos]
                dev = dev / dev[cand].mean().clamp_min(1e-12) + query_weight * att / att[
                    cand].mean().clamp_min(1e-12)
            keep = _select(pos, ctx.reuse, dev, plan[li], n_reuse)
        if li == len(dec.layers) - 1:  # the last layer: only the last position's output counts
            selected = pos if keep is None else pos[keep]
            keep = torch.tensor([pos.numel() - 1], device=pos.device)
        if keep is not None and keep.numel() != pos.numel():
            h, q, pos = h[:, keep], q[:, :, keep], pos[keep]
        out = _attend(attn, q, keys[None], values[None], pos, full=pos.numel() == n)
        h = _residual(layer, h, out)
    return h[:, -1], selected, counts


def blend(
    loaded,
    prefix_ids: Sequence[int] | torch.Tensor,
    chunks: Sequence[ChunkKV],
    suffix_ids: Sequence[int] | torch.Tensor,
    ratio: float = 0.15,
    *,
    check_layer: int = 1,
    schedule: str = "gradual",
    deviation: str = "k",
    start_factor: float = 3.0,
    gradual_layers: int = 6,
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    fix_positions: bool = True,
    query_weight: float = 1.0,
) -> BlendResult:
    """Fuse independently computed chunk caches into one context and repair it selectively.

    Args:
        loaded: a ``LoadedModel`` (its ``.model`` is used) or a Llama-family or Gemma 3 causal LM.
        prefix_ids: tokens before the chunks (e.g. the system prompt); computed fresh unless
            ``prefix_kv`` is given.
        chunks: ``(token_ids, keys, values)`` per chunk, each computed alone at positions from 0,
            K/V ``[layers, kv_heads, tokens, head_dim]``.
        suffix_ids: tokens after the chunks (the question); always computed fresh.
        ratio: share of the chunk tokens recomputed after the check layer (0..1).
        check_layer: layer at which tokens are selected; layers before it run on every token.
        schedule: ``"gradual"`` (the paper's filter, the default: it measured better at equal
            time) or ``"single"`` (one check layer, as LMCache ships).
        deviation: what selects the tokens: ``"k"``, ``"v"`` or ``"kv"`` deviation.
        start_factor: gradual only: share kept at the check layer = ``start_factor * ratio``.
        gradual_layers: gradual only: layers over which the share shrinks to ``ratio``.
        prefix_kv: optional exact cache of the prefix (keys, values), positions from 0.
        fix_positions: re-rotate the chunk keys (True); False keeps them at their original
            positions — only useful as a baseline showing what the correction buys.
        query_weight: > 0 adds query awareness to the selection: score = deviation / mean +
            query_weight * (attention the suffix pays the token at that layer) / mean;
            0 selects by deviation alone, as CacheBlend does.

    Returns:
        A :class:`BlendResult` with the cache of the whole fused context.

    Raises:
        BlendError: on a bad ratio, schedule, deviation, check layer or chunk shape.
    """
    t0 = time.perf_counter()
    model = loaded if hasattr(loaded, "lm_head") else getattr(loaded, "model", loaded)
    num_layers = int(model.config.num_hidden_layers)
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise BlendError(f"ratio: {ratio} not in [0, 1]")
    if schedule not in SCHEDULES:
        raise BlendError(f"schedule: {schedule!r} not one of {SCHEDULES}")
    if deviation not in DEVIATIONS:
        raise BlendError(f"deviation: {deviation!r} not one of {DEVIATIONS}")
    if not 0 <= check_layer < num_layers:
        raise BlendError(f"check_layer: {check_layer} not in [0, {num_layers - 1}]")
    plan = _keep_plan(ratio, schedule, check_layer, num_layers, start_factor, gradual_layers)
    with torch.no_grad():
        ctx = _build_context(
            model, _ids(prefix_ids), chunks, _ids(suffix_ids), prefix_kv,
            fix_positions,
        )
        t1 = time.perf_counter()
        h_last, pos, counts = _run_layers(model, ctx, plan, deviation, query_weight)
        logits = _logits(model, h_last)
        t2 = time.perf_counter()
        cache = kv_to_cache(ctx.keys, ctx.values, model.config)
    t3 = time.perf_counter()
    timings = {"reposition": t1 - t0, "layers": t2 - t1, "cache": t3 - t2, "total": t3 - t0}
    return BlendResult(cache, logits, pos.cpu(), timings, counts, ctx.keys, ctx.values)


def generate_greedy(loaded, result: BlendResult, max_new_tokens: int,
                    eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding from a blended context (consumes ``result.cache``).

    Args:
        loaded: the model :func:`blend` was called with.
        result: the blend result; its cache is extended in place.
        max_new_tokens: number of tokens to generate at most (>= 0).
        eos_token_id: stop after this token, if given.

    Returns:
        The generated token ids (the first one is ``argmax(result.logits_last)``).

    Raises:
        BlendError: if ``max_new_tokens`` < 0.
    """
    if max_new_tokens < 0:
        raise BlendError(f"max_new_tokens: {max_new_tokens} < 0")
    model = loaded if hasattr(loaded, "lm_head") else getattr(loaded, "model", loaded)
    device = result.logits_last.device
    out: list[int] = []
    logits = result.logits_last
    with torch.no_grad():
        while len(out) < max_new_tokens:
            out.append(int(logits.argmax()))
            if out[-1] == eos_token_id or len(out) == max_new_tokens:
                break
            step = model(torch.tensor([[out[-1]]], device=device),
                         past_key_values=result.cache, use_cache=True)
            logits = step.logits[0, -1]
    return out
