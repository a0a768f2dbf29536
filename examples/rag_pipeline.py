"""A small RAG flow over a kvcodec cache server, with SmolLM2-135M on real text.

1. Retrieve: split Debian's license texts (/usr/share/common-licenses) into
   passages and pick the ones sharing the most words with the question.
2. Request 1 (cold): prefill [instructions + passages], answer the question
   (greedy), then store the context's KV chunks on the server.
3. Request 2 (warm): ask the controller for a plan, fetch the chunks (decoding
   chunk i while chunk i+1 arrives), skip the prefill, answer again.
4. Print the time to first token both ways and check the answers match.

Run (a server is started in-process on a temporary local store unless
``--server`` names one, e.g. one started with ``kvcodec serve``)::

    python examples/rag_pipeline.py
    python examples/rag_pipeline.py --server 127.0.0.1:50051 --level balanced

With ``--level lossless`` (the default) the fetched KV is bit-exact, so the
answers must match token for token; lossy levels report the agreement.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvcodec.client.grpc_client import CacheClient, CacheContext, ModelLayout
from kvcodec.client.hf_bridge import kv_to_cache
from kvcodec.client.model import load_model, prefill
from kvcodec.proto import kvcodec_pb2 as pb

LICENSES = Path("/usr/share/common-licenses")
SYSTEM = ("<|im_start|>system\nYou answer questions about software licenses in one sentence, "
          "using only the passages the user gives.<|im_end|>\n<|im_start|>user\nPassages:\n\n")


def retrieve(question: str, k: int = 4) -> list[str]:
    """The ``k`` passages (paragraphs) with the most words in common with the question."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    passages = []
    for name in ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0"):
        path = LICENSES / name
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace")
            passages += [p.strip() for p in text.split("\n\n") if len(p.split()) > 40]
    scored = sorted(passages, key=lambda p: -len(words & set(re.findall(r"[a-z]+", p.lower()))))
    return scored[:k]


def answer(loaded, context_kv, question_ids: list[int], max_new: int) -> tuple[list[int], float]:
    """Greedy answer after a context KV; returns (tokens, seconds to the first token)."""
    t0 = time.perf_counter()
    cache = kv_to_cache(*context_kv, config=loaded.config)
    ids = torch.tensor([question_ids])
    out: list[int] = []
    ttft = 0.0
    with torch.inference_mode():
        for step in range(max_new):
            logits = loaded.model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            if step == 0:
                ttft = time.perf_counter() - t0
            out.append(token)
            if token == loaded.tokenizer.eos_token_id:
                break
            ids = torch.tensor([[token]])
    return out, ttft


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="HOST:PORT of a running server (default: start one here)")
    p.add_argument("--store", default="", help="store URL for the in-process server")
    p.add_argument("--level", default="lossless", help="codec level of the stored chunks")
    p.add_argument("--question", default="What must you do when you convey a modified version "
                                          "of the covered work?")
    p.add_argument("--passages", type=int, default=8)
    p.add_argument("--max-new", type=int, default=24)
    p.add_argument("--follow-plan", action="store_true",
                   help="request 2 loads or recomputes each chunk as the controller decides")
    return p


def cold_request(client, loaded, ctx, question_ids, args):  # noqa: ANN001, ANN201
    """Request 1: prefill, answer, then store the context's chunks."""
    t0 = time.perf_counter()
    kv = prefill(loaded, list(ctx.token_ids))
    prefill_s = time.perf_counter() - t0
    tokens, q_s = answer(loaded, kv, question_ids, args.max_new)
    t1 = time.perf_counter()
    stored = client.put_kv(ctx, kv[0], kv[1], level=args.level)
    put_s = time.perf_counter() - t1
    client.measured.prefill_tokens_per_s = len(ctx.token_ids) / prefill_s
    print(f"request 1 (cold): prefill {prefill_s * 1e3:.0f} ms, TTFT {(prefill_s + q_s) * 1e3:.0f} ms; "
          f"stored {sum(r.stored_bytes for r in stored) / 1e6:.1f} MB at {args.level} "
          f"in {put_s * 1e3:.0f} ms (after the answer, off the critical path)")
    return tokens, prefill_s + q_s


