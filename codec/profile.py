"""Codec profiles: per-model rate allocation, calibrated once and shared.

A profile records how sensitive a model's output is to error in each
(layer, keys/values, kv head) of its cache: the mean squared gradient of the
next-token loss with respect to those KV elements (the diagonal of the
empirical Fisher information), measured on calibration text with the
attention-sink tokens excluded (they are stored raw). For an entropy-coded
uniform quantizer the expected loss increase is ``sum_g F_g * step_g**2 / 24``
and the rate falls by one bit per doubling of ``step_g``; minimising loss at
a given rate gives ``step_g ∝ 1 / sqrt(F_g)`` (reverse water-filling).

Profiles only steer the *encoder*: every step is written into the stream,
so a stream decodes without its profile. The stream's header carries the
profile's SHA-256 so one can tell which allocation produced it.

File format (JSON, UTF-8)::

    {"format": "kvcodec-profile", "version": 1, "model": "...",
     "layers": L, "kv_heads": H, "head_dim": D, "sink_tokens": 1,
     "weights": [[[F_keys_h ...], [F_values_h ...]] per layer],   # floats
     "step_scale": float,            # normalises steps, see steps()
     "levels": {"high": lambda, "balanced": lambda, "compact": lambda},
     "calibration": {...free-form provenance...},
     "sha256": hex digest of the canonical JSON of everything else}

Example::

    profile = load_profile("smollm2.json")
    steps = profile.steps("balanced", layer=3, is_value=True)   # float64 [H]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvcodec.codec.errors import InvalidInput

FORMAT = "kvcodec-profile"
VERSION = 1


@dataclass
class Profile:
    """A calibrated rate allocation for one model's KV layout."""

    model: str
    layers: int
    kv_heads: int
    head_dim: int
    weights: np.ndarray  # float64 [layers, 2, kv_heads]
    levels: dict[str, float]
    sink_tokens: int = 1
    step_scale: float = 1.0
    calibration: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        body = {
            "format": FORMAT, "version": VERSION, "model": self.model, "layers": self.layers,
            "kv_heads": self.kv_heads, "head_dim": self.head_dim, "sink_tokens": self.sink_tokens,
            "weights": [[[float(w) for w in kv] for kv in layer] for layer in self.weights],
            "step_scale": self.step_scale, "levels": dict(sorted(self.levels.items())),
            "calibration": self.calibration,
        }
        body["sha256"] = _digest(body)
        return body

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.to_json()["sha256"])

    def matches(self, layers: int, kv_heads: int, head_dim: int) -> bool:
        return (self.layers, self.kv_heads, self.head_dim) == (layers, kv_heads, head_dim)

    def steps(self, level: str, layer: int, is_value: bool) -> np.ndarray:
        """Target step of each head: ``lambda_level * step_scale / sqrt(F)``."""
        lam = self.levels.get(level)
        if lam is None:
            raise InvalidInput(f"profile {self.model}: no calibrated lambda for level {level!r}")
        w = np.maximum(self.weights[layer, int(is_value)], 1e-30)
        return lam * self.step_scale / np.sqrt(w)

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _digest(body: dict) -> str:
    clean = {k: v for k, v in body.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def profile_from_json(body: dict, source: str = "profile") -> Profile:
    """Validate a parsed profile; raises :class:`InvalidInput` naming the field."""
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise InvalidInput(f"{source}: not a kvcodec profile (format field missing or wrong)")
    if body.get("version") != VERSION:
        raise InvalidInput(f"{source}: profile version {body.get('version')!r} is not supported")
    if body.get("sha256") != _digest(body):
        raise InvalidInput(f"{source}: sha256 {body.get('sha256')!r} does not match the content")
    try:
        weights = np.asarray(body["weights"], dtype=np.float64)
        layers, heads, dim = int(body["layers"]), int(body["kv_heads"]), int(body["head_dim"])
        levels = {str(k): float(v) for k, v in body["levels"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"{source}: bad or missing field ({exc})") from None
    if weights.shape != (layers, 2, heads):
        raise InvalidInput(f"{source}: weights shape {weights.shape} != ({layers}, 2, {heads})")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise InvalidInput(f"{source}: weights must be finite and non-negative")
    if any(not math.isfinite(v) or v <= 0 for v in levels.values()):
        raise InvalidInput(f"{source}: level lambdas must be positive")
    return Profile(str(body.get("model", "")), layers, heads, dim, weights, levels,
                   int(body.get("sink_tokens", 1)), float(body.get("step_scale", 1.0)),
                   dict(body.get("calibration", {})))


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and verify a profile file."""
    try:
        body = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"profile: {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"profile: {path}: unreadable ({exc})") from None
    return profile_from_json(body, str(path))


def builtin_profile(model: str, layers: int, kv_heads: int, head_dim: int) -> Profile | None:
    """The shipped profile for ``model`` with this layout, if there is one."""
    from importlib.resources import files

    if not model:
        return None
    folder = files("kvcodec") / "profiles"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name) if folder.is_dir() else []:
        if not entry.name.endswith(".json"):
            continue
        profile = profile_from_json(json.loads(entry.read_text()), entry.name)
        aliases = profile.calibration.get("aliases", [])
        if (model == profile.model or model in aliases) and profile.matches(layers, kv_heads, head_dim):
            return profile
    return None
