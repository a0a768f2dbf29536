"""Coder 3 decoding as one fused Triton kernel: a batch of substreams per launch.

:mod:`kvcodec.codec.rans_torch` decodes lanes in lock step with ~15 small
tensor operations per step; a 256-token substream takes ~8,200 steps, so on
a GPU it is bound by kernel launches. Here one *program* decodes one whole
substream: its (up to 32) lane states live in registers and a loop over the
steps does, per step,

* ``slot = x & (M - 1)``, the symbol by a gather from the class's
  slot-to-symbol table, ``x = f * (x >> 14) + slot - cum``;
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

from functools import lru_cache

import numpy as np
import torch

from kvcodec.codec import rans
from kvcodec.codec.errors import CorruptStream, InvalidInput
from kvcodec.codec.rans_torch import Substream, _lanes, device_tables

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
    "words": "*i32", "word_start": "*i64", "word_end": "*i64", "init": "*i64", "n_syms": "*i64",
    "lanes_of": "*i64", "tokens_of": "*i64", "cls_buf": "*i32", "cls_off": "*i64", "esc_buf": "*i32",
    "esc_off": "*i64", "esc_count": "*i64", "slot2sym": "*i32", "freq": "*i32", "cum": "*i32",
    "esc_e": "*i32", "out": "*i32", "out_off": "*i64", "status": "*i64",
}
NUM_WARPS = 1  # one program holds one substream's 32 lanes: one warp


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

    constexprs = {"PROB_BITS": rans.PROB_BITS, "ALPHABET": int(rans.FREQ.shape[1]), "LANES": rans.LANES}
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


def _pack(subs: list[Substream], counts: list[int]) -> dict[str, np.ndarray]:
    """Host-side batch arrays for the substreams with symbols (bounds checked here)."""
    cols: dict[str, list] = {k: [] for k in ("words", "start", "end", "init", "n", "lanes", "tokens",
                                              "cls", "cls_off", "esc", "esc_off", "esc_count", "out_off")}
    wpos = cpos = epos = opos = 0
    for b, (s, n) in enumerate(zip(subs, counts)):
        lanes = _lanes(n)
        w = np.asarray(s.words, dtype=np.int64)
        if len(w) < 2 * lanes:
            raise CorruptStream(f"batch item {b}: entropy payload: {rans._ERRORS[6]}")
        init = np.full(rans.LANES, rans.STATE_LOW, dtype=np.int64)
        init[:lanes] = w[0 : 2 * lanes : 2] | (w[1 : 2 * lanes : 2] << 16)
        coded = s.classes[s.classes != 0].astype(np.int32)
        for key, value in (("words", w), ("init", init), ("cls", coded), ("esc", np.asarray(s.escapes, np.int64))):
            cols[key].append(value)
        for key, value in (("start", wpos + 2 * lanes), ("end", wpos + len(w)), ("n", n), ("lanes", lanes),
                           ("tokens", s.tokens), ("cls_off", cpos), ("esc_off", epos),
                           ("esc_count", len(s.escapes)), ("out_off", opos)):
            cols[key].append(value)
        wpos, cpos, epos, opos = wpos + len(w), cpos + len(coded), epos + len(s.escapes), opos + n
    flat = {k: np.concatenate(cols[k] + [np.zeros(1, np.int64)]) for k in ("words", "cls", "esc")}
    flat["init"] = np.concatenate(cols["init"])
    flat.update({k: np.asarray(v, dtype=np.int64) for k, v in cols.items() if k not in flat})
    flat["total"] = np.int64(opos)
    return flat


def _launch(p: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """One kernel launch over the packed batch; returns (flat deltas, status [B, 4])."""
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in p.items() if k != "total"}
    t["words"] = t["words"].to(torch.int32)
    t["cls"] = t["cls"].to(torch.int32)
    t["esc"] = t["esc"].to(torch.int32)
    slot2sym, freq, cum, esc_e = device_tables(device, torch.int32)
    batch = len(p["n"])
    out = torch.zeros(int(p["total"]) + 1, dtype=torch.int32, device=device)
    status = torch.zeros((batch, 4), dtype=torch.int64, device=device)
    _kernel()[(batch,)](
        t["words"], t["start"], t["end"], t["init"], t["n"], t["lanes"], t["tokens"], t["cls"], t["cls_off"],
        t["esc"], t["esc_off"], t["esc_count"], slot2sym, freq, cum, esc_e, out, t["out_off"], status,
        PROB_BITS=rans.PROB_BITS, ALPHABET=rans.FREQ.shape[1], LANES=rans.LANES, num_warps=NUM_WARPS,
    )
    return out, status.cpu().numpy()


def _check_status(p: dict[str, np.ndarray], status: np.ndarray, index: list[int]) -> None:
    """The checks of the numba decoder, on each program's final position, escapes and states."""
    for row, b in enumerate(index):
        ptr, overrun, n_esc, bad_states = (int(v) for v in status[row])
        code = 0
        if overrun:
            code = 1
        elif ptr != p["end"][row]:
            code = 2
        elif n_esc > p["esc_count"][row]:
            code = 4
        elif n_esc < p["esc_count"][row]:
            code = 5
        elif bad_states:
            code = 3
        if code:
            raise CorruptStream(f"batch item {b}: entropy payload: {rans._ERRORS[code]}")


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
    counts = [int((s.classes != 0).sum()) * s.tokens for s in subs]
    for b, (s, n) in enumerate(zip(subs, counts)):
        rans.check_classes(s.classes)
        if n == 0 and (len(s.words) or len(s.escapes)):
            raise CorruptStream(f"batch item {b}: entropy payload: {rans._ERRORS[2]}")
    index = [b for b, n in enumerate(counts) if n]
    flat = None
    if index:
        p = _pack([subs[b] for b in index], [counts[b] for b in index])
        flat, status = _launch(p, device)
        _check_status(p, status, index)
    result, pos = [], 0
    for s, n in zip(subs, counts):
        out = torch.zeros((len(s.classes), s.tokens), dtype=torch.int32, device=device)
        if n:
            coded = torch.from_numpy(np.nonzero(s.classes)[0]).to(device)
            out[coded] = flat[pos : pos + n].reshape(-1, s.tokens)
            pos += n
        result.append(out)
    return result


__all__ = ["NUM_WARPS", "available", "check_usable", "compile_for", "decode_symbols"]
