"""Coder 3 decoding as one fused Triton kernel: a batch of substreams per launch.

:mod:`kvcodec.codec.rans_torch` decodes lanes in lock step with ~15 small
tensor operations per step; a 256-token substream takes ~8,200 steps, so on
a GPU it is bound by kernel launches. Here one *program* decodes one whole
substream: its (up to 32) lane states live in registers and a loop over the
steps does, per step,

* ``slot = x & (M - 1)``; one read of the class's packed slot table gives the
  symbol, ``f`` and ``slot - cum``, then ``x = f * (x >> 14) + slot - cum``;
* the renormalisation words: lanes that need one take them in lane order,
  word ``ptr + exclusive_cumsum(need)`` (exactly the order the sequential
  numba decoder reads them);
* escapes: a running count plus an exclusive prefix sum of the escape
  symbols gives each escaped symbol its entry in the escape list;
* the delta is written to its place (channel-major, coded channels only).

A batch of ``B`` substreams is **one launch** (grid ``(B,)``) instead of
~15 launches per step. Every load is masked (words past the substream's end
read as 0 and are flagged); the launcher checks each program's final word
position, escape count and lane states against what the stream says and
raises :class:`CorruptStream` like the other decoders, so corrupt input never
reads out of bounds and never decodes silently.

Triton is optional (``pip install kvcodec[gpu]``) and imported lazily. On the
CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is first imported); that is how CI proves it bit-exact against numba.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from kvcodec.codec import rans
from kvcodec.codec.errors import CorruptStream, InvalidInput
from kvcodec.codec.rans_torch import Substream, device_tables

def available() -> bool:
    """Whether triton can be imported (the ``gpu`` extra is installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    """Whether the kernel runs in Triton's interpreter (decided when triton was first imported)."""
    return type(_kernel()).__name__ == "InterpretedFunction"


@lru_cache(maxsize=1)
def _kernel():
    """Build (once) and return the jitted kernel; raises InvalidInput without triton."""
    try:
        from kvcodec.codec import rans_triton_kernel as kernel_module
    except ImportError as exc:
        raise InvalidInput(
            "backend 'triton': triton is not installed (pip install 'kvcodec[gpu]')"
        ) from exc

    return kernel_module.rans_decode_kernel


_POINTER_TYPES = {  # the kernel's pointer arguments, as the launcher passes them
    "buf": "*i32", "word_begin": "*i64", "word_end": "*i64", "n_syms": "*i64", "lanes_of": "*i64",
    "tokens_of": "*i64", "cls_buf": "*i32", "row_buf": "*i32", "cls_off": "*i64", "esc_begin": "*i64",
    "esc_count": "*i64", "slot_info": "*i64", "esc_e": "*i32", "out": "*i32", "out_off": "*i64",
    "status": "*i64",
}
NUM_WARPS = 1  # one program holds one substream's 32 lanes: one warp
STATUS = 5  # status words per program: final word position, overrun, escapes read, bad states, short


def runs_on_cuda(device) -> bool:
    """Whether ``device`` is a CUDA device the compiled kernel can run on (what ``backend="auto"``
    picks triton for): triton is installed and was not imported in interpreter mode."""
    if device is None or torch.device(device).type != "cuda" or not available():
        return False
    try:
        check_usable(device)
    except InvalidInput:
        return False
    return True


def _constexprs() -> dict[str, int]:
    return {"PROB_BITS": rans.PROB_BITS, "LANES": rans.LANES, "STATE_LOW": rans.STATE_LOW, "STATUS": STATUS}


def slot_info() -> np.ndarray:
    """int64 ``[classes, 2**PROB_BITS]``: each slot's symbol | frequency << 12 | (slot - cum) << 27."""
    sym = rans.SLOT2SYM.astype(np.int64)
    rows = np.arange(len(sym))[:, None]
    freq, cum = rans.FREQ.astype(np.int64)[rows, sym], rans.CUM.astype(np.int64)[rows, sym]
    bias = np.arange(sym.shape[1])[None, :] - cum
    assert sym.max() < 1 << 12 and freq.max() < 1 << 15 and bias.max() < 1 << 14 and bias.min() >= 0
    return sym | (freq << 12) | (bias << 27)


_SLOT_INFO: dict[str, torch.Tensor] = {}


def _device_slot_info(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _SLOT_INFO:
        _SLOT_INFO[key] = torch.from_numpy(slot_info().reshape(-1)).to(device)
    return _SLOT_INFO[key]


def compile_for(capability: int = 90) -> dict[str, object]:
    """Compile the kernel ahead of time for a CUDA target (no GPU needed; ``ptxas`` ships with triton).

    Args:
        capability: the CUDA compute capability, e.g. 90 for the H100.

    Returns:
        Triton's assembly dict (``ttir``, ``ttgir``, ``llir``, ``ptx``, ``cubin``).

    Raises:
        InvalidInput: triton is missing, or it was imported in interpreter mode.
    """
    if _interpreting():
        raise InvalidInput("compile_for: triton runs in interpreter mode (TRITON_INTERPRET=1) in this process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = _constexprs()
    signature = {**_POINTER_TYPES, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=_kernel(), signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": NUM_WARPS})
    return compiled.asm


def check_usable(device) -> None:
    """Raise :class:`InvalidInput` unless the kernel can run on ``device``.

    Args:
        device: a CUDA device, or the CPU when triton was imported with ``TRITON_INTERPRET=1``.

    Raises:
        InvalidInput: triton is missing, or ``device`` cannot run the kernel.
    """
    device = torch.device(device or "cpu")
    interpreting = _interpreting()  # also raises if triton is missing
    if (device.type == "cuda" and not interpreting) or (device.type == "cpu" and interpreting):
        return
    raise InvalidInput(
        f"backend 'triton': device {device} cannot run the kernel (it needs CUDA; on the CPU, set "
        "TRITON_INTERPRET=1 before triton is first imported)"
    )


@dataclass
class Batch:
    """A batch of substreams for one launch, every tensor on the decoding device.

    ``buf`` holds u16 words and escapes (int16 or int32 storage; values are read as
    ``& 0xFFFF``). Per substream (int64 ``[B]``): ``word_begin``/``word_end`` bound its
    words (lane states first), ``esc_begin``/``esc_count`` its escapes, ``n`` its symbols
    (coded channels x ``tokens``), ``lanes`` ``min(32, max(1, n // 64))``. Its coded rows
    are ``cls[cls_off + r]`` (class) and ``row[cls_off + r]`` (channel), int32; the deltas
    go to ``out[out_off + channel * tokens + t]``.
    """

    buf: torch.Tensor
    word_begin: torch.Tensor
    word_end: torch.Tensor
    esc_begin: torch.Tensor
    esc_count: torch.Tensor
    n: torch.Tensor
    lanes: torch.Tensor
    tokens: torch.Tensor
    cls: torch.Tensor
    row: torch.Tensor
    cls_off: torch.Tensor
    out_off: torch.Tensor


def lanes_of(n: torch.Tensor) -> torch.Tensor:
    """Lanes of substreams with ``n`` symbols (:func:`kvcodec.codec.rans_torch._lanes`, elementwise)."""
    return torch.clamp(torch.div(n, rans.LANE_SYMBOLS, rounding_mode="floor"), 1, rans.LANES)


def coded_rows(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[B, C]`` of each substream's channels, coded ones (class != 0) first in channel order.

    Returns ``(classes, channels, coded)``: int32 classes and channel of each row, int64 coded counts.
    """
    uncoded = (classes == 0).to(torch.int8)
    order = torch.sort(uncoded, dim=1, stable=True).indices
    return classes.gather(1, order).to(torch.int32), order.to(torch.int32), (1 - uncoded.to(torch.int64)).sum(1)


def launch(batch: Batch, out: torch.Tensor) -> torch.Tensor:
    """One kernel launch over ``batch`` (asynchronous); returns the status ``[B, STATUS]`` on the device."""
    device = out.device
    for name, value in vars(batch).items():  # the kernel indexes every array as a dense vector
        if not value.is_contiguous():
            raise ValueError(f"launch: batch.{name} is not contiguous")
    esc_e = device_tables(device, torch.int32)[3]
    size = len(batch.n)
    status = torch.zeros((size, STATUS), dtype=torch.int64, device=device)
    if size:
        _kernel()[(size,)](
            batch.buf, batch.word_begin, batch.word_end, batch.n, batch.lanes, batch.tokens, batch.cls, batch.row,
            batch.cls_off, batch.esc_begin, batch.esc_count, _device_slot_info(device), esc_e, out, batch.out_off,
            status,
            **_constexprs(), num_warps=NUM_WARPS,
        )
    return status


def status_codes(status: np.ndarray, word_end: np.ndarray, esc_count: np.ndarray, n: np.ndarray,
                 leftover: np.ndarray) -> np.ndarray:
    """The numba decoder's error code (``rans._ERRORS``; 0: fine) of every program, from its status
    row; ``n``: its symbols; ``leftover``: its words plus escapes (a program with no symbols to
    decode may have none)."""
    ptr, overrun, n_esc, bad_states, short = (status[:, i] for i in range(STATUS))
    code = np.zeros(len(status), dtype=np.int64)
    for value, failed in ((3, bad_states != 0), (5, n_esc < esc_count), (4, n_esc > esc_count),
                          (2, ptr != word_end), (1, overrun != 0), (6, short != 0)):  # the last set wins
        code[failed] = value
    code[n == 0] = np.where(leftover[n == 0] > 0, 2, 0)
    return code


def decode_symbols(subs: list[Substream], device=None) -> list[torch.Tensor]:
    """Decode a batch of substreams to their deltas with one kernel launch.

    Same inputs and outputs as :func:`kvcodec.codec.rans_torch.decode_symbols`.

    Args:
        subs: the substreams (classes already checked with :func:`rans.check_classes`).
        device: a CUDA device (or the CPU under ``TRITON_INTERPRET=1``).

    Returns:
        int32 ``[channels, tokens]`` deltas per substream, on ``device``.

    Raises:
        InvalidInput: triton is not installed, or ``device`` cannot run the kernel.
        CorruptStream: a substream's words or escapes do not decode exactly
            (the message names the batch index).
    """
    device = torch.device(device or "cpu")
    check_usable(device)
    for s in subs:
        rans.check_classes(s.classes)
    words = [np.asarray(s.words, dtype=np.int32) for s in subs]
    escapes = [np.asarray(s.escapes, dtype=np.int32) for s in subs]
    sizes = np.array([[len(w), len(e)] for w, e in zip(words, escapes)], dtype=np.int64).reshape(-1, 2)
    begin = np.concatenate([[0], np.cumsum(sizes.sum(axis=1))])[:-1]
    channels = np.array([len(s.classes) for s in subs], dtype=np.int64)
    tokens = np.array([s.tokens for s in subs], dtype=np.int64)
    out_off = np.concatenate([[0], np.cumsum(channels * tokens)]).astype(np.int64)
    width = int(channels.max(initial=0))
    classes = np.zeros((len(subs), width), dtype=np.int64)
    for b, s in enumerate(subs):
        classes[b, : len(s.classes)] = s.classes
    flat = np.concatenate([np.concatenate([w, e]) for w, e in zip(words, escapes)] + [np.zeros(1, np.int32)])
    dev = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in (
        ("buf", flat), ("begin", begin), ("sizes", sizes), ("tokens", tokens), ("out_off", out_off[:-1]),
        ("classes", classes))}
    cls, row, coded = coded_rows(dev["classes"])
    n = coded * dev["tokens"]
    word_end = dev["begin"] + dev["sizes"][:, 0]
    batch = Batch(dev["buf"], dev["begin"], word_end, word_end, dev["sizes"][:, 1].contiguous(), n, lanes_of(n),
                  dev["tokens"], cls.reshape(-1), row.reshape(-1),
                  torch.arange(len(subs), device=device, dtype=torch.int64) * width, dev["out_off"])
    out = torch.zeros(int(out_off[-1]) + 1, dtype=torch.int32, device=device)
    status = launch(batch, out).cpu().numpy()
    code = status_codes(status, begin + sizes[:, 0], sizes[:, 1], n.cpu().numpy(), sizes.sum(axis=1))
    bad = np.nonzero(code)[0]
    if len(bad):
        raise CorruptStream(f"batch item {bad[0]}: entropy payload: {rans._ERRORS[int(code[bad[0]])]}")
    return [out[out_off[b] : out_off[b + 1]].reshape(int(channels[b]), int(tokens[b])) for b in range(len(subs))]


__all__ = ["NUM_WARPS", "STATUS", "Batch", "available", "check_usable", "coded_rows", "compile_for", "decode_symbols",
           "lanes_of", "launch", "runs_on_cuda", "status_codes"]
