"""One substream: a layer's keys or values for one block of tokens.

Two payload layouts, chosen by the header's mode (FORMAT.md, "Substreams"):

* quantized: the raw bits of the block's first ``n_raw`` tokens
  (``[H, n_raw, head_dim]``, attention sinks, see the header's raw_tokens),
  then, if tokens remain, with ``C = H * head_dim``:

  - coder 3 (default): ``steps f32[H] | width u8 | centers i8[C] or i16[C] |
    classes u8[C] | n_escapes u32 | escapes u16[n_escapes] | rANS words u16[...]``
    (``width`` is 1 when every centre fits in int8, else 2);
  - coder 2 (old streams): ``steps f32[H] | centers i16[C] | kmax u16[C] |
    classes u8[C] | ANS words u32[...]``.
* lossless (coder 1): the raw little-endian bits of the block in channel-major
  order ``[H, head_dim, tokens]``, split into byte planes (plane ``b`` holds
  byte ``b`` of every element), each plane a zstd frame preceded by its
  length (u32).
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from kvcodec.codec import entropy, fields, rans
from kvcodec.codec.errors import CorruptStream
from kvcodec.codec.predict import FLOOR_FACTOR
from kvcodec.codec.quantize import all_finite, dequantize_block, quantize_block, symbols
from kvcodec.codec.sideprior import SidePrior, choose_side
from kvcodec.codec.transform import Transform

ZSTD_LEVEL = 10
_U32 = struct.Struct("<I")
StepRule = Callable[..., np.ndarray]  # (block, absmax_factor=1.0) -> float32 steps [H]
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
CODER_ANS = 2
CODER_RANS = 3


def quantized_side_bytes(heads: int, dim: int, coder: int = CODER_RANS, packed: bool = False) -> int:
    """Size of the fixed side information of a quantized substream's quantized part.

    With ``packed`` (coder 3, header flag 2) the fixed part is the smallest possible
    (no side symbols coded); the coded side symbols come on top.
    """
    channels = heads * dim
    if coder == CODER_ANS:
        return 4 * heads + 5 * channels
    if packed:
        return 4 * heads + _PACKED_FIXED
    return 4 * heads + 1 + 2 * channels + 4  # with one-byte centres (the smallest layout)


def quantized_min_bytes(
    heads: int, dim: int, width: int, n_raw: int, n_quant: int, coder: int = CODER_RANS, packed: bool = False
) -> int:
    """Smallest valid quantized substream: raw tokens plus the side information."""
    return heads * n_raw * dim * width + (quantized_side_bytes(heads, dim, coder, packed) if n_quant else 0)


def side_bytes(quantized: memoryview, heads: int, dim: int, coder: int = CODER_RANS, packed: bool = False) -> int:
    """Side information of one substream's quantized part (``quantized``: the bytes after its raw
    tokens, possibly truncated): the fixed fields plus, for coder 3, the coded side symbols
    (packed) or the second byte of two-byte centres (plain). Read without checking; for ``inspect``."""
    side = quantized_side_bytes(heads, dim, coder, packed)
    at = 4 * heads
    if packed:
        if at + 10 <= len(quantized):
            side += 2 * sum(_U32x2.unpack_from(quantized, at + 2))  # n_side_escapes + n_side_words u16s
    elif coder == CODER_RANS and at < len(quantized) and quantized[at] == 2:
        side += heads * dim
    return side


# packed side information: side_classes u8[2], n_side_escapes u32, n_side_words u32, then n_escapes u32
_PACKED_FIXED = 2 + 4 + 4 + 4
_U32x2 = struct.Struct("<II")


def pack_side(
    steps: np.ndarray, centers: np.ndarray, classes: np.ndarray, packed: bool, prior: SidePrior | None = None
) -> bytes:
    """A coder-3 substream's side information, up to (not including) ``n_escapes``.

    Plain: ``steps | width | centres | classes``. Packed: ``steps | side_classes u8[2] |
    n_side_escapes u32 | n_side_words u32 | side_escapes u16[] | side_words u16[]`` where the
    side symbols are two rows of ``C``, the class differences ``classes[c] - classes[c-1]``
    (``classes[-1] = 0``) and the centres, coded with coder 3's own rANS and static classes.
    With a ``prior`` (packed only, header flag 4) the rows are the differences from the
    prior's prediction at these steps instead.
    """
    head = steps.astype("<f4").tobytes()
    if not packed:
        width = 1 if centers.size == 0 or (centers.min() >= -128 and centers.max() <= 127) else 2
        return b"".join((head, bytes((width,)), centers.astype(f"<i{width}").tobytes(), classes.tobytes()))
    rows = _side_rows(steps, centers.astype(np.int64), classes.astype(np.int64), prior).astype(np.int32)
    absd = np.abs(rows.astype(np.int64))
    side_classes = entropy.scale_classes(absd.sum(axis=1), absd.max(axis=1, initial=0), rows.shape[1])
    words, escapes = rans.encode_deltas_host(rows, side_classes)
    return b"".join((head, side_classes.tobytes(), _U32x2.pack(len(escapes), len(words)),
                     escapes.astype("<u2").tobytes(), words.astype("<u2").tobytes()))


def pack_sides(
    steps: np.ndarray, centers: np.ndarray, classes: np.ndarray, priors: list[SidePrior | None] | None = None
) -> list[bytes]:
    """:func:`pack_side` (packed) of ``N`` substreams at once: the same bytes, the numpy work
    vectorised over the substreams (``steps`` float32 ``[N, H]``, ``centers`` / ``classes``
    ``[N, C]``; ``priors``: one per substream, or None for no prior)."""
    centers = np.asarray(centers, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)
    if priors is None or all(p is None for p in priors):
        rows = np.stack([np.diff(classes, axis=1, prepend=0), centers], axis=1)  # [N, 2, C]
    else:
        rows = np.stack([_side_rows(st, cen, cls, pr) for st, cen, cls, pr in zip(steps, centers, classes, priors)])
    absd = np.abs(rows)
    side_classes = entropy.scale_classes(absd.sum(axis=2), absd.max(axis=2, initial=0), rows.shape[2])
    heads = steps.astype("<f4")
    rows32 = rows.astype(np.int32)
    out = []
    for i in range(len(rows)):
        words, escapes = rans.encode_deltas_host(rows32[i], side_classes[i])
        out.append(b"".join((heads[i].tobytes(), side_classes[i].tobytes(), _U32x2.pack(len(escapes), len(words)),
                             escapes.astype("<u2").tobytes(), words.astype("<u2").tobytes())))
    return out


def _side_rows(steps: np.ndarray, centers: np.ndarray, classes: np.ndarray, prior: SidePrior | None) -> np.ndarray:
    """The two side rows (int64 ``[2, C]``) that code ``classes`` and ``centers``."""
    if prior is None:
        return np.stack([np.diff(classes, prepend=0), centers])
    pred_classes, pred_centers = prior.predict(steps)
    return np.stack([classes - pred_classes, centers - pred_centers])


@dataclass
class RansPayload:
    """The parsed quantized part of a coder-3 substream (before entropy decoding).

    Attributes:
        steps: float32 ``[H]``; centers: int32 ``[C]``; classes: uint8 ``[C]``;
        escapes: uint16 escape magnitudes; words: uint16 rANS words.
    """

    steps: np.ndarray
    centers: np.ndarray
    classes: np.ndarray
    escapes: np.ndarray
    words: np.ndarray


def _raw_bytes(x: torch.Tensor) -> bytes:
    """Little-endian bits of ``x`` in row-major order."""
    ints = x.detach().contiguous().view(_INT_VIEW[x.dtype]).cpu().numpy()
    return ints.astype(ints.dtype.newbyteorder("<")).tobytes()


def _from_raw(buf: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    width = dtype.itemsize
    ints = np.frombuffer(buf, dtype=f"<i{width}").astype(f"=i{width}").reshape(shape)
    return torch.from_numpy(ints).view(dtype)


def encode_quantized(
    x: torch.Tensor,
    step_rule: StepRule,
    n_raw: int = 0,
    coder: int = CODER_RANS,
    transform: Transform | None = None,
    first: int = 0,
    packed: bool = False,
    prior: SidePrior | None = None,
) -> bytes:
    """Encode ``x`` (``[H, T, D]`` in its stored dtype, any device).

    The first ``n_raw`` tokens (attention sinks) are stored as raw bits; the
    rest are quantized with the steps ``step_rule`` picks and entropy-coded
    with ``coder`` (3: interleaved rANS, 2: constriction ANS). With a
    ``transform`` (coder 3 only) the rest is quantized in its domain;
    ``first`` is the absolute position of the first quantized token; ``packed``
    entropy-codes coder 3's side information (header flag 2), against ``prior`` if given
    (header flag 4). (Header flag 8's streams are coded in two passes by ``api.encode``:
    :func:`transform_symbols` for every block, then :func:`encode_symbols`.)
    """
    if transform is not None and x.shape[1] > n_raw:
        steps, q = transform_symbols(x, step_rule, n_raw, transform, first)
        return encode_symbols(x, n_raw, steps, q, packed, prior)
    raw = _raw_bytes(x[:, :n_raw]) if n_raw else b""
    if x.shape[1] == n_raw:
        return raw
    rest = x[:, n_raw:].float()
    steps = step_rule(rest)
    if coder == CODER_ANS:
        block = quantize_block(rest, steps)
        classes = entropy.scale_classes(block.abs_sums, block.kmax, rest.shape[1])
        head = steps.astype("<f4").tobytes() + block.centers.astype("<i2").tobytes()
        words = entropy.encode_symbols(block.deltas, block.kmax, classes)
        return raw + head + block.kmax.astype("<u2").tobytes() + classes.tobytes() + words
    # quantize_block's float half in numba (CPU) or torch, its integer half in numba
    return raw + _code_rans(symbols(rest, steps), steps, packed, prior)


def transform_symbols(
    x: torch.Tensor, step_rule: StepRule, n_raw: int, transform: Transform, first: int, predicted: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The steps and int32 symbols ``[H, T - n_raw, D]`` (host) of ``x``'s quantized tokens in
    ``transform``'s domain, as :func:`encode_quantized` codes them (``predicted``: a substream of
    a flag-8 stream that has a prediction, whose step floor is
    :data:`kvcodec.codec.predict.FLOOR_FACTOR` times higher)."""
    rest = transform.prepare(x[:, n_raw:].float(), first)
    steps = step_rule(rest, transform.step_floor_factor() * (FLOOR_FACTOR if predicted else 1.0))
    return steps, transform.forward(rest, steps).cpu().numpy()


