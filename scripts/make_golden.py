#!/usr/bin/env python
"""Check (default) or regenerate (KVCODEC_REGEN_GOLDEN=1) the codec's golden vectors.

The golden vectors under ``tests/golden/`` pin the ``.kvc`` bitstream: tiny KV
inputs stored as safetensors, their encoded streams for each level, and
``digests.json`` with the SHA-256 of every stream and of its decoded tensors.
``tests/test_codec_golden.py`` asserts that encoding each input reproduces its
stream byte for byte and that decoding gives the recorded digests.

A golden file must only change together with a deliberate format or encoder
change, so this script writes nothing unless ``KVCODEC_REGEN_GOLDEN=1`` is set;
without it, it re-encodes everything and reports which files would change
(exit 1 if any would).

Usage::

    python scripts/make_golden.py                          # check
    KVCODEC_REGEN_GOLDEN=1 python scripts/make_golden.py   # rewrite tests/golden/
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from kvcodec.codec.api import decode, encode
from kvcodec.codec.kvfile import read_kv, write_kv

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
LEVELS = ("lossless", "high", "balanced", "compact")
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of dtype, shape and the little-endian bytes of a CPU tensor."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.contiguous().view(INT_VIEW[t.dtype]).numpy().astype("<i" + str(t.element_size())).tobytes())
    return h.hexdigest()


def _small_fp16() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20261122)
    keys = torch.randn(2, 2, 20, 8, generator=g)
    keys[:, :, :, 3] *= 12.0  # an outlier channel, as real keys have
    values = torch.randn(2, 2, 20, 8, generator=g) * 0.5
    return keys.half(), values.half()


def _tiny_fp32() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 1, 7, 3, generator=g), torch.randn(1, 1, 7, 3, generator=g) * 1e-3


def _special_bf16() -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 with NaN payloads, +-Inf, -0.0 and subnormals: lossless only."""
    g = torch.Generator().manual_seed(11)
    ints = torch.randint(-(2**15), 2**15 - 1, (2, 1, 9, 5), generator=g, dtype=torch.int64)
    keys = ints.to(torch.int16).view(torch.bfloat16).clone()
    specials = torch.tensor([0x7FC1, -0x7F, 0x7F80, -0x0080, -0x8000, 0x0001], dtype=torch.int16)
    keys.view(torch.int16)[0, 0, 0, :5] = specials[:5]
    keys.view(torch.int16)[1, 0, 8, 0] = specials[5]
    values = torch.randn(2, 1, 9, 5, generator=g).to(torch.bfloat16)
    return keys, values


# name -> (builder, levels, token_block, model, first_position)
CASES = {
    "small_fp16": (_small_fp16, LEVELS, 8, "golden-small", 0),
    "tiny_fp32": (_tiny_fp32, LEVELS, 3, "", 100),
    "special_bf16": (_special_bf16, ("lossless",), 4, "golden-special", 5),
}


PROFILE_FILE = "profile_small.json"
PROFILED_LEVELS = ("high", "compact")
TRANSFORM_FILE = "profile_small_transform.json"
TRANSFORM_LEVELS = ("high", "balanced", "compact")


def _small_profile():
    """A hand-made profile for the small_fp16 layout: heads and layers weighted unequally."""
    import numpy as np

    from kvcodec.codec.profile import Profile

    weights = np.array([[[4.0, 1.0], [1.0, 0.25]], [[1.0, 16.0], [0.5, 2.0]]])
    return Profile("golden-small", 2, 2, 8, weights, {"high": 0.05, "balanced": 0.15, "compact": 0.4},
                   sink_tokens=1, step_scale=1.0, calibration={"source": "scripts/make_golden.py"})


def _small_transform_profile():
    """The small profile plus a transform fitted on the small_fp16 input (keys before RoPE)."""
    import numpy as np

    from kvcodec.codec.transform import Rope, fit_bases

    profile = _small_profile()
    kv = read_kv(GOLDEN / "kv_small_fp16.safetensors")
    rope = Rope((1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32))
    profile.bases = fit_bases([(kv.keys, kv.values)], profile.weights, 8, rope, chunk=8)
    profile.rope_inv_freq = rope.inv_freq
    return profile


