"""Codec profiles: per-model rate allocation, calibrated once and shared.

A profile records how sensitive a model's output is to error in each
(layer, keys/values, kv head) of its cache: the mean squared gradient of the
next-token loss with respect to those KV elements (the diagonal of the
empirical Fisher information), measured on calibration text with the
attention-sink tokens excluded (they are stored raw). For an entropy-coded
uniform quantizer the expected loss increase is ``sum_g F_g * step_g**2 / 24``
and the rate falls by one bit per doubling of ``step_g``; minimising loss at
a given rate gives ``step_g ∝ 1 / sqrt(F_g)`` (reverse water-filling).

Without a transform, profiles only steer the *encoder*: every step is
written into the stream, so a stream decodes without its profile. The
stream's header carries the profile's SHA-256 so one can tell which
allocation produced it.

A profile may also carry a **transform** (:mod:`kvcodec.codec.transform`):
an integer orthonormal basis per (layer, K/V) and the model's RoPE
frequencies. Streams coded with it set the header's transform flag and need
the same profile (found by digest among the shipped ones, or passed in) to decode.

File format (JSON, UTF-8)::

    {"format": "kvcodec-profile", "version": 1, "model": "...",
     "layers": L, "kv_heads": H, "head_dim": D, "sink_tokens": 1,
     "weights": [[[F_keys_h ...], [F_values_h ...]] per layer],   # floats
     "step_scale": float,            # normalises steps, see steps()
     "levels": {"high": lambda, "balanced": lambda, "compact": lambda},
     "allocation": {level: [[m_keys, m_values] per layer]},  # optional, see below
     "side_priors": {level: {"steps": b64 f32 [L, 2, H], "classes": b64 u8 [L, 2, H*D],
                             "centres": b64 i16 [L, 2, H*D]}},   # optional, needs a transform
     "prediction": {level: {"shifts": [[keys, values] per layer],  # optional, needs a transform
                            "keys": base64 of int16 LE [layers, H*D, 2*H*D],
                            "values": base64 of int16 LE [layers, H*D, 3*H*D]}},
     "calibration": {...free-form provenance...},
     "transform": {                  # optional
        "group": B,                  # channels per basis block (head_dim or kv_heads * head_dim)
        "scale_bits": 14,
        "rope_inv_freq": [floats] or [[floats] per layer] or null,   # float32 values; keys are
                                             # coded before RoPE (one list: every layer's)
        "bases": base64 of int16 LE [layers, 2, H*D/B, B, B] (rows: output coordinates),
        "analysis": base64 of int32 LE, the same shape},   # optional: the encoder's inverses of
                                                           # shaped (not orthonormal) bases
     "sha256": hex digest of the canonical JSON of everything else}

A level may carry an **allocation**: a step multiplier per (layer, keys/values)
chosen by measured rate-distortion (``kvcodec calibrate``): the Fisher weights
are a second-order estimate that misjudges groups whose error acts
non-linearly (SmolLM2's layer-0 values cause half of all output divergence at
a uniform allocation), so calibration measures, for every group, the bits it
takes and the output KL it causes at a ladder of steps, and gives each group
the step where its marginal KL per bit equals the level's slope.

With a transform a profile may carry **side priors** (:mod:`kvcodec.codec.sideprior`):
per level, the scale classes and centres its calibration texts produced, so that
streams code their side information as differences from them (header flag 4).

With a transform a profile may also carry **prediction** (:mod:`kvcodec.codec.predict`): per
(layer, keys/values) an int16 map from the symbols already decoded (the previous layer's keys
and values; for values, the layer's keys too) with a power-of-two shift, fitted per level in
that level's symbol units, so that the streams of those levels code each symbol as its
difference from the prediction (header flag 8).

Example::

    profile = load_profile("smollm2.json")
    steps = profile.steps("balanced", layer=3, is_value=True)   # float64 [H]
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from kvcodec.codec import predict as _predict
from kvcodec.codec import transform as _transform
from kvcodec.codec.entropy import NUM_CLASSES
from kvcodec.codec.errors import InvalidInput
from kvcodec.codec.sideprior import SidePrior

FORMAT = "kvcodec-profile"
VERSION = 1
_PRIOR_FIELDS = {"steps": "<f4", "classes": "u1", "centres": "<i2"}  # side_priors: name -> stored dtype


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
    bases: np.ndarray | None = None  # int16 [layers, 2, groups, B, B]: the transform, if any
    # float32 [rot_dim / 2] (every layer's) or [layers, rot_dim / 2] (each layer's): keys coded before RoPE
    rope_inv_freq: np.ndarray | None = None
    allocation: dict[str, np.ndarray] = field(default_factory=dict)  # level -> float64 [layers, 2] step multipliers
    # level -> {"steps": float32 [layers, 2, H], "classes": uint8 / "centres": int16 [layers, 2, H * D]}
    side_priors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # prediction (header flag 8): level -> Prediction (int16 maps of kvcodec.codec.predict.sources)
    prediction: dict[str, _predict.Maps] = field(default_factory=dict)
    # the encoder's matrices for metric-shaped (not orthonormal) bases: int32 [layers, 2, groups, B, B]
    # (``transform.Transform``'s ``analysis``); None: every basis is orthonormal, its own analysis
    analysis: np.ndarray | None = None

    @property
    def has_transform(self) -> bool:
        return self.bases is not None

    def transform(self, layer: int, is_value: bool) -> _transform.Transform | None:
        """The transform of one layer's keys or values (None without one)."""
        if self.bases is None:
            return None
        cache = self._derived()["transforms"]
        key = (layer, is_value, None if self.rope_inv_freq is None else self.rope_inv_freq.tobytes())
        if key not in cache:
            rope = None if is_value else self.rope(layer)
            analysis = None if self.analysis is None else self.analysis[layer, int(is_value)]
            cache[key] = _transform.Transform(self.bases[layer, int(is_value)], rope, analysis)
        return cache[key]

    def rope(self, layer: int) -> _transform.Rope | None:
        """The RoPE removed from ``layer``'s keys before coding (None: keys coded as cached)."""
        inv = self.rope_inv_freq
        if inv is None:
            return None
        return _transform.Rope(inv if inv.ndim == 1 else inv[layer])

    def side_prior(self, level: str, layer: int, is_value: bool) -> SidePrior | None:
        """The expected side information of one (level, layer, keys/values), None without one."""
        table = self.side_priors.get(level)
        if table is None:
            return None
        at = (layer, int(is_value))
        return SidePrior(table["steps"][at], table["classes"][at].astype(np.int64),
                         table["centres"][at].astype(np.int64))

    def predicts(self, level: str) -> bool:
        """Whether streams of ``level`` are coded with prediction (header flag 8)."""
        return self.bases is not None and level in self.levels and level in self.prediction

    def predictor(self, level: str, layer: int, is_value: bool) -> _predict.Predictor | None:
        """The prediction of one (layer, keys/values)'s symbols at ``level`` from its
        :func:`~kvcodec.codec.predict.sources` (None for layer 0's keys, which have none)."""
        return self.prediction[level].predictor(layer, is_value)

    def _derived(self) -> dict:
        """What is derived from ``bases``, ``analysis`` and ``prediction`` (transforms, the digest),
        kept while they are the same objects: treat them as read-only and assign new ones to change them."""
        cache = self.__dict__.get("_derived_cache")
        maps = [id(m) for m in self.prediction.values()]
        if (cache is None or cache["bases"] is not self.bases or cache["analysis"] is not self.analysis
                or cache["maps"] != maps):
            cache = {"bases": self.bases, "analysis": self.analysis, "maps": maps, "transforms": {}, "digest": None}
            self.__dict__["_derived_cache"] = cache
        return cache

    def _body(self, with_bases: bool = True) -> dict:
        body = {
            "format": FORMAT, "version": VERSION, "model": self.model, "layers": self.layers,
            "kv_heads": self.kv_heads, "head_dim": self.head_dim, "sink_tokens": self.sink_tokens,
            "weights": [[[float(w) for w in kv] for kv in layer] for layer in self.weights],
            "step_scale": self.step_scale, "levels": dict(sorted(self.levels.items())),
            "calibration": self.calibration,
        }
        if self.allocation:  # absent from profiles without one (their digests stay what they were)
            body["allocation"] = {
                level: [[float(m) for m in kv] for kv in alloc] for level, alloc in sorted(self.allocation.items())
            }
        if self.side_priors:  # likewise
            body["side_priors"] = {
                level: {name: base64.b64encode(table[name].astype(dt).tobytes()).decode("ascii")
                        for name, dt in _PRIOR_FIELDS.items()}
                for level, table in sorted(self.side_priors.items())
            }
        if self.prediction:  # likewise
            body["prediction"] = {level: maps.to_json(with_bases) for level, maps in sorted(self.prediction.items())}
        if self.bases is not None:
            body["transform"] = {
                "group": int(self.bases.shape[-1]), "scale_bits": _transform.SCALE_BITS,
                "rope_inv_freq": None if self.rope_inv_freq is None else self.rope_inv_freq.astype(float).tolist(),
            }
            if with_bases:
                body["transform"]["bases"] = base64.b64encode(self.bases.astype("<i2").tobytes()).decode("ascii")
                if self.analysis is not None:  # absent for orthonormal bases (their digests stay what they were)
                    body["transform"]["analysis"] = base64.b64encode(self.analysis.astype("<i4").tobytes()).decode("ascii")
        return body

    def to_json(self) -> dict:
        body = self._body()
        body["sha256"] = _digest(body)
        return body

    @property
    def digest(self) -> bytes:
        """SHA-256 of the profile's canonical JSON (FORMAT.md).

        Serialising the bases (megabytes) dominates, so the digest is reused while every other
        field serialises the same and ``bases`` is the same array (see :meth:`_derived`).
        """
        cache = self._derived()
        light = json.dumps(self._body(with_bases=False), sort_keys=True)
        if cache["digest"] is None or cache["digest"][0] != light:
            cache["digest"] = (light, bytes.fromhex(self.to_json()["sha256"]))
        return cache["digest"][1]

    def matches(self, layers: int, kv_heads: int, head_dim: int) -> bool:
        return (self.layers, self.kv_heads, self.head_dim) == (layers, kv_heads, head_dim)

    def steps(self, level: str, layer: int, is_value: bool) -> np.ndarray:
        """Target step of each head: ``lambda_level * step_scale / sqrt(F)``, times the level's
        allocation multiplier for this (layer, keys/values) if it has one."""
        lam = self.levels.get(level)
        if lam is None:
            raise InvalidInput(f"profile {self.model}: no calibrated lambda for level {level!r}")
        alloc = self.allocation.get(level)
        if alloc is not None:
            lam = lam * float(alloc[layer, int(is_value)])
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
    bases, inv_freq, analysis = _read_transform(body.get("transform"), layers, heads, dim, source)
    allocation = _read_allocation(body.get("allocation", {}), layers, source)
    priors = _read_side_priors(body.get("side_priors", {}), layers, heads, dim, source)
    if priors and bases is None:
        raise InvalidInput(f"{source}: side_priors need a transform (only transform streams use them)")
    prediction = _read_prediction(body.get("prediction", {}), layers, heads * dim, levels, source)
    if prediction and bases is None:
        raise InvalidInput(f"{source}: prediction needs a transform (only transform streams use it)")
    profile = Profile(str(body.get("model", "")), layers, heads, dim, weights, levels,
                      int(body.get("sink_tokens", 1)), float(body.get("step_scale", 1.0)),
                      dict(body.get("calibration", {})), bases, inv_freq, allocation, priors, prediction, analysis)
    # the digest just verified (serialising tens of megabytes of maps again would take a third of a second)
    profile._derived()["digest"] = (json.dumps(profile._body(with_bases=False), sort_keys=True),
                                    bytes.fromhex(body["sha256"]))
    return profile