def encode_symbols(
    x: torch.Tensor, n_raw: int, steps: np.ndarray, q: np.ndarray, packed: bool, prior: SidePrior | None
) -> bytes:
    """A coder-3 substream of ``x`` (``[H, T, D]``): its first ``n_raw`` tokens raw, then the
    quantized part of int32 symbols ``q`` (``[H, T - n_raw, D]``) at ``steps``."""
    return (_raw_bytes(x[:, :n_raw]) if n_raw else b"") + _code_rans(q, steps, packed, prior)


def _code_rans(q: np.ndarray, steps: np.ndarray, packed: bool, prior: SidePrior | None) -> bytes:
    """Coder 3's quantized part of int32 symbols ``q`` ``[H, T, D]``: side information and words."""
    centers, deltas, kmax, abs_sums = rans.channel_deltas(q)
    classes = entropy.scale_classes(abs_sums, kmax, q.shape[1])
    if packed and prior is not None:
        centers, classes, shifts = choose_side(deltas, centers, classes, prior.predict(steps))
        deltas = deltas - shifts[:, None].astype(deltas.dtype)
    words, escapes = rans.encode_deltas(deltas, classes)
    return b"".join((
        pack_side(steps, centers, classes, packed, prior), _U32.pack(len(escapes)), escapes.astype("<u2").tobytes(),
        words.astype("<u2").tobytes(),
    ))


