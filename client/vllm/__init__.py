"""kvcodec inside vLLM: the ``KVCodecConnector`` KV connector (``kvcodec.client.vllm``).

``--kv-transfer-config '{"kv_connector": "KVCodecConnector",
"kv_connector_module_path": "kvcodec.client.vllm", "kv_role": "kv_both"}'``.
Modules, in the order data flows:

    settings.py   kv_connector_extra_config, validated
    identity.py   the model identity and KV layout chunk keys commit to
    backend.py    the embedded chunk store or a kvcodec cache server
    scheduler.py  lookup (one batched call, off the scheduler thread), controller, step plans
    estimates.py  measured bandwidth, decode and prefill speeds for the controller
    worker.py     fetch, verify, decode, scatter; gather finished chunks
    paged.py      vLLM's paged KV layout <-> [layers, kv_heads, tokens, head_dim]
    saver.py      encoding and storing off the forward path (bounded queue)
    stats.py      connector stats and Prometheus series
    connector.py  the KVConnectorBase_V1 subclass tying them together

Importing this package does not import vLLM; ``KVCodecConnector`` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVCodecConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVCodecConnector":
        from kvcodec.client.vllm.connector import KVCodecConnector

        return KVCodecConnector
    raise AttributeError(f"module 'kvcodec.client.vllm' has no attribute {name!r}")