def _read_side_priors(spec, layers: int, heads: int, dim: int, source: str) -> dict[str, dict[str, np.ndarray]]:
    """The per-level side-information priors of a profile (``{}`` without any)."""
    if not isinstance(spec, dict):
        raise InvalidInput(f"{source}: side_priors must map level names to {{steps, classes, centres}}")
    shapes = {"steps": (layers, 2, heads), "classes": (layers, 2, heads * dim), "centres": (layers, 2, heads * dim)}
    out = {}
    for level, table in spec.items():
        where = f"{source}: side_priors {level!r}"
        if not isinstance(table, dict) or set(table) != set(_PRIOR_FIELDS):
            raise InvalidInput(f"{where}: needs exactly the fields {', '.join(_PRIOR_FIELDS)}")
        arrays = {name: _b64_array(table[name], dt, shapes[name], f"{where}: {name}")
                  for name, dt in _PRIOR_FIELDS.items()}
        if not np.all(np.isfinite(arrays["steps"])) or np.any(arrays["steps"] <= 0):
            raise InvalidInput(f"{where}: steps must be positive float32 numbers")
        if arrays["classes"].max(initial=0) > NUM_CLASSES:
            raise InvalidInput(f"{where}: classes must be 0..{NUM_CLASSES}")
        out[str(level)] = arrays
    return out