def parse_rans(
    payload: memoryview, heads: int, dim: int, packed: bool = False, prior: SidePrior | None = None
) -> RansPayload:
    """Split a coder-3 quantized part (after the raw tokens) into its fields (``prior``: the
    side-information prior of a flag-4 stream's substream).

    Raises:
        CorruptStream: a field is invalid or does not fit the substream.
    """
    steps, centers, classes, escapes, words_at = _parse(payload, heads, dim, packed, prior)
    words = np.frombuffer(payload, dtype="<u2", offset=words_at).astype(np.uint16)
    return RansPayload(steps, centers, classes, escapes, words)


_NO_PRIOR = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))


def _parse(payload: memoryview, heads: int, dim: int, packed: bool, prior: SidePrior | None):
    """Every field of a coder-3 quantized part but the words: ``(steps, centres, classes,
    escapes, words_at)``, the words starting at byte ``words_at``. The steps are read here (a
    prior's prediction depends on them), the rest by :func:`kvcodec.codec.fields.parse`, which
    takes the part as read-only uint8 (one numba signature whatever the buffer).

    Raises:
        CorruptStream: a field is invalid or does not fit the substream.
    """
    channels = heads * dim
    fixed = quantized_side_bytes(heads, dim, CODER_RANS, packed)
    if len(payload) < fixed:
        raise CorruptStream(f"side information: {len(payload)} bytes, needs {fixed}")
    p = np.frombuffer(payload, dtype=np.uint8)
    p.flags.writeable = False
    steps = _read_steps(payload, heads)
    pred = _NO_PRIOR
    if packed and prior is not None:
        pred = tuple(np.asarray(x, dtype=np.int64) for x in prior.predict(steps))
    centers, classes = np.empty(channels, dtype=np.int32), np.empty(channels, dtype=np.uint8)
    status, a, b, esc_at, n_esc, words_at = fields.parse(p, 4 * heads, channels, packed, *pred, centers, classes,
                                                         rans.ESC, rans.FREQ, rans.CUM, rans.SLOT2SYM)
    if status:
        raise CorruptStream(fields.message(status, a, b, len(p)))
    escapes = np.frombuffer(payload, dtype="<u2", count=n_esc, offset=esc_at).astype(np.uint16)
    return steps, centers, classes, escapes, words_at


