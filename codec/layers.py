"""Layer-by-layer decoding: use layer ``i`` while layer ``i + 1`` is still decoding.

Example::

    from kvcodec.codec.layers import decode_layers

    for layer, keys, values in decode_layers(blob, device="cuda"):
        cache.update(keys, values, layer)     # [kv_heads, tokens, head_dim] each

Two entropy back ends give identical tensors (tests and
``benchmarks/gpu_bench.py --check`` prove it):

* ``numba``: substreams decode on a thread pool (the rANS decoder releases the
  GIL); every substream of the stream is queued at once, layers are yielded in
  order as soon as theirs are done. Dequantization runs on ``device``.
* ``torch``: all substreams of ``batch_layers`` layers are decoded together by
  :mod:`kvcodec.codec.rans_torch` on ``device`` (lanes as a tensor dimension),
  then dequantized there, without a trip through host memory.
* ``triton``: streams with packed side information (all that encoders write now) go
  through :mod:`kvcodec.codec.gpu_decode`: a fixed number of launches per group of layers
  (default: the whole stream, since one program per substream runs as long for one layer
  as for all of them); other coder-3 streams through the per-substream batches above,
  with :mod:`kvcodec.codec.rans_triton`'s fused kernel. Needs triton (the ``gpu`` extra)
  and a CUDA device, or ``TRITON_INTERPRET=1`` on the CPU.

``auto`` picks ``triton`` on a CUDA device when triton is installed, ``numba`` otherwise
(entropy decoding on the host, dequantization on ``device``; the path that needs neither
triton nor a GPU). On an H100 ``triton`` decoded a 4,096-token 8B-shaped chunk in 26.7 ms
(20 GB/s) against numba's hundreds of MB/s per core (benchmarks/RESULTS.md, "GPU (H100)").
Streams of the other coders (lossless, coder 2) always take the per-substream path.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from kvcodec.codec import api, container, gpu_decode, rans_torch, rans_triton, substream
from kvcodec.codec.container import DecodeLimits, Layout
from kvcodec.codec.errors import CorruptStream, InvalidInput
from kvcodec.codec.quantize import dequantize_block

BACKENDS = ("auto", "numba", "torch", "triton")


def resolve_backend(name: str, device, coder: int) -> str:
    """The entropy back end that decodes a stream of ``coder`` on ``device``: ``auto`` is
    ``triton`` for coder-3 streams on a CUDA device when triton is installed, else ``numba``."""
    if name not in BACKENDS:
        raise InvalidInput(f"backend: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if coder != container.CODER_RANS:
        return "numba"
    if name == "auto":
        return "triton" if rans_triton.runs_on_cuda(device) else "numba"
    if name == "triton":
        rans_triton.check_usable(device)
    return name



def decode_layers(
    data: bytes | memoryview,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    limits: DecodeLimits | None = None,
    backend: str = "auto",
    threads: int = 1,
    batch_layers: int | None = None,
    allow_trailing: bool = False,
    profile=None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(layer, keys, values)`` for every layer in order, each ``[kv_heads, tokens, head_dim]``.

    Args:
        data: the stream.
        device: where the tensors are built (and, with the torch back end, decoded).
        dtype: output dtype (default: the stream's).
        limits: decoder limits.
        backend: ``auto``, ``numba``, ``torch`` or ``triton`` (see the module docstring).
        threads: numba back end: worker threads.
        batch_layers: torch and triton back ends: layers decoded per batch (default: 2 for torch;
            every layer for triton, whose one program per substream runs as long for one
            layer as for all of them: on an H100 a 4,096-token 8B chunk took 312 ms one layer
            a group and 27 ms as one group).
        allow_trailing: accept bytes after the last substream.
        profile: for a transform-coded stream whose profile is not shipped (see ``api.decode``).

    Raises:
        KVCodecError: malformed, truncated or corrupted input (raised when the
            layer that holds the problem is reached).
    """
    layout = api.attach_profile(container.parse(data, limits, allow_trailing=allow_trailing), profile)
    yield from iter_layers(data, layout, device, dtype, backend, threads, batch_layers)


