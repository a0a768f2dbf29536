"""The codec's Python API: tensors <-> ``.kvc`` bytes.

Example::

    from kvcodec.codec import encode, decode, inspect

    blob = encode(keys, values, level="balanced", model="smollm2-135m")
    info = inspect(blob)             # sizes, bits per element, side information
    kv = decode(blob)                # KVPair(keys, values), same shape and dtype
    k3, v3 = decode_layer(blob, 3)   # one layer alone: [kv_heads, tokens, head_dim]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch

from kvcodec.codec import container, device_encode, gpu_decode, patch, predict, rans_triton, substream, transform
from kvcodec.codec.container import DecodeLimits, Header, Layout
from kvcodec.codec.errors import CorruptStream, InvalidInput, LimitExceeded, MissingProfile
from kvcodec.codec.kvfile import check_kv
from kvcodec.codec.levels import DEFAULT_LEVEL, MODE_LOSSLESS, Level, get_level, level_by_id
from kvcodec.codec.profile import Profile, builtin_profile, builtin_profile_by_digest, load_profile
from kvcodec.codec.quantize import all_finite, dequantize_block, finalize_steps, head_rms
from kvcodec.codec.rans_encode import entropy_encoder
from kvcodec.codec.substream import StepRule

Progress = Callable[[int, int], None]
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
DEFAULT_TOKEN_BLOCK = 256
DEFAULT_SINK_TOKENS = 1


class KVPair(NamedTuple):
    """Keys and values, each ``[layers, kv_heads, tokens, head_dim]`` (or one layer's 3-D slice)."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class StreamInfo:
    """What ``kvcodec inspect`` reports about a stream."""

    level: str
    mode: str
    coder: str
    dtype: str
    layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    token_block: int
    first_position: int
    raw_tokens: int
    profile: str  # SHA-256 of the profile that chose the steps, "" if none
    model: str
    substreams: int
    total_bytes: int
    header_bytes: int
    index_bytes: int
    side_info_bytes: int
    bits_per_element: float
    ratio_vs_fp16: float
    transform: bool = False  # quantized in the profile's transform domain (decoding needs that profile)
    prediction: bool = False  # symbols coded as differences from their prediction (header flag 8)
    patched_tokens: int = 0  # tokens whose values carry a patch (header flag 16; the most in any layer)

    def to_dict(self) -> dict:
        return asdict(self)


def _level_name(level_id: int) -> str:
    level = level_by_id(level_id)
    return level.name if level else f"custom-{level_id}"


def _blocks(x: torch.Tensor, header: Header) -> Iterable[tuple[int, torch.Tensor]]:
    for b in range(header.blocks_per_tensor):
        start = b * header.token_block
        yield b, x[:, start : start + header.token_block]


@contextmanager
def _cpu_threads(device, threads: int = 1) -> Iterator[None]:
    """Run torch's CPU ops on ``threads`` threads (default one) while coding.

    A substream is small (tens of thousands of elements): OpenMP's fork/join
    costs more than the work, and on a loaded machine a two-thread torch ran
    the encoder 8x slower than one thread. Parallelism comes from substreams —
    except in a flag-8 stream with fewer blocks than decoding threads, whose
    substreams decode one after the other and whose prediction products (a third
    to half of the work) take the spare threads.
    """
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve_profile(profile, model: str, layers: int, heads: int, dim: int) -> Profile | None:
    if profile is None:
        return None
    if isinstance(profile, str) and profile == "auto":
        return builtin_profile(model, layers, heads, dim)
    if isinstance(profile, (str, os.PathLike)):
        profile = load_profile(profile)
    if not isinstance(profile, Profile):
        raise InvalidInput(f"profile: expected a Profile, a path or 'auto', got {type(profile).__name__}")
    if not profile.matches(layers, heads, dim):
        raise InvalidInput(
            f"profile: {profile.model} is for {profile.layers} layers x {profile.kv_heads} kv heads x "
            f"{profile.head_dim} dims, the KV is {layers} x {heads} x {dim}"
        )
    return profile


def _step_rule(level: Level, profile: Profile | None, layer: int, is_value: bool) -> StepRule:
    """How a substream's per-head steps are chosen: from the profile, else from its RMS."""
    rule = _stats_step_rule(level, profile, layer, is_value)
    return lambda x, factor=1.0: rule(*head_rms(x), factor)


def _stats_step_rule(level: Level, profile: Profile | None, layer: int, is_value: bool):
    """:func:`_step_rule` from :func:`head_rms`'s ``(rms, absmax)``: ``(rms, absmax, factor) -> steps``.

    Elementwise, so ``rms`` / ``absmax`` may be ``[blocks, H]`` (the device encoder's batches).
    """
    if profile is not None and level.name in profile.levels:
        target = profile.steps(level.name, layer, is_value)
        return lambda rms, absmax, factor=1.0: finalize_steps(target, absmax * factor)
    fraction = level.step_fraction(layer, is_value)
    return lambda rms, absmax, factor=1.0: finalize_steps(rms * fraction, absmax)  # = head_steps(x, fraction)


def encode(
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    level: str | Level = DEFAULT_LEVEL,
    model: str = "",
    first_position: int = 0,
    token_block: int = DEFAULT_TOKEN_BLOCK,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    profile: Profile | str | None = "auto",
    progress: Progress | None = None,
    threads: int = 1,
    backend: str = "auto",
    sink_keys: torch.Tensor | None = None,
) -> bytes:
    """Encode a KV cache into a ``.kvc`` stream.

    Args:
        keys, values: ``[layers, kv_heads, tokens, head_dim]`` float16/bfloat16/float32
            tensors, on the CPU or a GPU (quantization runs where the tensors are).
        level: ``lossless``, ``high``, ``balanced`` (default) or ``compact``.
        model: model identity recorded in the header (at most 256 UTF-8 bytes).
        first_position: absolute position of the first token.
        token_block: tokens per independently decodable substream (1..4096).
        sink_tokens: tokens at absolute positions below this are stored raw by the
            lossy levels: the first token is an attention sink that carries most of
            the model's sensitivity to KV error (measured: 86% of the Fisher
            information of a 1,536-token SmolLM2 prefix).
        profile: a :class:`Profile` (or its path) that sets each head's step from
            calibrated sensitivities; ``"auto"`` (default) uses the shipped profile
            for ``model`` if there is one; ``None`` sets steps from the data's RMS.
        progress: optional ``callback(done, total)`` called per substream.
        threads: worker threads for substreams (the rANS coder releases the GIL).
        backend: ``numba`` (per substream, symbols entropy-coded on host threads), or
            ``torch`` / ``triton``: the lossy levels run on the tensors' device, all
            substreams of a group of layers at once with one entropy batch (the same bytes,
            see :mod:`kvcodec.codec.device_encode`); lossless stays on the host. ``auto``
            (default): ``triton`` for CUDA tensors when triton is installed (on an H100,
            0.44 s for a 4,096-token 8B chunk), else ``numba``.
        sink_keys: for a stream that starts after position 0, the keys of its context's first
            token (the attention sink, as cached at position 0), ``[layers, kv_heads, head_dim]``:
            levels with patches (``high``) then patch the tokens whose keys point like it
            (:mod:`kvcodec.codec.patch`). A stream that starts at position 0 uses its own first
            token; without either, or without a profile that knows the model's RoPE, no patches.

    Returns:
        The stream bytes.

    Raises:
        InvalidInput: bad tensors or options, or NaN/Inf with a lossy level.
    """
    check_kv(keys, values)
    if backend == "auto":
        backend = "triton" if rans_triton.runs_on_cuda(keys.device) else "numba"
    with _cpu_threads(keys.device), entropy_encoder(backend, keys.device):  # device coders: this thread only
        return _encode(
            keys, values, level, model, first_position, token_block, sink_tokens, profile, progress,
            threads if backend == "numba" else 1, backend, sink_keys,
        )


def _encode(
    keys, values, level, model, first_position, token_block, sink_tokens, profile, progress, threads, backend="numba",
    sink_keys=None,
) -> bytes:
    lv = get_level(level)
    if not 1 <= token_block <= DecodeLimits().max_token_block:
        raise InvalidInput(f"token_block: {token_block} is outside 1..{DecodeLimits().max_token_block}")
    if len(model.encode("utf-8")) > container.MAX_MODEL_NAME:
        raise InvalidInput(f"model: name longer than {container.MAX_MODEL_NAME} bytes")
    lossless = lv.mode == MODE_LOSSLESS
    if not lossless:
        _check_finite(keys, values, threads)
    layers, heads, tokens, dim = keys.shape
    prof = None if lossless else _resolve_profile(profile, model, layers, heads, dim)
    use_transform = prof is not None and prof.has_transform and lv.name in prof.levels
    use_prior = use_transform and lv.name in prof.side_priors
    use_prediction = use_transform and prof.predicts(lv.name)
    if use_transform and not 0 <= first_position <= container.MAX_ROPE_POSITION - tokens:
        raise InvalidInput(f"first_position: {first_position} is outside 0..{container.MAX_ROPE_POSITION - tokens}"
                           " (the profile's transform codes keys before RoPE)")
    header = Header(
        mode=lv.mode, level=lv.id, dtype=_DTYPE_NAMES[keys.dtype],
        coder=container.CODER_ZSTD_PLANES if lossless else container.CODER_RANS,
        layers=layers, kv_heads=heads, tokens=tokens, head_dim=dim,
        token_block=token_block, first_position=first_position, model=model,
        raw_tokens=0 if lossless else max(0, min(tokens, sink_tokens - first_position)),
        profile=prof.digest if prof else container.NO_PROFILE,
        flags=(container.FLAG_TRANSFORM if use_transform else 0) | (0 if lossless else container.FLAG_PACKED_SIDE)
        | (container.FLAG_PREDICTED_SIDE if use_prior else 0)
        | (container.FLAG_PREDICTED_VALUES if use_prediction else 0),
    )

    def prior(layer: int, is_value: bool):
        return prof.side_prior(lv.name, layer, is_value) if use_prior else None

    if backend != "numba" and not lossless:  # batched on the device, same bytes
        payloads = device_encode.encode_payloads(
            keys, values, header, lambda layer, is_value: _stats_step_rule(lv, prof, layer, is_value),
            lambda layer, is_value: prof.transform(layer, is_value) if use_transform else None, backend, progress,
            priors=prior,
            predictors=(lambda layer, is_value: prof.predictor(lv.name, layer, is_value)) if use_prediction else None,
        )
        return _with_patches(header, payloads, keys, values, lv, prof, sink_keys)
    jobs = [
        (layer, is_value, b, block)
        for layer in range(layers)
        for is_value, tensor in ((False, keys), (True, values))
        for b, block in _blocks(tensor[layer], header)
    ]

    def run(job) -> bytes:
        layer, is_value, b, block = job
        if lossless:
            return substream.encode_lossless(block)
        rule = _step_rule(lv, prof, layer, is_value)
        tr = prof.transform(layer, is_value) if use_transform else None
        return substream.encode_quantized(
            block, rule, header.block_raw_tokens(b), header.coder, tr, header.block_quantized_position(b),
            header.packed_side, prior(layer, is_value),
        )

    payloads: list[bytes] = []
    symbols = None
    with ThreadPoolExecutor(threads) if threads > 1 else _Serial() as pool:
        code = run
        if use_prediction:
            code, symbols = _predicted_coder(jobs, header, lv, prof, prior, pool)
        for payload in pool.map(code, jobs):
            payloads.append(payload)
            if progress:
                progress(len(payloads), len(jobs))
    decoded = None if symbols is None else lambda layer, tokens: _decoded_values(
        symbols, header, prof.transform(layer, True), layer, tokens, keys.dtype)
    return _with_patches(header, payloads, keys, values, lv, prof, sink_keys, threads, decoded)


def _decoded_values(symbols: dict, header: Header, tr, layer: int, tokens: np.ndarray, dtype) -> torch.Tensor:
    """The values of ``tokens`` (quantized, not raw) as a decoder will decode them, ``[H, n, D]``:
    the encoder's own symbols and steps through the decoders' :func:`dequantize_block`."""
    h = header
    parts = []
    blocks = tokens // h.token_block
    for b in np.unique(blocks):
        steps, q = symbols[(layer, True, int(b))]
        local = tokens[blocks == b] - int(b) * h.token_block - h.block_raw_tokens(int(b))
        heads, _, dim = q.shape
        deltas = np.ascontiguousarray(q[:, local].transpose(0, 2, 1)).reshape(heads * dim, len(local))
        parts.append(dequantize_block(steps, np.zeros(heads * dim, dtype=np.int64), deltas, heads, dim, dtype,
                                      None, tr, h.block_quantized_position(int(b))))
    return torch.cat(parts, dim=1)


def _patch_tokens(header: Header, keys: torch.Tensor, lv: Level, prof: Profile | None, sink_keys) -> np.ndarray:
    """The tokens a stream patches (:func:`kvcodec.codec.patch.choose_tokens`): none for levels
    without patches, without a sink to compare with, or without the model's RoPE (a profile's
    transform) to compare keys before it."""
    h = header
    count = round(lv.patch_fraction * (h.tokens - h.raw_tokens))
    ropes = [prof.transform(layer, False).rope for layer in range(h.layers)] if prof is not None and prof.has_transform else []
    if count < 1 or not ropes or any(rope is None for rope in ropes):
        return np.zeros(0, dtype=np.int64)
    if h.first_position == 0:
        sink = keys[:, :, 0].float()  # position 0: RoPE is the identity
    elif sink_keys is not None:
        if tuple(sink_keys.shape) != (h.layers, h.kv_heads, h.head_dim):
            raise InvalidInput(f"sink_keys: shape {tuple(sink_keys.shape)} != {(h.layers, h.kv_heads, h.head_dim)} "
                               "(layers, kv_heads, head_dim)")
        sink = sink_keys.to(keys.device).float()
    else:
        return np.zeros(0, dtype=np.int64)
    pre = torch.stack([transform.unrotate(layer.float(), rope, h.first_position) for layer, rope in zip(keys, ropes)])
    return patch.choose_tokens(pre, sink, count, h.raw_tokens)


def _with_patches(header: Header, payloads: list[bytes], keys, values, lv: Level, prof, sink_keys,
                  threads: int = 1, decoded=None) -> bytes:
    """Pack the stream, with patches (header flag 16) for the values of the tokens
    :func:`_patch_tokens` chooses: the error is measured on the values as the decoder will
    decode them — ``decoded(layer, tokens)`` where the encoder kept its symbols (see
    :func:`_decoded_values`), else the stream decoded here once, on the tensors' device."""
    tokens = _patch_tokens(header, keys, lv, prof, sink_keys)
    if len(tokens) == 0:
        return container.pack(header, payloads)
    if decoded is None:
        whole = decode(container.pack(header, payloads), device=keys.device, profile=prof, threads=threads).values
        decoded = lambda layer, tokens: whole[layer][:, torch.from_numpy(tokens).to(whole.device)]  # noqa: E731
    entries = []
    for layer in range(header.layers):
        exact = values[layer][:, torch.from_numpy(tokens).to(values.device)]
        entries += [b"", patch.encode_entry(exact, decoded(layer, tokens), tokens)]
    header.flags |= container.FLAG_PATCHED
    return container.pack(header, payloads + entries)


def _predicted_coder(jobs: list, header: Header, lv: Level, prof: Profile, prior, pool):
    """Header flag 8, numba path: quantize every block first (on ``pool``), then return the
    function that codes one job's symbols as differences from their prediction
    (:mod:`kvcodec.codec.predict`), and the symbols (``(steps, q)`` per (layer, is_value, block))."""
    def quantize(job):
        layer, is_value, b, block = job
        n_raw = header.block_raw_tokens(b)
        if block.shape[1] == n_raw:
            return None
        return substream.transform_symbols(
            block, _step_rule(lv, prof, layer, is_value), n_raw, prof.transform(layer, is_value),
            header.block_quantized_position(b), prof.predictor(lv.name, layer, is_value) is not None)

    symbols = {job[:3]: result for job, result in zip(jobs, pool.map(quantize, jobs))}

    def code(job) -> bytes:
        layer, is_value, b, block = job
        n_raw = header.block_raw_tokens(b)
        if symbols[job[:3]] is None:
            return substream.encode_quantized(block, None, n_raw)  # raw tokens only
        steps, q = symbols[job[:3]]
        predictor = prof.predictor(lv.name, layer, is_value)
        if predictor is not None:
            qs = [torch.from_numpy(symbols[(lay, kind, b)][1]) for lay, kind in predict.sources(layer, is_value)]
            q = q - predictor.offsets_hdt(qs).numpy()
        return substream.encode_symbols(block, n_raw, steps, q, header.packed_side, prior(layer, is_value))

    return code, symbols


def _check_finite(keys: torch.Tensor, values: torch.Tensor, threads: int) -> None:
    """Refuse NaN/Inf for the lossy levels; layers are checked on ``threads`` threads."""
    for name, t in (("keys", keys), ("values", values)):
        with ThreadPoolExecutor(threads) if threads > 1 else _Serial() as pool:
            finite = all(pool.map(all_finite, t))
        if not finite:  # all() is 3x cheaper than counting; count only to report
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidInput(f"{name}: {bad} non-finite values (NaN/Inf); only level lossless keeps them")


class _Serial:
    """A stand-in for a one-thread pool: ``map`` runs in the caller's thread."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def _decode_sub(
    data, layout: Layout, sid: int, dtype, device, out: torch.Tensor | None = None, capture: list | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    h = layout.header
    block = sid % h.blocks_per_tensor
    tokens = h.block_tokens(block)
    stored = _TORCH_DTYPES[h.dtype]
    view = container.substream(data, layout, sid)
    try:
        if h.mode == MODE_LOSSLESS:
            # the planes hold the stream's dtype; convert after
            out = substream.decode_lossless(view, h.kv_heads, tokens, h.head_dim, stored, device)
            return out.to(dtype)
        return substream.decode_quantized(
            view, h.kv_heads, tokens, h.head_dim, stored, dtype, device, h.block_raw_tokens(block), h.coder, out,
            block_transform(layout, sid), h.block_quantized_position(block), h.packed_side, block_prior(layout, sid),
            capture, offset,
        )
    except container.ChecksumMismatch:
        raise
    except Exception as exc:
        if isinstance(exc, substream.CorruptStream):
            raise substream.CorruptStream(f"{h.describe(sid)}: {exc}") from None
        raise


def _decode_into(data, layout: Layout, sid: int, dtype, device, part: torch.Tensor, capture=None, offset=None) -> None:
    """Decode substream ``sid`` into ``part`` (its slice of the output)."""
    result = _decode_sub(data, layout, sid, dtype, device, part, capture, offset)  # quantized: written in place
    if result is not part:
        part.copy_(result)


class Chain:
    """Header flag 8: the decoded symbols that later substreams of the same block of tokens are
    predicted from (:func:`kvcodec.codec.predict.sources`), and those predictions. Decode a
    block's substreams in layer order, keys before values: :meth:`offset`, then :meth:`keep`."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.level = _level_name(layout.header.level)
        self.symbols: dict[tuple[int, bool, int], object] = {}

    def offset(self, layer: int, is_value: bool, block: int) -> torch.Tensor | None:
        """The prediction (float64 ``[T, C]``) to add to the substream's decoded symbols, None if
        it has none (layer 0's keys, blocks of raw tokens only)."""
        h = self.layout.header
        predictor = self.layout.profile.predictor(self.level, layer, is_value)
        if predictor is None or h.block_tokens(block) == h.block_raw_tokens(block):
            return None
        return predictor.offsets([self.symbols[(lay, kind, block)] for lay, kind in predict.sources(layer, is_value)])

    def keep(self, layer: int, is_value: bool, block: int, captured: list) -> None:
        """Record a decoded substream's symbols (``captured`` by ``decode_quantized``; empty for
        raw tokens only) and forget those no later substream needs."""
        if captured:
            self.symbols[(layer, is_value, block)] = captured[0]
        if is_value:
            self.symbols.pop((layer - 1, False, block), None)
            self.symbols.pop((layer - 1, True, block), None)

    def decode(self, data, layer: int, is_value: bool, block: int, dtype, device, part: torch.Tensor) -> None:
        """Decode one substream into ``part`` (its slice of the output): :meth:`offset`, then :meth:`keep`."""
        captured: list = []
        sid = self.layout.header.substream_id(layer, is_value, block)
        _decode_into(data, self.layout, sid, dtype, device, part, captured, self.offset(layer, is_value, block))
        self.keep(layer, is_value, block, captured)


def decode_chain(data, layout: Layout, block: int, upto: int, dtype, device, target) -> None:
    """Header flag 8: decode block ``block`` of layers ``0..upto`` in order, each substream
    predicted from those before it; ``target(layer, is_value)`` gives the output slice of each
    (None: decoded into scratch, only to predict the next layers)."""
    h = layout.header
    chain = Chain(layout)
    for layer in range(upto + 1):
        for is_value in (False, True):
            part = target(layer, is_value)
            if part is None:
                part = torch.empty((h.kv_heads, h.block_tokens(block), h.head_dim), dtype=dtype, device=device)
            chain.decode(data, layer, is_value, block, dtype, device, part)


def attach_profile(layout: Layout, profile: Profile | str | os.PathLike | None) -> Layout:
    """Give a transform-flagged stream the profile that decodes it (others need none).

    ``profile`` is a :class:`Profile`, a path, or None to look the header's digest
    up among the shipped profiles.

    Raises:
        MissingProfile: no profile with the stream's digest was given or shipped.
    """
    h = layout.header
    if not h.transformed:
        return layout
    if isinstance(profile, (str, os.PathLike)):
        profile = load_profile(profile)
    if profile is None:
        profile = builtin_profile_by_digest(h.profile)
    if profile is None or profile.digest != h.profile:
        given = "" if profile is None else f"; the given profile is {profile.digest.hex()[:16]}…"
        raise MissingProfile(
            f"profile: the stream was coded with the transform of profile {h.profile.hex()[:16]}…, "
            f"which is neither shipped nor in $KVCODEC_PROFILE_PATH{given} (pass the profile file "
            "with --profile / profile=, or put it in a directory named by KVCODEC_PROFILE_PATH)"
        )
    if not (profile.has_transform and profile.matches(h.layers, h.kv_heads, h.head_dim)):
        raise MissingProfile(f"profile: {profile.digest.hex()[:16]}… has no transform for this stream's layout")
    if h.predicted_side and _level_name(h.level) not in profile.side_priors:
        raise MissingProfile(f"profile: {profile.digest.hex()[:16]}… has no side-information prior for level "
                             f"{_level_name(h.level)!r}, which the stream's flags say it was coded with")
    if h.predicted_values and not profile.predicts(_level_name(h.level)):
        raise MissingProfile(f"profile: {profile.digest.hex()[:16]}… has no prediction for level "
                             f"{_level_name(h.level)!r}, which the stream's flags say it was coded with")
    layout.profile = profile
    return layout


def block_transform(layout: Layout, sid: int):
    """The transform of substream ``sid`` (None for streams without the transform flag); every
    decoding entry point has called :func:`attach_profile` on ``layout`` first."""
    h = layout.header
    if not h.transformed:
        return None
    layer, kind = divmod(sid // h.blocks_per_tensor, 2)
    return layout.profile.transform(layer, bool(kind))


def block_prior(layout: Layout, sid: int):
    """The side-information prior of substream ``sid`` (None unless the stream has flag 4);
    :func:`attach_profile` has checked the profile holds it."""
    h = layout.header
    if not h.predicted_side:
        return None
    layer, kind = divmod(sid // h.blocks_per_tensor, 2)
    return layout.profile.side_prior(_level_name(h.level), layer, bool(kind))


def _min_length(h: Header, block: int) -> int:
    """The fixed part of a substream: what any valid payload must at least hold."""
    width = container.DTYPE_BYTES[h.dtype]
    if h.mode == MODE_LOSSLESS:
        return 4 * width
    n_raw = h.block_raw_tokens(block)
    return substream.quantized_min_bytes(
        h.kv_heads, h.head_dim, width, n_raw, h.block_tokens(block) - n_raw, h.coder, h.packed_side
    )


def _check_min_lengths(layout: Layout, layers: list[int]) -> None:
    """Every substream of ``layers`` must be at least as long as its fixed part."""
    h = layout.header
    per_layer = 2 * h.blocks_per_tensor
    for layer in layers:
        for sid in range(layer * per_layer, (layer + 1) * per_layer):
            need = _min_length(h, sid % h.blocks_per_tensor)
            if layout.lengths[sid] < need:
                raise CorruptStream(f"{h.describe(sid)}: {layout.lengths[sid]} bytes, needs at least {need}")


def _decode_layers(
    data, layout: Layout, layers: list[int], dtype, device, progress: Progress | None, threads: int
) -> KVPair:
    h = layout.header
    out_dtype = dtype or _TORCH_DTYPES[h.dtype]
    shape = (len(layers), h.kv_heads, h.tokens, h.head_dim)
    _check_min_lengths(layout, layers)  # a lying index must fail before the big allocation
    try:
        keys = torch.empty(shape, dtype=out_dtype, device=device)
        values = torch.empty(shape, dtype=out_dtype, device=device)
    except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory errors
        raise LimitExceeded(f"output: cannot allocate 2 x {list(shape)} {out_dtype} ({type(exc).__name__})") from None
    index = {layer: i for i, layer in enumerate(layers)}

    def part(layer: int, is_value: bool, b: int) -> torch.Tensor | None:
        if layer not in index:
            return None
        start = b * h.token_block
        return (values if is_value else keys)[index[layer], :, start : start + h.block_tokens(b)]

    if h.predicted_values:  # header flag 8: one job per block, every layer up to the last wanted in order
        jobs = [(None, None, b) for b in range(h.blocks_per_tensor)]
    else:
        jobs = [(layer, kind, b) for layer in layers for kind in (False, True) for b in range(h.blocks_per_tensor)]

    def run(job) -> None:
        layer, is_value, b = job
        if layer is None:
            decode_chain(data, layout, b, max(layers), out_dtype, device, lambda lay, kind: part(lay, kind, b))
        else:
            _decode_into(data, layout, h.substream_id(layer, is_value, b), out_dtype, device, part(layer, is_value, b))

    spare = max(1, threads // len(jobs)) if h.predicted_values else 1
    parallel = threads > 1 and len(jobs) > 1
    with _cpu_threads(device, spare), ThreadPoolExecutor(threads) if parallel else _Serial() as pool:
        for done, _ in enumerate(pool.map(run, jobs), 1):
            if progress:
                progress(done, len(jobs))
    for layer, i in index.items():
        apply_patches(data, layout, layer, keys[i], values[i])
    return KVPair(keys, values)


def apply_patches(data, layout: Layout, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Header flag 16: add a decoded layer's patches (:mod:`kvcodec.codec.patch`) to its
    ``[kv_heads, tokens, head_dim]`` keys and values, in place; every decoding path calls this
    once per layer, after the layer's substreams."""
    h = layout.header
    if not h.patched:
        return
    for is_value, out in ((False, keys), (True, values)):
        entry = read_patch(data, layout, layer, is_value)
        if entry is not None:
            patch.apply(out, entry, _TORCH_DTYPES[h.dtype])


def read_patch(data, layout: Layout, layer: int, is_value: bool) -> patch.Patch | None:
    """A (layer, K/V)'s patch entry, CRC-checked and parsed (None: empty)."""
    h = layout.header
    sid = h.patch_id(layer, is_value)
    try:
        return patch.parse_entry(container.substream(data, layout, sid), h.kv_heads, h.tokens, h.head_dim)
    except CorruptStream as exc:
        raise CorruptStream(f"{h.describe(sid)}: {exc}") from None


def decode(
    data: bytes | memoryview,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    limits: DecodeLimits | None = None,
    allow_trailing: bool = False,
    progress: Progress | None = None,
    threads: int = 1,
    backend: str = "auto",
    profile: Profile | str | os.PathLike | None = None,
) -> KVPair:
    """Decode a whole stream into ``KVPair(keys, values)``.

    Args:
        data: the stream.
        device: where to build the tensors (default CPU).
        dtype: output dtype (default: the dtype recorded in the stream).
        limits: decoder limits (defaults are safe for untrusted input).
        allow_trailing: accept bytes after the last substream.
        progress: optional ``callback(done, total)``.
        threads: worker threads for substreams (zstd and the rANS decoder release the GIL).
        backend: rANS entropy decoder: ``auto`` (``triton`` on a CUDA device with triton
            installed, else ``numba`` on host threads), ``numba``, ``torch`` or ``triton`` (on
            ``device``, see :mod:`kvcodec.codec.layers`); all give identical tensors.
        profile: for streams coded with a profile's transform that is not shipped with
            kvcodec: that profile (or its path). Shipped profiles are found by digest.

    Raises:
        KVCodecError: any malformed, truncated or corrupted input; MissingProfile.
    """
    from kvcodec.codec import layers as _layers  # layers imports this module

    layout = attach_profile(container.parse(data, limits, allow_trailing=allow_trailing), profile)
    resolved = _layers.resolve_backend(backend, device, layout.header.coder)
    if resolved in ("torch", "triton"):
        return _decode_torch(data, layout, device, dtype, progress, resolved)
    with _cpu_threads(device):
        return _decode_layers(data, layout, list(range(layout.header.layers)), dtype, device, progress, threads)


def _decode_torch(data, layout: Layout, device, dtype, progress: Progress | None, backend: str = "torch") -> KVPair:
    """Whole-stream decode through the torch rANS back end (2 layers a batch) or Triton (all in one launch)."""
    from kvcodec.codec import layers as _layers

    h = layout.header
    if backend == "triton" and gpu_decode.supports(h):  # the whole stream as one group: two launches
        every = list(range(h.layers))
        _check_min_lengths(layout, every)
        keys, values = gpu_decode.decode_group(data, layout, every, device, dtype or _TORCH_DTYPES[h.dtype])
        for layer in every:
            apply_patches(data, layout, layer, keys[layer], values[layer])
        if progress:
            progress(h.layers, h.layers)
        return KVPair(keys, values)
    parts = []
    batch = h.layers if backend == "triton" else 2  # nobody consumes layers early here: one launch for the stream
    for layer, keys, values in _layers.iter_layers(data, layout, device, dtype, backend, 1, batch):
        parts.append((keys, values))
        if progress:
            progress(layer + 1, h.layers)
    return KVPair(torch.stack([k for k, _ in parts]), torch.stack([v for _, v in parts]))


def decode_layer(
    data: bytes | memoryview,
    layer: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    limits: DecodeLimits | None = None,
    profile: Profile | str | os.PathLike | None = None,
) -> KVPair:
    """Decode one layer: ``KVPair`` of ``[kv_heads, tokens, head_dim]`` tensors (``profile``: see decode)."""
    layout = attach_profile(container.parse(data, limits), profile)
    if not 0 <= layer < layout.header.layers:
        raise InvalidInput(f"layer: {layer} is outside 0..{layout.header.layers - 1}")
    with _cpu_threads(device):
        kv = _decode_layers(data, layout, [layer], dtype, device, None, 1)
    return KVPair(kv.keys[0], kv.values[0])


def _side_bytes(data, layout: Layout) -> int:
    """Header, index and every substream's side information (not its raw tokens or words)."""
    h = layout.header
    side = 0
    for sid in range(h.n_substreams):
        block = sid % h.blocks_per_tensor
        if h.mode == MODE_LOSSLESS:
            side += 4 * container.DTYPE_BYTES[h.dtype]
        elif h.block_tokens(block) > h.block_raw_tokens(block):
            start = layout.offsets[sid] + h.kv_heads * h.block_raw_tokens(block) * h.head_dim * (
                container.DTYPE_BYTES[h.dtype])
            end = min(len(data), layout.offsets[sid] + layout.lengths[sid])
            side += substream.side_bytes(memoryview(data)[start:max(start, end)], h.kv_heads, h.head_dim,
                                         h.coder, h.packed_side)
    for sid in range(h.n_substreams, h.n_entries):
        start = layout.offsets[sid]
        side += patch.side_bytes(memoryview(data)[start : start + layout.lengths[sid]], h.kv_heads)
    return layout.header_bytes + layout.index_bytes + side


def _patched_tokens(data, layout: Layout) -> int:
    """The most tokens any patch entry names (0 without header flag 16)."""
    h = layout.header
    return max((patch.count(memoryview(data)[layout.offsets[sid] : layout.offsets[sid] + layout.lengths[sid]])
                for sid in range(h.n_substreams, h.n_entries)), default=0)


def inspect(data: bytes | memoryview, *, limits: DecodeLimits | None = None) -> StreamInfo:
    """Describe a stream from its header and index (substream CRCs are not checked)."""
    layout = container.parse(data, limits)
    h = layout.header
    elements = 2 * h.layers * h.kv_heads * h.tokens * h.head_dim
    total = len(data)
    return StreamInfo(
        level=_level_name(h.level), mode="lossless" if h.mode == MODE_LOSSLESS else "quantized",
        coder=container.CODER_NAMES[h.coder], dtype=h.dtype, layers=h.layers,
        kv_heads=h.kv_heads, tokens=h.tokens, head_dim=h.head_dim, token_block=h.token_block,
        first_position=h.first_position, raw_tokens=h.raw_tokens,
        profile="" if h.profile == container.NO_PROFILE else h.profile.hex(), model=h.model, substreams=h.n_substreams,
        total_bytes=total, header_bytes=layout.header_bytes, index_bytes=layout.index_bytes,
        side_info_bytes=_side_bytes(data, layout), bits_per_element=8 * total / elements,
        ratio_vs_fp16=16 * elements / (8 * total), transform=h.transformed, prediction=h.predicted_values,
        patched_tokens=_patched_tokens(data, layout),
    )


def verify(
    data: bytes | memoryview,
    *,
    limits: DecodeLimits | None = None,
    full: bool = True,
    threads: int = 1,
    profile: Profile | str | os.PathLike | None = None,
) -> StreamInfo:
    """Check every checksum (and, with ``full``, that every substream decodes).

    Args:
        data: the stream.
        limits: decoder limits.
        full: decode every substream too (catches payloads whose CRC was forged).
        threads: substreams decoded in parallel (the rANS decoder releases the GIL).
        profile: see :func:`decode` (needed with ``full`` for a transform-coded stream).

    Returns:
        The stream's :class:`StreamInfo`.

    Raises:
        KVCodecError: the first problem found, in substream order.
    """
    info = inspect(data, limits=limits)
    layout = container.parse(data, limits)
    if full:
        attach_profile(layout, profile)
    sids = range(layout.header.n_substreams)
    if not full:
        sids = range(layout.header.n_entries)
        for sid in sids:
            container.substream(data, layout, sid)
        return info

    h = layout.header

    def check(sid: int) -> None:
        _decode_sub(data, layout, sid, torch.float32, None)

    def check_chain(block: int) -> None:
        decode_chain(data, layout, block, h.layers - 1, torch.float32, None, lambda layer, is_value: None)

    if h.predicted_values:  # header flag 8: each block's substreams in layer order
        check, sids = check_chain, range(h.blocks_per_tensor)
    with _cpu_threads(None), ThreadPoolExecutor(threads) if threads > 1 else _Serial() as pool:
        for _ in pool.map(check, sids):  # re-raises the first failure, in substream order
            pass
    for layer in range(h.layers) if h.patched else ():
        for is_value in (False, True):
            read_patch(data, layout, layer, is_value)
    return info


_WARM_LOCK = threading.Lock()
_warm = False


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) the CPU codec's kernels, once per process.

    numba compiles each kernel on its first call — seconds on a machine whose cache is empty —
    so a caller that times its first decode (the client's decode-speed measurement, which the
    server's controller plans with) would time the compiler. This encodes and decodes a tiny
    stream for every CPU path: no profile into float16, bfloat16 and float32, and, when a
    shipped profile carries a transform, its basis path. Thread-safe; later calls return at once.
    """
    global _warm
    if _warm:
        return
    with _WARM_LOCK:
        if _warm:
            return
        from kvcodec.codec.profile import builtin_profiles

        gen = torch.Generator().manual_seed(0)
        kv = torch.randn(2, 1, 2, 96, 8, generator=gen).half()
        blob = encode(kv[0], kv[1], level=DEFAULT_LEVEL, profile=None)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            decode(blob, dtype=dtype)
        profile = next((p for _, p in builtin_profiles() if p.has_transform), None)
        if profile is not None:
            kv = torch.randn(2, profile.layers, profile.kv_heads, 8, profile.head_dim, generator=gen).half()
            decode(encode(kv[0], kv[1], level=DEFAULT_LEVEL, profile=profile), profile=profile)
        _warm = True
