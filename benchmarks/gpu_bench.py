#!/usr/bin/env python
"""Codec speed on a device, and bit-exactness between the CPU and device paths.

    python benchmarks/gpu_bench.py --device cpu --check     # bit-exactness; exit 1 on any mismatch
    python benchmarks/gpu_bench.py --device cuda             # throughput on the GPU vs copies
    python benchmarks/gpu_bench.py --device cpu --kv smol.safetensors   # CPU table (issue 4 target)

With triton installed (extra ``gpu``) the fused Triton decoder and encoder are
timed on CUDA and checked by ``--check`` (on the CPU in Triton's interpreter, on
a small slice of each case: the interpreter runs the kernel step by step in
Python). ``--check`` also holds the device entropy encoders
(:mod:`kvcodec.codec.rans_encode`, torch and Triton) to the numba encoder's
bytes, substream by substream and as whole streams.

Encode rows: ``encode`` is the whole encoder: ``numba`` quantizes each substream
where the tensors are and entropy-codes it on host threads; ``triton`` / ``torch``
run the batched device pipeline (:mod:`kvcodec.codec.device_encode`: statistics,
symbols and side information of every substream on the device, one entropy batch,
only the small side arrays and the words cross to the host); ``--check`` holds the
batched streams to numba's bytes (with and without a profile transform).
``entropy encode`` is the entropy stage alone on a chunk's substreams (the
deltas and classes the quantizer produced): numba on one thread, or every
substream in one batch on the device (``triton``: one launch; the deltas start
on the device, as a GPU quantizer would leave them, and the words end on the host).

Throughput is GB/s (or MB/s) of fp16 KV: bytes of the uncompressed keys and
values over the wall time. Chunks are 8B-shaped (32 layers x 8 kv heads x 128
dims); the KV is either a real model's KV (``--kv``, a ``kvcodec prefill``
file, tiled to the 8B shape: layer l <- l mod L, head h dims 0..63/64..127 <-
source heads h and h+1 mod H) or synthetic (Laplace values, per-channel scales,
a few outlier channels and tokens). Every speed is printed with its size in
bits per element. On CUDA the decode is compared with a device-to-device copy
(the bandwidth limit) and a host-to-device copy of the fp16 KV (what
compression has to beat).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table  # noqa: E402

from kvcodec.codec import decode, encode, rans, rans_triton  # noqa: E402
from kvcodec.codec.layers import decode_layers  # noqa: E402
from kvcodec.codec.rans_encode import encode_deltas_batch  # noqa: E402

SHAPE = (32, 8, 128)  # layers, kv heads, head dim


def synthetic_kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplace-ish fp16 KV with per-channel scales, outlier key channels and a few outlier tokens."""
    layers, heads, dim = SHAPE
    g = torch.Generator().manual_seed(seed)
    lap = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(seed)
    scale = torch.rand(layers, heads, 1, dim, generator=g) * 1.5 + 0.2
    keys = lap.sample((layers, heads, tokens, dim)) * scale
    keys[..., :4] *= 12.0  # outlier channels (as real keys have)
    keys[:, :, :: max(1, tokens // 7)] *= 4.0  # outlier tokens
    values = lap.sample((layers, heads, tokens, dim)) * 0.5
    return keys.half(), values.half()


def tiled_kv(path: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile a real model's KV (``kvcodec prefill`` output) to the 8B shape."""
    from kvcodec.codec.kvfile import read_kv

    kv = read_kv(path)
    out = []
    for t in (kv.keys, kv.values):
        src_layers, src_heads, src_tokens, src_dim = t.shape
        reps = -(-tokens // src_tokens)
        t = t.repeat(1, 1, reps, 1)[:, :, :tokens]
        layers = [t[layer % src_layers] for layer in range(SHAPE[0])]
        heads = []
        for layer in layers:
            row = []
            for h in range(SHAPE[1]):
                halves = [layer[(h + j) % src_heads] for j in range(-(-SHAPE[2] // src_dim))]
                row.append(torch.cat(halves, dim=-1)[..., : SHAPE[2]])
            heads.append(torch.stack(row))
        out.append(torch.stack(heads).to(torch.float16).contiguous())
    return out[0], out[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after one warm-up.

    The process CPU seconds per run are kept in ``timed.cpu`` (on a loaded
    machine, wall time over-states the cost; CPU time does not).
    """
    fn()
    _sync(device)
    times = []
    cpu = time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    timed.cpu = (time.process_time() - cpu) / repeats
    timed.best = min(times)
    return statistics.median(times)


def entropy_items(k: torch.Tensor, v: torch.Tensor, level: str, block: int = 256):
    """The (deltas, classes) of every substream the encoder entropy-codes, with numba's (words, escapes)."""
    items, coded = [], []

    def record(deltas, classes):
        token = rans.DEVICE_ENCODER.set(None)  # the numba encoder itself, for the reference
        try:
            coded.append(rans.encode_deltas(deltas, classes))
        finally:
            rans.DEVICE_ENCODER.reset(token)
        items.append((deltas.copy(), classes.copy()))
        return coded[-1]

    token = rans.DEVICE_ENCODER.set(record)
    try:
        encode(k, v, level=level, token_block=block)  # one thread: the context variable is this thread's
    finally:
        rans.DEVICE_ENCODER.reset(token)
    return items, coded


def _check_encoders(name: str, k, v, level: str, block: int, device: str, backends, failures: list[str]) -> None:
    """Device entropy encoders: the numba words and escapes per substream (one batch), and the same stream."""
    items, ref = entropy_items(k, v, level, block)
    blob = encode(k, v, level=level, token_block=block)
    for backend in backends:
        got = encode_deltas_batch(items, device, backend)
        bad = [i for i, (a, b) in enumerate(zip(ref, got)) if not (_same(a[0], b[0]) and _same(a[1], b[1]))]
        if bad or len(got) != len(ref):
            failures.append(f"{name}: {backend} entropy encoder on {device} differs in substreams {bad[:5]}")
        kd, vd = k.to(device), v.to(device)
        if encode(kd, vd, level=level, token_block=block, backend=backend) != blob:  # the batched device pipeline
            failures.append(f"{name}: encode(backend={backend}) on {device} gives other bytes than numba")


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu().view(torch.int16), b.cpu().view(torch.int16))


def check(device: str, kv_path: str | None) -> int:
    """Bit-exactness: encoders agree, and every stream decodes identically on every path."""
    failures = []
    cases = [(synthetic_kv(40, seed=s), lv, tb) for s, lv, tb in ((1, "balanced", 16), (2, "high", 32), (3, "compact", 7))]
    if kv_path:
        cases.append((tiled_kv(kv_path, 64), "balanced", 32))
    for (k, v), level, block in cases:
        k, v = k[:3], v[:3]  # 3 layers keep the torch decoder quick on a CPU
        name = f"{level}/block {block}"
        blob = encode(k, v, level=level, token_block=block)
        if encode(k, v, level=level, token_block=block, threads=2) != blob:
            failures.append(f"{name}: 1-thread and 2-thread encodes differ")
        if encode(k.to(device), v.to(device), level=level, token_block=block) != blob:
            failures.append(f"{name}: encoding {device} tensors gives other bytes than CPU tensors")
        ref = decode(blob, backend="numba")
        for backend in ("numba", "torch", "auto"):  # auto: triton on CUDA when installed
            got = decode(blob, device=device, backend=backend)
            if not (_equal(got.keys, ref.keys) and _equal(got.values, ref.values)):
                failures.append(f"{name}: decode on {device} with {backend} differs from the CPU numba decode")
            for layer, keys, values in decode_layers(blob, device=device, backend=backend, threads=2):
                if not (_equal(keys, ref.keys[layer]) and _equal(values, ref.values[layer])):
                    failures.append(f"{name}: decode_layers({backend}, {device}) layer {layer} differs")
        _check_encoders(name, k, v, level, block, device, ["torch"], failures)
        tried = _check_triton(name, k, v, level, block, device, failures)
        print(f"checked {name}: {len(blob)} bytes, decoders and encoders numba/torch{tried} on {device}")
    _check_transform_streams(device, failures)
    _check_shipped_profile(device, failures)
    for f in failures:
        print("MISMATCH:", f)
    print("bit-exact" if not failures else f"{len(failures)} mismatches")
    return 1 if failures else 0


def bench_profile(k: torch.Tensor, seed: int = 9):
    """A profile with a transform for ``k``'s layout (bases fitted on other synthetic KV; RoPE-free)."""
    from kvcodec.codec import transform as tr
    from kvcodec.codec.profile import Profile

    layers, heads, tokens, dim = k.shape
    weights = np.ones((layers, 2, heads))
    prof = Profile("bench", layers, heads, dim, weights, {"high": 0.05, "balanced": 0.2, "compact": 0.5})
    fk, fv = synthetic_kv(64, seed)
    prof.bases = tr.fit_bases([(fk[:layers, :heads, :, :dim].float(), fv[:layers, :heads, :, :dim].float())],
                              weights, dim, None)
    return prof


def _check_transform_streams(device: str, failures: list[str]) -> None:
    """Streams coded in a profile's transform: the batched device encoders write numba's bytes."""
    k, v = synthetic_kv(40, seed=4)
    k, v = k[:2], v[:2]
    prof = bench_profile(k)
    backends = ["torch"] + (["triton"] if _triton_usable(device) else [])
    for backend in backends:
        kk, vv = (k[:1, :2, :16], v[:1, :2, :16]) if backend == "triton" and device == "cpu" else (k, v)
        p = prof if kk.shape == k.shape else bench_profile(kk)
        for level in ("high", "compact"):
            ref = encode(kk, vv, level=level, token_block=16, profile=p, sink_tokens=3)
            if encode(kk.to(device), vv.to(device), level=level, token_block=16, profile=p, sink_tokens=3,
                      backend=backend) != ref:
                failures.append(f"transform/{level}: encode(backend={backend}) on {device} differs from numba")
    print(f"checked transform streams: encoders numba/{'/'.join(backends)} on {device}")


def _check_shipped_profile(device: str, failures: list[str]) -> None:
    """Streams coded with the shipped SmolLM2 profile (RoPE keys, layer-wide key bases, per-head
    value bases, side priors, prediction: header flags 1, 2, 4 and 8) decode alike on every path."""
    from kvcodec.codec.profile import builtin_profile

    if device == "cpu" or builtin_profile("smollm2-135m", 30, 3, 64) is None:
        # in the interpreter this takes minutes; tests/test_codec_gpu_decode.py checks the same
        # flags on a tiny profile
        print("checked shipped profile: skipped (CPU, or no shipped SmolLM2 profile)")
        return
    gen = torch.Generator().manual_seed(11)
    tokens = 300
    k = (torch.randn(30, 3, tokens, 64, generator=gen) * 2).half()
    v = torch.randn(30, 3, tokens, 64, generator=gen).half()
    backends = ["torch"] + (["triton"] if _triton_usable(device) else [])
    for level in ("high", "balanced", "compact"):
        blob = encode(k, v, level=level, model="smollm2-135m", sink_tokens=4)
        ref = decode(blob, backend="numba")
        for backend in backends:
            got = decode(blob, device=device, backend=backend)
            if not (_equal(got.keys, ref.keys) and _equal(got.values, ref.values)):
                failures.append(f"shipped profile/{level}: decode on {device} with {backend} differs from numba")
        if encode(k.to(device), v.to(device), level=level, model="smollm2-135m", sink_tokens=4,
                                      backend=backends[-1]) != blob:
            failures.append(f"shipped profile/{level}: encode(backend={backends[-1]}) on {device} differs from numba")
    print(f"checked shipped profile ({tokens} tokens, flags 1/2/4/8): decoders numba/{'/'.join(backends)} on {device}")


def _triton_usable(device: str) -> bool:
    if not rans_triton.available():
        return False
    try:
        rans_triton.check_usable(device)
    except Exception:  # noqa: BLE001 - InvalidInput: this device cannot run it
        return False
    return True


def _check_triton(name: str, k, v, level: str, block: int, device: str, failures: list[str]) -> str:
    """The Triton decoder against the CPU numba decode (a small slice in the CPU interpreter)."""
    if not _triton_usable(device):
        return ""
    if device == "cpu":
        k, v = k[:1, :2, :16], v[:1, :2, :16]
    blob = encode(k, v, level=level, token_block=block)
    ref = decode(blob, backend="numba")
    got = decode(blob, device=device, backend="triton")
    if not (_equal(got.keys, ref.keys) and _equal(got.values, ref.values)):
        failures.append(f"{name}: decode on {device} with triton differs from the CPU numba decode")
    for layer, keys, values in decode_layers(blob, device=device, backend="triton", batch_layers=1):
        if not (_equal(keys, ref.keys[layer]) and _equal(values, ref.values[layer])):
            failures.append(f"{name}: decode_layers(triton, {device}) layer {layer} differs")
    _check_encoders(name, k, v, level, block, device, ["triton"], failures)
    return "/triton" + (f" (interpreter, {tuple(k.shape)})" if device == "cpu" else "")


def _row(label, tokens, backend, threads, nbytes, seconds, bits) -> list[object]:
    cpu = getattr(timed, "cpu", 0.0)
    per_core = f"{nbytes / cpu / 1e6:,.0f}" if cpu > 0 else "-"
    best = getattr(timed, "best", seconds)
    return [label, tokens, backend, threads, f"{bits:.3f}", f"{nbytes / seconds / 1e6:,.0f}",
            f"{nbytes / best / 1e6:,.0f}", f"{seconds * 1e3:.1f}", f"{cpu * 1e3:.1f}", per_core]


def parallel_control(work: int = 5_000_000) -> float:
    """Speed-up of 2 threads over 1 on a GIL-free numba loop: the parallelism the machine gives now."""
    from concurrent.futures import ThreadPoolExecutor

    from numba import njit

    @njit(nogil=True)
    def spin(n):
        s = 0
        for i in range(n):
            s = (s * 1103515245 + i) % 2147483647
        return s

    spin(10)
    walls = []
    for threads in (1, 2):
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(spin, [work] * 4))
            walls.append(time.perf_counter() - t)
    return walls[0] / walls[1]


def _entropy_encode_rows(k, v, tokens, device, nbytes, bits, repeats, with_torch: bool) -> list[list[object]]:
    """The entropy stage alone on the chunk's substreams: numba (1 thread) vs the device encoders (one batch)."""
    items, _ = entropy_items(k, v, "balanced")
    s = timed(lambda: [rans.encode_deltas(d, c) for d, c in items], "cpu", repeats)
    rows = [_row("entropy encode", tokens, "numba", 1, nbytes, s, bits)]
    on_device = [(torch.from_numpy(d).to(device), torch.from_numpy(c).to(device)) for d, c in items]
    if device.startswith("cuda") and _triton_usable(device):  # one launch for every substream
        s = timed(lambda: encode_deltas_batch(on_device, device, "triton"), device, repeats)
        rows.append(_row("entropy encode", tokens, "triton", "-", nbytes, s, bits))
    if with_torch:
        s = timed(lambda: encode_deltas_batch(on_device, device, "torch"), device, 1)
        rows.append(_row("entropy encode", tokens, "torch", "-", nbytes, s, bits))
    return rows


def speed(device: str, tokens_list: list[int], kv_path: str | None, repeats: int, torch_tokens: int,
          numba_tokens: int) -> str:
    """Encode/decode throughput table (plus copy baselines on CUDA)."""
    before = parallel_control()
    cuda = device.startswith("cuda")
    triton = _triton_usable(device) and cuda
    rows = []
    for tokens in tokens_list:
        k, v = tiled_kv(kv_path, tokens) if kv_path else synthetic_kv(tokens)
        nbytes = 2 * k.numel() * 2
        kd, vd = k.to(device), v.to(device)
        blob = encode(kd, vd, level="balanced")
        bits = 8 * len(blob) / (2 * k.numel())
        if tokens <= numba_tokens:
            # and one thread more than the cores: faster only while a worker waiting for the GIL
            # leaves a core idle (benchmarks/RESULTS.md, "Codec speed", sixth session)
            for threads in sorted({1, 2, (os.cpu_count() or 1) + 1}):
                s = timed(lambda: encode(kd, vd, level="balanced", threads=threads), device, repeats)
                rows.append(_row("encode", tokens, "numba", threads, nbytes, s, bits))
                s = timed(lambda: decode(blob, device=device, backend="numba", threads=threads), device, repeats)
                rows.append(_row("decode", tokens, "numba", threads, nbytes, s, bits))
            rows += _entropy_encode_rows(k, v, tokens, device, nbytes, bits, repeats, tokens <= torch_tokens)
        if tokens <= torch_tokens:  # the lock-step torch reference coders
            s = timed(lambda: decode(blob, device=device, backend="torch"), device, 1)
            rows.append(_row("decode", tokens, "torch", "-", nbytes, s, bits))
            s = timed(lambda: encode(kd, vd, level="balanced", backend="torch"), device, 1)
            rows.append(_row("encode", tokens, "torch", "-", nbytes, s, bits))
        if triton:
            rows += _triton_rows(kd, vd, tokens, device, nbytes, repeats)
        s = timed(lambda: kd.clone(), device, repeats) * 2  # the device's copy bandwidth (the limit)
        rows.append(_row("copy device->device", tokens, "-", "-", nbytes, s, 16.0))
        if cuda:
            pinned = k.pin_memory()
            s = timed(lambda: pinned.to(device, non_blocking=True), device, repeats) * 2
            rows.append(_row("copy host->device", tokens, "-", "-", nbytes, s, 16.0))
    source = f"tiled from {kv_path}" if kv_path else "synthetic Laplace KV with outlier channels/tokens"
    control = (f"control: 2 threads of a GIL-free numba loop ran {before:.2f}x (before) and "
               f"{parallel_control():.2f}x (after) faster than 1 thread (2.00 = two free cores)")
    head = ["op", "tokens", "entropy back end", "threads", "bits/element", "MB/s of fp16 KV (median wall)",
            "MB/s (best run)", "median wall ms", "CPU ms", "MB/s per CPU-second"]
    return (
        f"Device: {_device_name(device)}; host: {machine()}\n{control}\nKV: 8B-shaped {SHAPE}, {source}; "
        "level balanced\n\n" + markdown_table(head, rows)
    )


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def _triton_rows(kd, vd, tokens, device, nbytes, repeats) -> list[list[object]]:
    """The device pipelines: batched encode, whole-stream decode and layer-by-layer decode, each
    without and with a profile transform (``bench_profile``: the inverse transform's float64 sums)."""
    rows = []
    for label, prof in (("", None), (" (transform)", bench_profile(kd.cpu()))):
        blob = encode(kd, vd, level="balanced", backend="triton", profile=prof)
        bits = 8 * len(blob) / (2 * kd.numel())
        s = timed(lambda: encode(kd, vd, level="balanced", backend="triton", profile=prof), device, repeats)
        rows.append(_row("encode" + label, tokens, "triton", "-", nbytes, s, bits))
        s = timed(lambda: decode(blob, device=device, backend="triton", profile=prof), device, repeats)
        rows.append(_row("decode" + label, tokens, "triton", "-", nbytes, s, bits))
        pinned = torch.empty(len(blob), dtype=torch.uint8).pin_memory()  # as a network receive buffer would be
        pinned.numpy()[:] = np.frombuffer(blob, dtype=np.uint8)
        view = memoryview(pinned.numpy())
        s = timed(lambda: decode(view, device=device, backend="triton", profile=prof), device, repeats)
        rows.append(_row("decode, stream in pinned memory" + label, tokens, "triton", "-", nbytes, s, bits))

        def by_layer():
            for _ in decode_layers(blob, device=device, backend="triton", batch_layers=1, profile=prof):
                pass

        s = timed(by_layer, device, repeats)
        rows.append(_row("decode_layers, 1 layer a group" + label, tokens, "triton", "-", nbytes, s, bits))
    return rows


def sizes(kv_path: str | None, tokens: int = 256) -> str:
    """Bytes of coder 3 vs coder 2 (same quantized symbols) and the symbols' empirical entropy."""
    from kvcodec.codec import api, substream
    from kvcodec.codec.levels import get_level

    k, v = tiled_kv(kv_path, tokens) if kv_path else synthetic_kv(tokens)
    rows = []
    for level in ("high", "balanced", "compact"):
        lv = get_level(level)
        c2 = c3 = 0
        for layer in range(k.shape[0]):
            for is_value, t in ((False, k), (True, v)):
                block = t[layer]
                rule = api._step_rule(lv, None, layer, is_value)
                c2 += len(substream.encode_quantized(block, rule, 1, substream.CODER_ANS))
                c3 += len(substream.encode_quantized(block, rule, 1, substream.CODER_RANS))
        n = 2 * k.numel()
        subs, heads, dim = 2 * k.shape[0], k.shape[1], k.shape[3]
        fixed2 = subs * (heads * dim * 2 + substream.quantized_side_bytes(heads, dim, substream.CODER_ANS))
        fixed3 = subs * (heads * dim * 2 + substream.quantized_side_bytes(heads, dim, substream.CODER_RANS))
        e2, e3 = c2 - fixed2, c3 - fixed3  # entropy-coded part only (words; coder 3: + escapes)
        rows.append([level, f"{8 * c2 / n:.4f}", f"{8 * c3 / n:.4f}", f"{100 * (c3 - c2) / c2:+.2f}%",
                     f"{100 * (e3 - e2) / e2:+.2f}%"])
    source = f"tiled from {kv_path}" if kv_path else "synthetic"
    head = ["level", "coder 2 bits/element", "coder 3 bits/element", "coder 3 vs 2 (stream)",
            "coder 3 vs 2 (entropy-coded part)"]
    return f"Substream bytes, {tokens}-token 8B-shaped chunk ({source}), steps from RMS (no profile)\n\n" + markdown_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--check", action="store_true", help="run the bit-exactness checks only")
    p.add_argument("--kv", default=None, help="a KV safetensors file (kvcodec prefill) to tile to the 8B shape")
    p.add_argument("--tokens", default=None, help="comma-separated chunk sizes (default 256 on CPU, 256..4096 on CUDA)")
    p.add_argument("--torch-tokens", type=int, default=None,
                   help="largest chunk timed with the lock-step torch coders (default 256 on CUDA)")
    p.add_argument("--numba-tokens", type=int, default=None,
                   help="largest chunk timed with the host numba coders (default: all on the CPU, 1024 on CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", action="store_true", help="compare coder 3 with coder 2 on size only")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    if args.check:
        if args.device == "cpu":  # Triton's interpreter; must be set before triton is first imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
        return check(args.device, args.kv)
    if args.sizes:
        print(sizes(args.kv))
        return 0
    cuda = args.device.startswith("cuda")
    tokens = [int(t) for t in (args.tokens or ("256,1024,4096" if cuda else "256")).split(",")]
    torch_tokens = args.torch_tokens if args.torch_tokens is not None else (256 if cuda else 0)
    numba_tokens = args.numba_tokens if args.numba_tokens is not None else (1024 if cuda else max(tokens))
    print(speed(args.device, tokens, args.kv, args.repeats, torch_tokens, numba_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