def _read_steps(payload: memoryview, heads: int) -> np.ndarray:
    steps = struct.unpack_from(f"<{heads}f", payload)  # a handful: cheaper in Python than in numpy
    if not all(0 < s < math.inf for s in steps):  # NaN fails too
        raise CorruptStream(f"step sizes: invalid value in {list(steps)}")
    return np.array(steps, dtype=np.float32)


def split_raw(
    payload: memoryview, heads: int, tokens: int, dim: int, stored: torch.dtype, n_raw: int, coder: int,
    packed: bool = False,
) -> tuple[torch.Tensor | None, memoryview]:
    """Check the substream's minimum size; return its raw tokens (or None) and the rest.

    Raises:
        CorruptStream: the substream is too short, or has stray bytes after raw-only content.
    """
    width = stored.itemsize
    n_quant = tokens - n_raw
    need = quantized_min_bytes(heads, dim, width, n_raw, n_quant, coder, packed)
    if len(payload) < need:
        raise CorruptStream(f"side information: {len(payload)} bytes, needs {need}")
    raw_len = heads * n_raw * dim * width
    raw = _from_raw(payload[:raw_len], (heads, n_raw, dim), stored) if n_raw else None
    if raw is not None and not all_finite(raw):  # the encoder refuses NaN/Inf
        raise CorruptStream("raw tokens: non-finite value in a quantized stream")
    if n_quant == 0 and len(payload) != raw_len:
        raise CorruptStream(f"raw tokens: {len(payload) - raw_len} stray bytes at the end")
    return raw, payload[raw_len:]


_DIRECT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the CPU kernels write


def _writes_directly(device, dtype: torch.dtype, transform: Transform | None, out: torch.Tensor | None) -> bool:
    """Whether the CPU kernels decode a coder-3 block straight into its output (identity
    transforms, other devices and dtypes, outputs whose last axis is strided go through integer
    deltas and dequantize_block)."""
    on_cpu = torch.device(device or "cpu").type == "cpu"
    return (on_cpu and dtype in _DIRECT_DTYPES and (transform is None or not transform.identity)
            and (out is None or (out.dtype == dtype and out.device.type == "cpu" and out.stride(2) == 1)))


