"""RAG on vLLM with a shared kvcodec cache: two engine processes, one cache server.

1. A cache server (``kvcodec serve``, started here on a temporary local store
   unless ``--server`` names one) holds compressed chunk caches.
2. Retrieval picks passages from Debian's license texts
   (/usr/share/common-licenses); every question about them gets the same
   context prefix (instructions + passages), then the question.
3. Engine process A (vLLM, KVCodecConnector pointed at the server) answers
   the first question: it prefills the whole context and saves its 256-token
   chunks to the server in the background.
4. Engine process B — another replica, sharing nothing with A but the server —
   answers the other questions: the context's chunks come from the server,
   only the question is prefilled.

Each answer prints its time to first token and how many prompt tokens came
from the cache::

    python examples/vllm_rag.py
    python examples/vllm_rag.py --server 127.0.0.1:50051 --level balanced
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import sys
import tempfile
import time
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
SYSTEM = ("<|im_start|>system\nYou answer questions about software licenses in one sentence, "
          "using only the passages the user gives.<|im_end|>\n<|im_start|>user\nPassages:\n\n")
QUESTIONS = (
    "What must you do when you convey a modified version of the covered work?",
    "Can I charge a fee for conveying copies of the program?",
    "What happens to my license if I violate the terms?",
    "Do I have to provide the source code when I distribute object code?",
)


def retrieve(topic: str, k: int) -> list[str]:
    """The ``k`` paragraphs sharing the most words with ``topic`` (one context for all questions)."""
    words = set(re.findall(r"[a-z]+", topic.lower()))
    passages = []
    for name in ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0"):
        path = LICENSES / name
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace")
            passages += [p.strip() for p in text.split("\n\n") if len(p.split()) > 40]
    return sorted(passages, key=lambda p: -len(words & set(re.findall(r"[a-z]+", p.lower()))))[:k]


def engine_process(name: str, model: str, extra: dict, prompts: list[str], out: mp.Queue) -> None:
    """One vLLM engine (a replica): answer ``prompts`` in turn, report TTFT and cached tokens."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    config = KVTransferConfig(kv_connector="KVCodecConnector",
                              kv_connector_module_path="kvcodec.client.vllm", kv_role="kv_both",
                              kv_connector_extra_config=extra)
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=4096,
              enable_prefix_caching=False, kv_cache_memory_bytes=512 << 20,
              kv_transfer_config=config)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    answer = SamplingParams(max_tokens=40, temperature=0.0)
    for prompt in prompts:
        t0 = time.perf_counter()
        first = llm.generate([prompt], greedy, use_tqdm=False)[0]
        ttft = time.perf_counter() - t0
        text = llm.generate([prompt], answer, use_tqdm=False)[0].outputs[0].text
        out.put({"engine": name, "prompt_tokens": len(first.prompt_token_ids),
                 "cached": first.num_cached_tokens or 0, "ttft_s": ttft, "answer": text.strip()})
        wait_saved(llm, extra, list(first.prompt_token_ids))
    # stop the engine's own processes before this one exits: multiprocessing's exit handler
    # would otherwise wait for them before vLLM's shutdown runs
    llm.llm_engine.engine_core.shutdown()
    out.put({"engine": name, "done": True})


def wait_saved(llm, extra: dict, token_ids: list[int], timeout_s: float = 300.0) -> None:
    """Wait until the server holds every full chunk of a prompt (the engine saves in the
    background; an engine that exits first would lose what was still queued)."""
    from kvcodec.client.vllm.backend import ServerBackend
    from kvcodec.client.vllm.identity import chunk_keys, engine_layout
    from kvcodec.client.vllm.settings import ConnectorSettings

    settings = ConnectorSettings.from_extra_config(extra)
    layout = engine_layout(llm.llm_engine.vllm_config, settings)
    keys = chunk_keys(layout, settings.level, "", token_ids)
    server = ServerBackend(settings, layout)
    deadline = time.monotonic() + timeout_s
    try:
        while any(size is None for size in server.sizes(keys)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        server.close()


def run_engine(name: str, model: str, extra: dict, prompts: list[str]) -> None:
    """Run one engine process to the end, printing what it reports."""
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=engine_process,
                                           args=(name, model, extra, prompts, queue))
    proc.start()
    while True:
        msg = queue.get()
        if msg.get("done"):
            break
        print(f"engine {msg['engine']}: {msg['prompt_tokens']} prompt tokens, "
              f"{msg['cached']} from the cache, TTFT {msg['ttft_s'] * 1e3:.0f} ms\n"
              f"  -> {msg['answer']}")
    proc.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="HOST:PORT of a running kvcodec serve (default: start one here)")
    p.add_argument("--token", default="", help="bearer token for --server")
    p.add_argument("--level", default="balanced", help="codec level of the saved chunks")
    p.add_argument("--passages", type=int, default=10)
    args = p.parse_args(argv)

    from kvcodec.client.model import model_identity

    model = str(model_identity().directory)
    server = None
    if args.server is None:
        from kvcodec.service.config import build_config
        from kvcodec.service.server import CacheServer

        store = tempfile.mkdtemp(prefix="kvcodec-vllm-rag-")
        server = CacheServer(build_config(None, {"listen": "127.0.0.1:0", "store": store,
                                                 "calibrate": False})).start()
        args.server = server.address
    extra = {"server": args.server, "level": args.level, "controller": False}
    if args.token:
        extra["token"] = args.token
    context = SYSTEM + "\n\n".join(retrieve(" ".join(QUESTIONS), args.passages)) + "\n\n"
    prompts = [context + f"Question: {q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
    print(f"cache server {args.server}; context of {len(context)} characters shared by "
          f"{len(prompts)} questions; level {args.level}")
    try:
        run_engine("A", model, extra, prompts[:1])
        run_engine("B", model, extra, prompts[1:])
    finally:
        if server is not None:
            stats = server.store.stats()
            print(f"cache server store: {stats.get('puts', 0)} chunks stored, "
                  f"{stats.get('hits', 0)} reads served")
            server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
