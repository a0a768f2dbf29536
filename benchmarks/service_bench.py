"""Cache-server benchmark: Get/Put over loopback, and the controller vs fixed policies.

Part 1 — a real ``kvcodec serve`` process (memory store) on loopback; 1–64
concurrent clients (threads, one channel each) Get or Put one SmolLM2-shaped
chunk (256 tokens, ``balanced``) as fast as they can for a fixed time. Reports
MB/s of chunk payload and p50/p99 latency per call. Puts use fresh token ids so
every call creates an entry (full ``verify`` on the server each time).

Part 2 — the controller simulated over bandwidth traces (0.1–10 Gb/s): per
request of an 8-chunk context, TTFT of the live controller (EWMA bandwidth fed
by the transfers it actually made) vs always loading KV at one level and vs
always recomputing. Chunk sizes and decode speeds per level are measured here
on real SmolLM2 KV (GPL-3 text); prefill speed is measured here too.

    python benchmarks/service_bench.py [--seconds 3] [--clients 1,4,16,64] [--skip-load]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table  # noqa: E402

from kvcodec.service import controller as ctl  # noqa: E402

GBPS = 1e9 / 8


# ------------------------------------------------------------- part 1: load
def _start_server(verify_processes: int = 0) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kvcodec = str(Path(sys.executable).parent / "kvcodec")
    proc = subprocess.Popen([kvcodec, "serve", "--listen", f"127.0.0.1:{port}", "--store", "memory://",
                             "--no-calibrate", "--log-level", "warning", "--max-workers", "32",
                             "--max-concurrent-rpcs", "256",
                             "--verify-processes", str(verify_processes)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()
    return proc, f"127.0.0.1:{port}"


def _chunk_blob(tokens: int = 256) -> tuple[bytes, object]:
    import torch

    from kvcodec.client.grpc_client import CacheContext, ModelLayout, encode_chunks

    layout = ModelLayout("smollm2-135m", "bench", "smollm2", 30, 3, 64, "float16")
    ctx = CacheContext(layout, list(range(tokens)), tokens)
    gen = torch.Generator().manual_seed(0)
    k = (torch.randn(30, 3, tokens, 64, generator=gen) * 0.5).half()
    return encode_chunks(ctx, k, k * 0.7, "balanced")[0][2], layout


def _client_loop(address: str, kind: str, blob: bytes, layout, stop_at: float, out: list, seed: int):
    from kvcodec.client.grpc_client import CacheClient, CacheContext
    from kvcodec.proto import kvcodec_pb2 as pb

    rng = random.Random(seed)
    base = CacheContext(layout, list(range(256)), 256)
    with CacheClient(address, timeout_s=120) as client:
        ref = [pb.ChunkRef(key=base.keys("balanced")[0].hex)]
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            if kind == "get":
                got = list(client.get_chunks(ref))
                assert got[0].blob is not None
            else:
                ctx = CacheContext(layout, [rng.randrange(49_000) for _ in range(256)], 256)
                client.put_chunks(ctx, [(0, "balanced", blob)])
            out.append(time.perf_counter() - t0)


def load_benchmark(seconds: float, clients: list[int], ops: list[str],
                   verify_processes: int = 0) -> str:
    from kvcodec.client.grpc_client import CacheClient, CacheContext

    blob, layout = _chunk_blob()
    proc, address = _start_server(verify_processes)
    rows = []
    try:
        with CacheClient(address) as c:
            c.put_chunks(CacheContext(layout, list(range(256)), 256), [(0, "balanced", blob)])
        for kind in ops:
            for n in clients:
                lat: list[float] = []
                stop_at = time.monotonic() + seconds
                threads = [threading.Thread(target=_client_loop,
                                            args=(address, kind, blob, layout, stop_at, lat, i))
                           for i in range(n)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
                rows.append([kind.upper(), n, len(lat), f"{len(lat) * len(blob) / wall / 1e6:.1f}",
                             f"{q[49] * 1e3:.1f}", f"{q[98] * 1e3:.1f}"])
                print(rows[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return (f"Chunk: 256 tokens SmolLM2-shaped, balanced, {len(blob) / 1e6:.2f} MB; "
            f"{seconds:.0f} s per row; server `kvcodec serve --store memory:// --verify-processes "
            f"{verify_processes}` in its own process.\n\n"
            + markdown_table(["op", "clients", "calls", "MB/s", "p50 ms", "p99 ms"], rows))


# ------------------------------------------------------ part 2: controller
def measure_codec(tokens: int = 256) -> tuple[dict[str, int], dict[str, float], float]:
    """Per level: encoded bytes of one real SmolLM2 chunk and decode elements/s; prefill tok/s."""
    from kvcodec.client.model import load_model, prefill, tokenize_file
    from kvcodec.codec import LEVELS, decode, encode

    loaded = load_model(threads=2)
    ids = tokenize_file(loaded, "/usr/share/common-licenses/GPL-3", max_tokens=tokens)
    prefill(loaded, ids[:16])  # warm-up
    t0 = time.perf_counter()
    k, v = prefill(loaded, ids)
    prefill_tps = tokens / (time.perf_counter() - t0)
    k, v = k.half(), v.half()
    sizes, speeds = {}, {}
    for level in LEVELS:
        blob = encode(k, v, level=level, model="smollm2-135m")
        t0 = time.perf_counter()
        decode(blob)
        speeds[level] = 2 * k.numel() / (time.perf_counter() - t0)
        sizes[level] = len(blob)
    return sizes, speeds, prefill_tps


def trace(kind: str, n: int, seed: int = 0) -> list[float]:
    """Bandwidth per request in bytes/s: fixed, or a log-space random walk in 0.1–10 Gb/s."""
    if kind.startswith("fixed"):
        return [float(kind.split(":")[1]) * GBPS] * n
    sigma = float(kind.split(":")[1])  # "walk:0.1": step of log10(Gb/s) per request
    rng, x, out = random.Random(seed), 0.0, []
    for _ in range(n):
        x = min(1.0, max(-1.0, x + rng.gauss(0, sigma)))  # log10(Gb/s) in [-1, 1]
        out.append(10 ** x * GBPS)
    return out


def simulate(policy: str, bw: list[float], sizes, speeds, prefill_tps, chunks: int = 8,
             tokens: int = 256, floor: str = "balanced") -> list[float]:
    """TTFT (ms) per request under ``policy``; the cost model is the controller's own."""
    clock = [0.0]  # one request per simulated second; estimates go stale after 8
    est = ctl.BandwidthEstimator(default=1 * GBPS, alpha=0.3, stale_after_s=8,
                                 clock=lambda: clock[0])
    copies = tuple(ctl.StoredCopy(lv, lv, sizes[lv]) for lv in sizes)
    out = []
    for true_bw in bw:
        clock[0] += 1.0
        inputs = [ctl.ChunkInput(i, tokens, copies if policy != "text" else ()) for i in range(chunks)]
        if policy == "per-chunk":  # re-decided per chunk from the transfer just measured
            out.append(_per_chunk_request(inputs, est, true_bw, prefill_tps, speeds, floor))
            continue
        if policy == "oracle":  # knows this request's true bandwidth
            m = ctl.Measurements(true_bw, prefill_tps, speeds, 11_520, 30)
            decisions = ctl.plan(inputs, m, floor).decisions
        elif policy in ("controller", "text"):
            m = ctl.Measurements(est.estimate("c"), prefill_tps, speeds, 11_520, 30,
                                 probe=est.stale("c"))
            decisions = ctl.plan(inputs, m, floor).decisions
        else:
            decisions = [ctl.Decision(i, ctl.LOAD_KV, policy, policy, sizes[policy])
                         for i in range(chunks)]
        real = ctl.Measurements(true_bw, prefill_tps, speeds, 11_520, 30)
        total = 1.0
        for chunk, d in zip(inputs, decisions):
            copy = ctl.StoredCopy(d.level, "", d.expected_bytes) if d.level else None
            total += ctl._option(chunk, d.action, copy, real).expected_ms
        out.append(total)
        if any(d.action != ctl.LOAD_TEXT for d in decisions):
            est.observe_rate("c", true_bw)
    return out