def _b64_array(text, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A profile field holding base64 of a little-endian ``dtype`` array of ``shape`` (native
    byte order on return); ``where`` names the field in errors."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: not base64 ({exc})") from None
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != need:
        raise InvalidInput(f"{where}: {len(raw)} bytes, shape {shape} needs {need}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.dtype(dtype).newbyteorder("="))


def _read_allocation(spec, layers: int, source: str) -> dict[str, np.ndarray]:
    """The per-level step multipliers of a profile (``{}`` without any)."""
    if not isinstance(spec, dict):
        raise InvalidInput(f"{source}: allocation must map level names to [[keys, values] per layer]")
    out = {}
    for level, rows in spec.items():
        try:
            alloc = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{source}: allocation {level!r}: not numbers ({exc})") from None
        if alloc.shape != (layers, 2):
            raise InvalidInput(f"{source}: allocation {level!r}: shape {alloc.shape} != ({layers}, 2)")
        if not np.all(np.isfinite(alloc)) or np.any(alloc <= 0):
            raise InvalidInput(f"{source}: allocation {level!r}: multipliers must be positive")
        out[str(level)] = alloc
    return out


def _read_transform(spec, layers: int, heads: int, dim: int, source: str):
    """The transform fields of a profile: ``(bases, rope_inv_freq, analysis)``, all None without
    one (``analysis`` is None too for orthonormal bases)."""
    if spec is None:
        return None, None, None
    try:
        group = int(spec["group"])
        scale_bits = int(spec["scale_bits"])
        raw = base64.b64decode(spec["bases"], validate=True)
        raw_analysis = spec.get("analysis")
        raw_analysis = None if raw_analysis is None else base64.b64decode(raw_analysis, validate=True)
        inv = spec.get("rope_inv_freq")
        inv = None if inv is None else np.asarray(inv, dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"{source}: transform: bad or missing field ({exc})") from None
    if scale_bits != _transform.SCALE_BITS:
        raise InvalidInput(f"{source}: transform scale_bits {scale_bits} is not {_transform.SCALE_BITS}")
    channels = heads * dim
    if not 1 <= group <= _transform.MAX_GROUP or channels % group:
        raise InvalidInput(f"{source}: transform group {group} does not divide {channels} channels")
    shape = (layers, 2, channels // group, group, group)
    if len(raw) != 2 * int(np.prod(shape)):
        raise InvalidInput(f"{source}: transform bases hold {len(raw)} bytes, shape {shape} needs {2 * np.prod(shape)}")
    bases = np.frombuffer(raw, dtype="<i2").astype(np.int16).reshape(shape)
    analysis = None
    if raw_analysis is not None:
        if len(raw_analysis) != 4 * int(np.prod(shape)):
            raise InvalidInput(f"{source}: transform analysis holds {len(raw_analysis)} bytes, shape {shape} "
                               f"needs {4 * np.prod(shape)}")
        analysis = np.frombuffer(raw_analysis, dtype="<i4").astype(np.int32).reshape(shape)
        if np.abs(analysis.astype(np.int64)).max() >= _transform.MAX_ANALYSIS:
            raise InvalidInput(f"{source}: transform analysis entries must be below {_transform.MAX_ANALYSIS} "
                               "in magnitude")
    if inv is not None:
        per_layer = inv.ndim == 2 and len(inv) == layers
        if (not (inv.ndim == 1 or per_layer) or not 1 <= 2 * inv.shape[-1] <= dim or not np.all(np.isfinite(inv))
                or np.any(inv <= 0)):
            raise InvalidInput(f"{source}: transform rope_inv_freq must be 1..{dim // 2} positive floats, "
                               f"or {layers} such lists (one per layer), got shape {inv.shape}")
        if np.any(inv.astype(np.float32).astype(np.float64) != inv):
            raise InvalidInput(f"{source}: transform rope_inv_freq values must be float32 numbers")
        inv = inv.astype(np.float32)
    return bases, inv, analysis


def _read_prediction(spec, layers: int, channels: int, levels: dict, source: str) -> dict[str, _predict.Maps]:
    """The per-level prediction maps of a profile (``{}`` without any)."""
    if not isinstance(spec, dict):
        raise InvalidInput(f"{source}: prediction must map level names to {{shifts, keys, values}}")
    out = {}
    for level, table in spec.items():
        where = f"{source}: prediction {level!r}"
        if level not in levels:
            raise InvalidInput(f"{where}: not one of the profile's levels")
        try:
            shifts = np.asarray(table["shifts"], dtype=np.int64)
            encoded = [table[name] for name in ("keys", "values")]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{where}: bad or missing field ({exc})") from None
        if shifts.shape != (layers, 2) or shifts.min(initial=0) < 0 or shifts.max(initial=0) > _predict.MAX_SHIFT:
            raise InvalidInput(f"{where}: shifts must be [{layers}][2] integers in 0..{_predict.MAX_SHIFT}")
        maps = []
        for name, text, width in zip(("keys", "values"), encoded, (2, 3)):
            maps.append(_b64_array(text, "<i2", (layers, channels, width * channels), f"{where}: {name}"))
            if maps[-1].min(initial=0) < -32767:
                raise InvalidInput(f"{where}: {name} must be within -32767..32767")
        out[str(level)] = _predict.Maps(maps[0], maps[1], shifts)
    return out


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and verify a profile file."""
    try:
        body = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"profile: {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"profile: {path}: unreadable ({exc})") from None
    return profile_from_json(body, str(path))


PROFILE_PATH_ENV = "KVCODEC_PROFILE_PATH"


def builtin_profiles() -> tuple[tuple[bytes, Profile], ...]:
    """Every known profile with its digest: those in the directories of ``$KVCODEC_PROFILE_PATH``
    (``os.pathsep``-separated, searched first) and the ones shipped with kvcodec.

    Read once per process and path value; treat the profiles as read-only.
    """
    return _known_profiles(os.environ.get(PROFILE_PATH_ENV, ""))


@lru_cache(maxsize=4)
def _known_profiles(search_path: str) -> tuple[tuple[bytes, Profile], ...]:
    found = []
    for folder in [Path(p) for p in search_path.split(os.pathsep) if p]:
        if not folder.is_dir():
            raise InvalidInput(f"{PROFILE_PATH_ENV}: {folder} is not a directory")
        for entry in sorted(folder.glob("*.json")):
            found.append(load_profile(entry))
    found += _shipped()
    return tuple((profile.digest, profile) for profile in found)


def _shipped(*sub: str) -> list[Profile]:
    """The profiles in ``kvcodec/profiles/<sub...>`` of the installed package."""
    from importlib.resources import files

    folder = files("kvcodec").joinpath("profiles", *sub)
    entries = sorted(folder.iterdir(), key=lambda e: e.name) if folder.is_dir() else []
    return [profile_from_json(json.loads(e.read_text()), e.name) for e in entries if e.name.endswith(".json")]


@lru_cache(maxsize=1)
def _retired_profiles() -> tuple[tuple[bytes, Profile], ...]:
    """Shipped profiles that a recalibration replaced: never chosen for encoding, kept so that
    the streams they coded (with a transform, they need them) still decode."""
    return tuple((p.digest, p) for p in _shipped("retired"))


def builtin_profile(model: str, layers: int, kv_heads: int, head_dim: int) -> Profile | None:
    """The known profile (see :func:`builtin_profiles`) for ``model`` with this layout, if any."""
    if not model:
        return None
    for _, profile in builtin_profiles():
        aliases = profile.calibration.get("aliases", [])
        if (model == profile.model or model in aliases) and profile.matches(layers, kv_heads, head_dim):
            return profile
    return None


def builtin_profile_by_digest(digest: bytes) -> Profile | None:
    """The known profile (see :func:`builtin_profiles`, then the retired shipped ones) whose
    SHA-256 is ``digest``, if any."""
    return next((p for d, p in builtin_profiles() + _retired_profiles() if d == digest), None)