def warm_request(client, loaded, ctx, question_ids, args):  # noqa: ANN001, ANN201
    """Request 2: plan, fetch (streaming decode) or follow the plan, answer."""
    t0 = time.perf_counter()
    plan = client.plan(ctx, quality_floor="exact" if args.level == "lossless" else args.level,
                       allow_blend=False)
    if args.follow_plan:  # load or recompute each chunk as the controller decided
        from kvcodec.client.plan_exec import run_plan

        done = run_plan(client, loaded, ctx, plan)
        keys, values = done.keys, done.values
        print(f"plan carried out: {done.actions}")
    else:  # fetch every chunk: this measures the fetch path even where recompute would win
        refs = [pb.ChunkRef(key=k.hex, index=k.index, level=args.level) for k in ctx.keys(args.level)]
        chunks = client.fetch_refs(refs)
        if any(c.kv is None for c in chunks):
            raise SystemExit("error: a chunk was missing on the second request")
        keys = torch.cat([c.kv.keys for c in chunks], dim=2)
        values = torch.cat([c.kv.values for c in chunks], dim=2)
    fetch_s = time.perf_counter() - t0
    tokens, q_s = answer(loaded, (keys, values), question_ids, args.max_new)
    print(f"request 2 (warm): plan+fetch+decode {fetch_s * 1e3:.0f} ms, TTFT "
          f"{(fetch_s + q_s) * 1e3:.0f} ms")
    print(f"controller: {plan.explanation}")
    for d in plan.decisions:
        print(f"  chunk {d.index}: {d.reason}")
    return tokens, fetch_s + q_s


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    loaded = load_model()
    server = None
    if args.server is None:
        from kvcodec.service.config import build_config
        from kvcodec.service.server import CacheServer

        store = args.store or tempfile.mkdtemp(prefix="kvcodec-rag-")
        server = CacheServer(build_config(None, {"listen": "127.0.0.1:0", "store": store,
                                                 "calibrate": False})).start()
        args.server = server.address
    tok = loaded.tokenizer
    context_text = SYSTEM + "\n\n".join(retrieve(args.question, args.passages)) + "\n\n"
    context_ids = tok(context_text, add_special_tokens=False)["input_ids"]
    question = f"Question: {args.question}<|im_end|>\n<|im_start|>assistant\n"
    question_ids = tok(question, add_special_tokens=False)["input_ids"]
    prefill(loaded, question_ids)  # warm-up: the first forward pass pays one-off costs
    layout = ModelLayout.from_loaded(loaded, dtype=str(loaded.dtype).replace("torch.", ""))
    ctx = CacheContext(layout, context_ids, chunk_tokens=256)
    print(f"context: {len(context_ids)} tokens in {len(ctx.keys())} chunks; question "
          f"{len(question_ids)} tokens; server {args.server}")

    with CacheClient(args.server, timeout_s=600) as client:
        cold_tokens, cold_ttft = cold_request(client, loaded, ctx, question_ids, args)
        warm_tokens, warm_ttft = warm_request(client, loaded, ctx, question_ids, args)
    print(f"TTFT: cold {cold_ttft * 1e3:.0f} ms, warm {warm_ttft * 1e3:.0f} ms "
          f"({cold_ttft / warm_ttft:.2f}x)")
    agree = sum(a == b for a, b in zip(cold_tokens, warm_tokens)) / max(len(cold_tokens), 1)
    print(f"answer: {tok.decode(cold_tokens)!r}")
    print(f"generated tokens match: {cold_tokens == warm_tokens} ({agree:.0%} agreement)")
    if server is not None:
        server.stop(0)
    return 0 if cold_tokens == warm_tokens or args.level != "lossless" else 1


if __name__ == "__main__":
    sys.exit(main())