def iter_layers(
    data, layout: Layout, device, dtype, backend: str, threads: int, batch_layers: int | None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """:func:`decode_layers` on an already parsed stream (used by ``api.decode``)."""
    h = layout.header
    api._check_min_lengths(layout, list(range(h.layers)))
    out_dtype = dtype or api._TORCH_DTYPES[h.dtype]
    resolved = resolve_backend(backend, device, h.coder)
    if batch_layers is None:
        batch_layers = h.layers if resolved == "triton" else 2
    if resolved == "triton" and gpu_decode.supports(h):
        layers = _group_layers(data, layout, out_dtype, device, max(1, batch_layers))
    elif resolved in ("torch", "triton"):
        layers = _torch_layers(data, layout, out_dtype, device, max(1, batch_layers), resolved)
    else:
        layers = _numba_layers(data, layout, out_dtype, device, max(1, threads))
    for layer, keys, values in layers:
        api.apply_patches(data, layout, layer, keys, values)  # header flag 16
        yield layer, keys, values


def _layer_sids(h: container.Header, layer: int) -> list[int]:
    return [h.substream_id(layer, kv, b) for kv in (False, True) for b in range(h.blocks_per_tensor)]


def _assemble(h: container.Header, parts: list[torch.Tensor], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a layer's block tensors (keys' blocks, then values') into two output tensors."""
    shape = (h.kv_heads, h.tokens, h.head_dim)
    keys = torch.empty(shape, dtype=dtype, device=device)
    values = torch.empty(shape, dtype=dtype, device=device)
    blocks = h.blocks_per_tensor
    for i, part in enumerate(parts):
        start = (i % blocks) * h.token_block
        (values if i >= blocks else keys)[:, start : start + part.shape[1]] = part
    return keys, values


def _numba_layers(data, layout: Layout, dtype, device, threads: int):
    h = layout.header
    shape = (h.kv_heads, h.tokens, h.head_dim)
    blocks = h.blocks_per_tensor

    def part(target: torch.Tensor, block: int) -> torch.Tensor:
        start = block * h.token_block
        return target[:, start : start + h.block_tokens(block)]

    def run(sid: int, target: torch.Tensor) -> None:
        api._decode_into(data, layout, sid, dtype, device, part(target, sid % blocks))

    chains = [api.Chain(layout) for _ in range(blocks)]  # header flag 8

    def run_chained(layer: int, block: int, kv, before) -> None:
        """A layer's block once the previous layer's is decoded (submitted earlier, so running or
        done: no deadlock), keys then values, each predicted from the symbols before it."""
        if before is not None:
            before.result()
        for is_value in (False, True):
            chains[block].decode(data, layer, is_value, block, dtype, device, part(kv[is_value], block))

    with api._cpu_threads(device), ThreadPoolExecutor(threads) as pool:
        outputs, futures = [], []
        for layer in range(h.layers):
            kv = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            outputs.append(kv)
            if h.predicted_values:
                before = futures[-1] if futures else [None] * blocks
                futures.append([pool.submit(run_chained, layer, b, kv, before[b]) for b in range(blocks)])
            else:
                futures.append([pool.submit(run, sid, kv[i // blocks]) for i, sid in enumerate(_layer_sids(h, layer))])
        try:
            for layer, fs in enumerate(futures):
                for f in fs:
                    f.result()
                yield layer, outputs[layer][0], outputs[layer][1]
                outputs[layer] = None
        finally:
            for fs in futures:
                for f in fs:
                    f.cancel()


def _group_layers(data, layout: Layout, dtype, device, batch_layers: int):
    """Triton, packed side information: :func:`kvcodec.codec.gpu_decode.decode_group` per batch of layers."""
    h = layout.header
    for first in range(0, h.layers, batch_layers):
        layers = list(range(first, min(first + batch_layers, h.layers)))
        keys, values = gpu_decode.decode_group(data, layout, layers, device, dtype)
        for i, layer in enumerate(layers):
            yield layer, keys[i], values[i]


def _torch_layers(data, layout: Layout, dtype, device, batch_layers: int, backend: str = "torch"):
    h = layout.header
    chain = api.Chain(layout) if h.predicted_values else None  # carried from batch to batch
    for first in range(0, h.layers, batch_layers):
        layers = range(first, min(first + batch_layers, h.layers))
        sids = [sid for layer in layers for sid in _layer_sids(h, layer)]
        parts = _decode_batch(data, layout, sids, dtype, device, backend, chain)
        per = 2 * h.blocks_per_tensor
        for i, layer in enumerate(layers):
            keys, values = _assemble(h, parts[i * per : (i + 1) * per], dtype, device)
            yield layer, keys, values


def _decode_batch(
    data, layout: Layout, sids: list[int], dtype, device, backend: str = "torch", chain: api.Chain | None = None
) -> list[torch.Tensor]:
    """Decode coder-3 substreams together on ``device``; returns each block ``[H, T, D]``
    (``chain``: header flag 8's symbols so far; ``sids`` in layer order, keys before values)."""
    h = layout.header
    stored = api._TORCH_DTYPES[h.dtype]
    raws, payloads, subs = [], [], []
    for sid in sids:
        block = sid % h.blocks_per_tensor
        n_raw, tokens = h.block_raw_tokens(block), h.block_tokens(block)
        try:
            raw, rest = substream.split_raw(
                container.substream(data, layout, sid), h.kv_heads, tokens, h.head_dim, stored, n_raw, h.coder,
                h.packed_side,
            )
            p = (substream.parse_rans(rest, h.kv_heads, h.head_dim, h.packed_side, api.block_prior(layout, sid))
                 if tokens > n_raw else None)
        except CorruptStream as exc:
            raise CorruptStream(f"{h.describe(sid)}: {exc}") from None
        raws.append(raw)
        payloads.append(p)
        if p is not None:
            subs.append(rans_torch.Substream(p.words, p.escapes, p.classes, tokens - n_raw))
    try:
        decoder = rans_torch if backend == "torch" else rans_triton
        deltas = iter(decoder.decode_symbols(subs, device))
    except CorruptStream as exc:
        raise CorruptStream(f"{h.describe(sids[0])} and the rest of its batch: {exc}") from None
    out = []
    for sid, raw, p in zip(sids, raws, payloads):
        parts = [] if raw is None else [raw.to(device=device).to(dtype)]
        block = sid % h.blocks_per_tensor
        layer, is_value = divmod(sid // h.blocks_per_tensor, 2)
        captured: list = []
        if p is not None:
            offset = chain.offset(layer, bool(is_value), block) if chain else None
            parts.append(dequantize_block(p.steps, p.centers, next(deltas), h.kv_heads, h.head_dim, dtype, device,
                                          api.block_transform(layout, sid), h.block_quantized_position(block),
                                          captured, offset))
        if chain:
            chain.keep(layer, bool(is_value), block, captured)
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return out


__all__ = ["decode_layers", "iter_layers", "resolve_backend", "BACKENDS"]
