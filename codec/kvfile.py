"""KV files: the CLI's interchange format for uncompressed KV caches.

A KV file is a safetensors file holding two tensors, ``keys`` and ``values``,
each shaped ``[layers, kv_heads, tokens, head_dim]`` with dtype float16,
bfloat16 or float32, plus string metadata:

``model``           model identity (required)
``first_position``  absolute position of the first token (default ``0``)
``token_ids``       JSON list of the token ids, when known (``kvcodec prefill`` writes it)

Keys are stored as the model caches them (post-RoPE for Llama-family models).

Example::

    kv = read_kv("doc.safetensors")
    write_kv("copy.safetensors", kv.keys, kv.values, model=kv.model)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcodec.codec.errors import InvalidInput

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class KVFile:
    """The contents of a KV file."""

    keys: torch.Tensor
    values: torch.Tensor
    model: str = ""
    first_position: int = 0
    token_ids: list[int] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return int(self.keys.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.keys.shape[2])


def check_kv(keys: torch.Tensor, values: torch.Tensor) -> None:
    """Raise :class:`InvalidInput` unless ``keys``/``values`` are a valid KV pair."""
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise InvalidInput(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InvalidInput(
                f"{name}: expected 4 dims [layers, kv_heads, tokens, head_dim], "
                f"got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise InvalidInput(f"{name}: dtype {t.dtype} not supported (float16, bfloat16, float32)")
        if 0 in t.shape:
            raise InvalidInput(f"{name}: empty shape {tuple(t.shape)}")
    if keys.shape != values.shape:
        raise InvalidInput(f"values: shape {tuple(values.shape)} != keys shape {tuple(keys.shape)}")
    if keys.dtype != values.dtype:
        raise InvalidInput(f"values: dtype {values.dtype} != keys dtype {keys.dtype}")


def read_kv(path: str | os.PathLike[str]) -> KVFile:
    """Read a KV file; raises :class:`InvalidInput` naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidInput(f"{path}: not a readable safetensors KV file ({exc})") from None
    missing = [n for n in ("keys", "values") if n not in tensors]
    if missing:
        raise InvalidInput(f"{path}: missing tensor(s) {', '.join(missing)} (found {sorted(tensors)})")
    keys, values = tensors["keys"], tensors["values"]
    check_kv(keys, values)
    try:
        first_position = int(meta.pop("first_position", "0"))
    except ValueError:
        raise InvalidInput(f"{path}: metadata first_position is not an integer") from None
    token_ids = None
    if "token_ids" in meta:
        try:
            token_ids = [int(t) for t in json.loads(meta.pop("token_ids"))]
        except (ValueError, TypeError):
            raise InvalidInput(f"{path}: metadata token_ids is not a JSON list of integers") from None
        if len(token_ids) != keys.shape[2]:
            raise InvalidInput(
                f"{path}: metadata token_ids has {len(token_ids)} ids but the tensors hold "
                f"{keys.shape[2]} tokens"
            )
    model = meta.pop("model", "")
    return KVFile(keys, values, model, first_position, token_ids, meta)


def write_kv(
    path: str | os.PathLike[str],
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    model: str = "",
    first_position: int = 0,
    token_ids: list[int] | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    """Write a KV file atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    check_kv(keys, values)
    meta = dict(extra or {})
    meta["model"] = model
    meta["first_position"] = str(int(first_position))
    if token_ids is not None:
        if len(token_ids) != keys.shape[2]:
            raise InvalidInput(f"token_ids: {len(token_ids)} ids for {keys.shape[2]} tokens")
        meta["token_ids"] = json.dumps([int(t) for t in token_ids])
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(
            {"keys": keys.detach().cpu().contiguous(), "values": values.detach().cpu().contiguous()},
            tmp,
            metadata=meta,
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