def _per_chunk_request(inputs, est, true_bw, prefill_tps, speeds, floor) -> float:
    """One request where the client re-plans each chunk with its latest measurement
    (:func:`kvcodec.client.plan_exec.run_plan` with ``adaptive=True``)."""
    real = ctl.Measurements(true_bw, prefill_tps, speeds, 11_520, 30)
    seen, total = None, 1.0
    for i, chunk in enumerate(inputs):
        bw = seen if seen is not None else est.estimate("c")
        m = ctl.Measurements(bw, prefill_tps, speeds, 11_520, 30,
                             probe=seen is None and i == 0 and est.stale("c"))
        d = ctl.plan([chunk], m, floor).decisions[0]
        copy = ctl.StoredCopy(d.level, "", d.expected_bytes) if d.level else None
        total += ctl._option(chunk, d.action, copy, real).expected_ms
        if d.action != ctl.LOAD_TEXT:
            seen = true_bw
            est.observe_rate("c", true_bw)
    return total


def controller_benchmark(requests: int = 400) -> str:
    sizes, speeds, prefill_tps = measure_codec()
    header = ("Measured here on one real 256-token SmolLM2 chunk (GPL-3 text, fp16 KV): "
              + ", ".join(f"{lv} {sizes[lv] / 1e6:.2f} MB / decode {speeds[lv] / 1e6:.1f} M el/s"
                          for lv in sizes)
              + f"; prefill {prefill_tps:.0f} tok/s (2 threads). Context: 8 chunks (2,048 tokens); "
              f"{requests} requests per trace; controller floor `balanced`.\n\n")
    scenarios = [("this CPU", speeds, prefill_tps),
                 ("GPU-class decode (1 G el/s), prefill 20k tok/s", {lv: 1e9 for lv in sizes}, 20_000.0)]
    text = header
    for name, sp, ptps in scenarios:
        rows = []
        for tr in ("fixed:0.1", "fixed:1", "fixed:10", "walk:0.1", "walk:0.35"):
            bw = trace(tr, requests)
            cells = [f"{tr[6:]} Gb/s" if tr.startswith("fixed") else
                     f"walk 0.1–10 Gb/s, σ={tr[5:]} decades/request"]
            for policy in ("controller", "per-chunk", *sizes, "text", "oracle"):
                ttft = simulate(policy, bw, sizes, sp, ptps)
                cells.append(f"{statistics.mean(ttft):.0f}")
            rows.append(cells)
        text += f"**{name}** — mean TTFT (ms):\n\n" + markdown_table(
            ["trace", "controller", "controller, per-chunk re-plan",
             *(f"always {lv}" for lv in sizes), "always recompute",
             "oracle"],
            rows) + "\n\n"
    return text + ("`always compact` is below the `balanced` quality floor the controller "
                   "honours; it is listed for reference. `oracle` = the same cost model told each "
                   "request's true bandwidth (a lower bound for any bandwidth estimator).")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--ops", default="get,put")
    p.add_argument("--verify-processes", type=int, default=0)
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--skip-controller", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"Machine: {machine()}\n")
    if not args.skip_load:
        print(load_benchmark(args.seconds, [int(c) for c in args.clients.split(",")],
                             args.ops.split(","), args.verify_processes), "\n")
    if not args.skip_controller:
        print(controller_benchmark())
    return 0


if __name__ == "__main__":
    sys.exit(main())