def _build_profiled(manifest: dict, put, changed: list[str], regen: bool) -> None:
    """Streams of the small_fp16 input whose steps come from a profile (header digest set),
    with and without the profile's transform."""
    kv = read_kv(GOLDEN / "kv_small_fp16.safetensors")
    for name, builder, levels, tag in ((PROFILE_FILE, _small_profile, PROFILED_LEVELS, "profiled"),
                                       (TRANSFORM_FILE, _small_transform_profile, TRANSFORM_LEVELS, "transform")):
        path = GOLDEN / name
        if not path.exists():  # profiles are written once, like the inputs
            changed.append(path.name)
            if regen:
                builder().save(path)
        profile = path if path.exists() else builder()
        for level in levels:
            blob = encode(kv.keys, kv.values, level=level, token_block=8, model=kv.model,
                          first_position=kv.first_position, profile=profile)
            stream = f"small_fp16.{tag}.{level}.kvc"
            put(GOLDEN / stream, blob)
            out = decode(blob, profile=profile)
            manifest[stream] = {
                "input": "kv_small_fp16.safetensors", "level": level, "token_block": 8,
                "model": kv.model, "first_position": kv.first_position, "bytes": len(blob),
                "profile": name, "stream_sha256": hashlib.sha256(blob).hexdigest(),
                "keys_sha256": tensor_digest(out.keys), "values_sha256": tensor_digest(out.values),
            }


def build(regen: bool) -> tuple[dict, list[str]]:
    """Encode every case; returns the digests manifest and the files that differ."""
    manifest: dict[str, dict] = {}
    changed: list[str] = []

    def put(path: Path, data: bytes) -> None:
        if not path.exists() or path.read_bytes() != data:
            changed.append(path.name)
            if regen:
                path.write_bytes(data)

    for name, (builder, levels, block, model, first) in CASES.items():
        src = GOLDEN / f"kv_{name}.safetensors"
        if not src.exists():  # inputs are written once (safetensors bytes are not canonical)
            changed.append(src.name)
            if regen:
                write_kv(src, *builder(), model=model, first_position=first)
        kv = read_kv(src) if src.exists() else None
        keys, values = (kv.keys, kv.values) if kv else builder()
        for level in levels:
            blob = encode(keys, values, level=level, token_block=block, model=model, first_position=first)
            stream = f"{name}.{level}.kvc"
            put(GOLDEN / stream, blob)
            out = decode(blob)
            manifest[stream] = {
                "input": src.name, "level": level, "token_block": block, "model": model,
                "first_position": first, "bytes": len(blob),
                "stream_sha256": hashlib.sha256(blob).hexdigest(),
                "keys_sha256": tensor_digest(out.keys), "values_sha256": tensor_digest(out.values),
            }
    _build_profiled(manifest, put, changed, regen)
    from importlib.metadata import version

    import zstandard

    manifest["_generated_with"] = {
        "constriction": version("constriction"),
        "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
    }
    return manifest, changed


def main() -> int:
    regen = os.environ.get("KVCODEC_REGEN_GOLDEN") == "1"
    if regen:
        GOLDEN.mkdir(parents=True, exist_ok=True)
    manifest, changed = build(regen)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    digests = GOLDEN / "digests.json"
    if not digests.exists() or digests.read_text() != text:
        changed.append(digests.name)
        if regen:
            digests.write_text(text)
    if not changed:
        print(f"golden vectors in {GOLDEN} are up to date ({len(manifest) - 1} streams)")
        return 0
    verb = "rewrote" if regen else "would change (set KVCODEC_REGEN_GOLDEN=1 to rewrite)"
    print(f"{verb}: {', '.join(changed)}")
    return 0 if regen else 1


if __name__ == "__main__":
    sys.exit(main())