def decode_quantized(
    payload: memoryview,
    heads: int,
    tokens: int,
    dim: int,
    stored: torch.dtype,
    dtype: torch.dtype,
    device=None,
    n_raw: int = 0,
    coder: int = CODER_RANS,
    out: torch.Tensor | None = None,
    transform: Transform | None = None,
    first: int = 0,
    packed: bool = False,
    prior: SidePrior | None = None,
    capture: list | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`encode_quantized`; raises :class:`CorruptStream` on bad content.

    With ``out`` (``[heads, tokens, dim]`` of ``dtype`` on ``device``, e.g. a slice of
    the caller's output) the block is written there and ``out`` is returned. For streams with
    a transform: ``capture`` (a list) receives the quantized tokens' symbols, token-major
    ``[T - n_raw, H * D]`` (integers, numpy or torch); ``offset`` (float64 ``[T - n_raw, H * D]``
    integers: a flag-8 stream's prediction of its values) is added to the symbols decoded.
    """
    raw, payload = split_raw(payload, heads, tokens, dim, stored, n_raw, coder, packed)
    n_quant = tokens - n_raw
    if n_quant == 0:
        return raw.to(dtype).to(device)
    if coder == CODER_RANS and _writes_directly(device, dtype, transform, out):
        target = torch.empty((heads, tokens, dim), dtype=dtype) if out is None else out
        _decode_direct(payload, heads, dim, n_quant, packed, prior, transform, first, target[:, n_raw:], capture,
                       offset)
        if raw is not None:
            target[:, :n_raw] = raw.to(dtype)
        return target
    if coder == CODER_RANS:
        p = parse_rans(payload, heads, dim, packed, prior)
        deltas = rans.decode_deltas(p.words, p.escapes, p.classes, n_quant)
        quant = dequantize_block(p.steps, p.centers, deltas, heads, dim, dtype, device, transform, first, capture,
                                 offset)
    else:
        steps, centers, deltas = _decode_ans(payload, heads, dim, n_quant)
        quant = dequantize_block(steps, centers, deltas, heads, dim, dtype, device, transform, first)
    if out is not None:
        if raw is not None:
            out[:, :n_raw] = raw.to(dtype)
        out[:, n_raw:] = quant
        return out
    if raw is None:
        return quant
    return torch.cat([raw.to(dtype).to(device), quant], dim=1)


_UNIT_STEP = np.ones(1, dtype=np.float32)
_scratch = threading.local()


def _decode_direct(
    payload: memoryview, heads: int, dim: int, tokens: int, packed: bool, prior: SidePrior | None,
    transform: Transform | None, first: int, dest: torch.Tensor, capture: list | None = None,
    offset: torch.Tensor | None = None,
) -> None:
    """Decode a coder-3 quantized part into ``dest`` (CPU float32, float16 or bfloat16
    ``[heads, tokens, dim]``, last axis contiguous) with as little as possible under the GIL:
    the fields parsed in numba, the words copied once (by numpy: numba's element-wise copy is
    20x slower) into this thread's buffer (a fresh 150 KB array costs its page faults again
    each time), then the rANS kernel, which dequantizes as it decodes — or, with a transform,
    writes the symbols in the layout its basis multiplies (float32 token-major
    ``[tokens, channels]``, exact) for :meth:`Transform.inverse_into` (``capture`` and ``offset``:
    see :func:`decode_quantized`).

    Raises:
        CorruptStream: as :func:`parse_rans`, or the words do not decode.
    """
    channels = heads * dim
    steps, centers, classes, escapes, words_at = _parse(payload, heads, dim, packed, prior)
    n_words = (len(payload) - words_at) // 2
    words = _word_buffer(n_words + tokens)
    words[:n_words] = np.frombuffer(payload, dtype="<u2", count=n_words, offset=words_at)
    words[n_words:] = 0  # the kernel's padding
    if transform is None:
        flat, kind, lo, hi = rans.output_bits(dest)
        target = (flat, dest.storage_offset(), dest.stride(0), dest.stride(1), tokens, kind, centers, steps, lo, hi)
    else:  # one "head" of every channel, unit step: the symbols themselves
        symbols = np.empty(tokens * channels, dtype=np.uint32)
        target = (symbols, 0, 0, channels, tokens, rans.OUT_FLOAT32, centers, _UNIT_STEP, rans.NEG_INF, rans.POS_INF)
    rans._check(rans._decode(words, escapes, classes, rans.ESC, rans.FREQ, rans.CUM, rans.SLOT2SYM, *target))
    if transform is not None:
        q = symbols.view(np.float32).reshape(tokens, channels)
        if offset is not None:  # integers below 2**24: exact in float32
            np.add(q, offset.numpy(), out=q, casting="unsafe")
        if capture is not None:
            capture.append(q)
        transform.inverse_into(q, steps, first, dest)


def _word_buffer(n: int) -> np.ndarray:
    """This thread's uint16 scratch for ``n`` words (grown when needed, kept between substreams)."""
    buf = getattr(_scratch, "words", None)
    if buf is None or len(buf) < n:
        buf = _scratch.words = np.empty(max(n, 1 << 16), dtype=np.uint16)
    return buf[:n]


def _decode_ans(payload: memoryview, heads: int, dim: int, n_quant: int):
    """Coder 2: side information and constriction ANS words -> (steps, centers, deltas)."""
    channels = heads * dim
    steps = _read_steps(payload, heads)
    pos = 4 * heads
    centers = np.frombuffer(payload[pos : pos + 2 * channels], dtype="<i2").astype(np.int32)
    pos += 2 * channels
    kmax = np.frombuffer(payload[pos : pos + 2 * channels], dtype="<u2").astype(np.int32)
    pos += 2 * channels
    classes = np.frombuffer(payload[pos : pos + channels], dtype=np.uint8)
    entropy.check_classes(classes, kmax)
    deltas = entropy.decode_symbols(payload[quantized_side_bytes(heads, dim, CODER_ANS) :], kmax, classes, n_quant)
    return steps, centers, deltas


def encode_lossless(x: torch.Tensor) -> bytes:
    """Byte-plane split + zstd of ``x`` (``[H, T, D]`` in its own dtype)."""
    width = x.element_size()
    ints = x.detach().permute(0, 2, 1).contiguous().view(_INT_VIEW[x.dtype]).cpu().numpy()
    planes = ints.astype(ints.dtype.newbyteorder("<")).view(np.uint8).reshape(-1, width).T
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    out = []
    for plane in planes:
        frame = cctx.compress(np.ascontiguousarray(plane).tobytes())
        out.append(_U32.pack(len(frame)) + frame)
    return b"".join(out)


def decode_lossless(
    payload: memoryview, heads: int, tokens: int, dim: int, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """Inverse of :func:`encode_lossless`."""
    width = dtype.itemsize
    count = heads * tokens * dim
    dctx = zstandard.ZstdDecompressor()
    planes = np.empty((width, count), dtype=np.uint8)
    pos = 0
    for b in range(width):
        if pos + 4 > len(payload):
            raise CorruptStream(f"byte plane {b}: length field past the end of the substream")
        n = _U32.unpack_from(payload, pos)[0]
        pos += 4
        if pos + n > len(payload):
            raise CorruptStream(f"byte plane {b}: {n} bytes past the end of the substream")
        frame = bytes(payload[pos : pos + n])
        try:
            # a declared content size overrides max_output_size: check it before allocating
            size = zstandard.get_frame_parameters(frame).content_size
            if size not in (count, zstandard.CONTENTSIZE_UNKNOWN):
                raise CorruptStream(f"byte plane {b}: frame declares {size} bytes, expected {count}")
            raw = dctx.decompress(frame, max_output_size=count)
        except zstandard.ZstdError as exc:
            raise CorruptStream(f"byte plane {b}: {exc}") from None
        if len(raw) != count:
            raise CorruptStream(f"byte plane {b}: {len(raw)} bytes, expected {count}")
        planes[b] = np.frombuffer(raw, dtype=np.uint8)
        pos += n
    if pos != len(payload):
        raise CorruptStream(f"lossless substream: {len(payload) - pos} stray bytes at the end")
    ints = np.ascontiguousarray(planes.T).view(f"<i{width}").reshape(heads, dim, tokens)
    t = torch.from_numpy(ints.astype(f"=i{width}")).view(dtype)
    return t.permute(0, 2, 1).contiguous().to(device)
