"""The load/recompute controller: per chunk, LOAD_KV at a level, LOAD_TEXT or BLEND.

For each chunk of a context (in order) the controller knows which encoded
copies exist (from the store: exact-prefix copies per level, and
position-free copies usable by CacheBlend-style fusion) and estimates, from
measurements rather than guesses:

* ``transfer_ms = bytes / bandwidth`` where bandwidth is an EWMA of recent
  transfers to this client (:class:`BandwidthEstimator`);
* ``decode_ms = elements / decode_speed[level]`` (measured by the client and
  reported, or calibrated by the server at start, :func:`calibrate_decode`);
* ``prefill_ms = tokens / prefill_speed`` (reported by the client or a default).

Cost model (one chunk; the client streams and decodes chunk i while chunk
i+1 arrives, so transfer and decode overlap)::

    LOAD_KV(level)  max(transfer, decode)
    LOAD_TEXT       prefill(tokens)
    BLEND(level)    max(transfer, decode) + prefill(tokens * (fraction + overhead))

and the expected time to first token is their sum plus one round trip. The sum
is separable, so choosing the cheapest admissible option per chunk minimises
it exactly. Admissible means at or above the quality floor, ranked
``exact(text) = lossless > high > balanced > compact``; a BLEND ranks one step
below the level it loads (CacheBlend costs ~1–3% quality) and is never
admissible for an ``exact``/``lossless`` floor. At equal cost (within 1%) the
higher-quality option wins. Every decision carries its reason.

CacheGen's adaptation exists only as an offline simulation over a known trace;
this one runs live on every Plan call (benchmarks/service_bench.py simulates
it over 0.1–10 Gb/s traces against fixed policies).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

LOAD_KV, LOAD_TEXT, BLEND = "LOAD_KV", "LOAD_TEXT", "BLEND"
QUALITY_RANK = {"exact": 4, "lossless": 4, "high": 3, "balanced": 2, "compact": 1}
DEFAULT_DECODE_ELEMENTS_PER_S = {"lossless": 30e6, "high": 40e6, "balanced": 45e6, "compact": 50e6}
DEFAULT_FLOOR = "balanced"
TIE_TOLERANCE = 0.01


@dataclass(frozen=True)
class StoredCopy:
    """An encoded copy of a chunk in the store."""

    level: str
    key: str
    size_bytes: int


@dataclass(frozen=True)
class ChunkInput:
    """What the controller knows about one chunk of the context.

    Attributes:
        index: chunk index in the context.
        tokens: tokens in the chunk.
        exact: copies computed with exactly this prefix (LOAD_KV candidates).
        position_free: copies of the same tokens computed elsewhere (BLEND candidates).
    """

    index: int
    tokens: int
    exact: tuple[StoredCopy, ...] = ()
    position_free: tuple[StoredCopy, ...] = ()


@dataclass(frozen=True)
class Measurements:
    """The measured speeds a plan is computed from.

    Attributes:
        bandwidth_bytes_per_s: throughput to the client (EWMA).
        prefill_tokens_per_s: the client's prefill speed.
        decode_elements_per_s: KV elements decoded per second, per level.
        elements_per_token: KV elements per token (2 * layers * kv_heads * head_dim).
        layers: model layers.
        blend_fraction: share of a chunk's tokens BLEND recomputes.
        blend_overhead: BLEND's cost beyond that share, as a fraction of a full prefill
            (the gradual filter recomputes more tokens in the first layers, plus selection
            and RoPE re-rotation). benchmarks/blend_bench.py measured 0.26 of a full
            prefill's time at 15% recompute on SmolLM2, so 0.11 by default.
        rtt_ms: one request round trip.
        probe: the bandwidth estimate is stale (no transfer to this client lately):
            load one chunk as KV even if recompute looks cheaper, to re-measure.
    """

    bandwidth_bytes_per_s: float
    prefill_tokens_per_s: float
    decode_elements_per_s: Mapping[str, float]
    elements_per_token: int
    layers: int = 1
    blend_fraction: float = 0.15
    blend_overhead: float = 0.11
    rtt_ms: float = 1.0
    probe: bool = False


@dataclass(frozen=True)
class Decision:
    """The controller's choice for one chunk, with its expected cost."""

    index: int
    action: str
    level: str = ""
    key: str = ""
    expected_bytes: int = 0
    transfer_ms: float = 0.0
    decode_ms: float = 0.0
    compute_ms: float = 0.0
    expected_ms: float = 0.0
    reason: str = ""


@dataclass
class PlanResult:
    """A whole plan: decisions in context order and the expected TTFT."""

    decisions: list[Decision]
    expected_ttft_ms: float
    within_budget: bool
    explanation: str
    measurements: Measurements | None = field(default=None, repr=False)


def quality_rank(action: str, level: str) -> int:
    """Rank of an option: higher is better quality."""
    if action == LOAD_TEXT:
        return QUALITY_RANK["exact"]
    rank = QUALITY_RANK[level]
    return rank - 1 if action == BLEND else rank


def _option(chunk: ChunkInput, action: str, copy: StoredCopy | None, m: Measurements) -> Decision:
    prefill_ms = 1000.0 * chunk.tokens / max(m.prefill_tokens_per_s, 1e-9)
    if action == LOAD_TEXT or copy is None:
        return Decision(chunk.index, LOAD_TEXT, compute_ms=prefill_ms, expected_ms=prefill_ms)
    transfer = 1000.0 * copy.size_bytes / max(m.bandwidth_bytes_per_s, 1e-9)
    speed = m.decode_elements_per_s.get(copy.level) or DEFAULT_DECODE_ELEMENTS_PER_S[copy.level]
    decode = 1000.0 * chunk.tokens * m.elements_per_token / speed
    compute = 0.0
    if action == BLEND:
        compute = prefill_ms * (m.blend_fraction + m.blend_overhead)
    return Decision(chunk.index, action, copy.level, copy.key, copy.size_bytes, transfer, decode,
                    compute, max(transfer, decode) + compute)


def _admissible(chunk: ChunkInput, m: Measurements, floor: int, allow_blend: bool) -> list[Decision]:
    options = [_option(chunk, LOAD_TEXT, None, m)]
    for copy in chunk.exact:
        if copy.level in QUALITY_RANK and quality_rank(LOAD_KV, copy.level) >= floor:
            options.append(_option(chunk, LOAD_KV, copy, m))
    if allow_blend and floor < QUALITY_RANK["lossless"]:
        for copy in chunk.position_free:
            if copy.level in QUALITY_RANK and quality_rank(BLEND, copy.level) >= floor:
                options.append(_option(chunk, BLEND, copy, m))
    return options


def _explain(best: Decision, options: list[Decision]) -> str:
    what = best.action if best.action == LOAD_TEXT else f"{best.action} {best.level}"
    if best.action == LOAD_TEXT:
        detail = f"prefill {best.compute_ms:.1f} ms"
    else:
        detail = (f"{best.expected_bytes / 1e6:.2f} MB: transfer {best.transfer_ms:.1f} ms, "
                  f"decode {best.decode_ms:.1f} ms")
        if best.action == BLEND:
            detail += f", recompute {best.compute_ms:.1f} ms"
    others = ", ".join(
        f"{o.action if o.action == LOAD_TEXT else o.action + ' ' + o.level} {o.expected_ms:.1f} ms"
        for o in options if o is not best
    )
    return f"{what}: {detail} -> {best.expected_ms:.1f} ms" + (f" (vs {others})" if others else "")


def decide_chunk(chunk: ChunkInput, m: Measurements, floor: str = DEFAULT_FLOOR,
                 allow_blend: bool = True) -> Decision:
    """The cheapest admissible option for one chunk, explained.

    Raises:
        ValueError: unknown quality floor.
    """
    if floor not in QUALITY_RANK:
        raise ValueError(f"quality_floor: {floor!r} not one of {', '.join(QUALITY_RANK)}")
    options = _admissible(chunk, m, QUALITY_RANK[floor], allow_blend)
    best = options[0]
    for opt in options[1:]:
        cheaper = opt.expected_ms < best.expected_ms * (1 - TIE_TOLERANCE)
        tie = opt.expected_ms <= best.expected_ms * (1 + TIE_TOLERANCE)
        better = quality_rank(opt.action, opt.level) > quality_rank(best.action, best.level)
        if cheaper or (tie and better):
            best = opt
    return Decision(**{**best.__dict__, "reason": _explain(best, options)})


def plan(chunks: Sequence[ChunkInput], m: Measurements, floor: str = DEFAULT_FLOOR,
         budget_ms: float = 0.0, allow_blend: bool = True) -> PlanResult:
    """Decide every chunk; minimises the expected TTFT under the quality floor.

    Args:
        chunks: the context's chunks in order.
        m: the measurements to use.
        floor: lowest acceptable quality ("exact", "lossless", "high", "balanced", "compact").
        budget_ms: the client's TTFT budget (0 = none); only reported against.
        allow_blend: consider BLEND for position-free copies.

    Raises:
        ValueError: unknown quality floor.
    """
    decisions = [decide_chunk(c, m, floor, allow_blend) for c in chunks]
    if m.probe and all(d.action == LOAD_TEXT for d in decisions):
        _probe(decisions, chunks, m, floor)
    ttft = m.rtt_ms + sum(d.expected_ms for d in decisions)
    within = budget_ms <= 0 or ttft <= budget_ms
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.action] = counts.get(d.action, 0) + 1
    explanation = (
        f"{len(decisions)} chunks ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
        f"bandwidth {m.bandwidth_bytes_per_s * 8 / 1e9:.3f} Gb/s, prefill "
        f"{m.prefill_tokens_per_s:.0f} tok/s, floor {floor}; expected TTFT {ttft:.1f} ms"
        + ("" if budget_ms <= 0 else f" {'within' if within else 'over'} budget {budget_ms:.0f} ms")
    )
    return PlanResult(decisions, ttft, within, explanation, m)


def _probe(decisions: list[Decision], chunks: Sequence[ChunkInput], m: Measurements,
           floor: str) -> None:
    """Turn the cheapest-to-switch chunk into LOAD_KV so the transfer re-measures bandwidth.

    Without it, a client whose estimate once fell below the break-even would
    recompute forever and never see its link get faster again.
    """
    best: tuple[float, int, Decision] | None = None
    for i, (chunk, current) in enumerate(zip(chunks, decisions)):
        for copy in chunk.exact:
            if copy.level in QUALITY_RANK and QUALITY_RANK[copy.level] >= QUALITY_RANK[floor]:
                opt = _option(chunk, LOAD_KV, copy, m)
                extra = opt.expected_ms - current.expected_ms
                if best is None or extra < best[0]:
                    best = (extra, i, opt)
    if best is not None:
        extra, i, opt = best
        reason = (f"probe (bandwidth estimate stale; +{extra:.1f} ms expected): "
                  + _explain(opt, [decisions[i]]))
        decisions[i] = Decision(**{**opt.__dict__, "reason": reason})


class BandwidthEstimator:
    """Per-client EWMA of observed throughput (bytes/s), bounded in clients.

    Args:
        default: estimate for a client never measured.
        alpha: weight of each new sample.
        max_clients: least-recently-updated clients beyond this are forgotten.
    """

    def __init__(self, default: float = 125e6, alpha: float = 0.3, max_clients: int = 10_000,
                 stale_after_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.default, self.alpha, self.max_clients = default, alpha, max_clients
        self.stale_after_s, self.clock = stale_after_s, clock
        self._est: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, client: str, nbytes: int, seconds: float) -> None:
        """Fold one transfer into ``client``'s estimate (ignored if too small to time)."""
        if nbytes < 64 * 1024 or seconds <= 0:
            return
        self.observe_rate(client, nbytes / seconds)

    def observe_rate(self, client: str, rate: float) -> None:
        """Fold a throughput measured elsewhere (e.g. by the client) into the EWMA."""
        if rate <= 0:
            return
        with self._lock:
            old = self._est.pop(client, None)
            new = rate if old is None else self.alpha * rate + (1 - self.alpha) * old[0]
            self._est[client] = (new, self.clock())
            while len(self._est) > self.max_clients:
                self._est.popitem(last=False)

    def estimate(self, client: str) -> float:
        """Current estimate for ``client`` (the default if unmeasured)."""
        with self._lock:
            return self._est.get(client, (self.default, 0.0))[0]

    def stale(self, client: str) -> bool:
        """True when ``client`` has an estimate older than ``stale_after_s``."""
        with self._lock:
            entry = self._est.get(client)
        return entry is not None and self.clock() - entry[1] > self.stale_after_s

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {client: rate for client, (rate, _) in self._est.items()}


def calibrate_decode(levels: Sequence[str] | None = None, tokens: int = 256,
                     layers: int = 4, kv_heads: int = 3, head_dim: int = 64, profile="known",
                     device=None) -> dict[str, float]:
    """Measure this machine's decode speed (KV elements/s) per level on synthetic KV.

    ``device``: where the KV is decoded to (default: the first CUDA device if there is one,
    where ``backend="auto"`` decodes with triton when it is installed, else the CPU).

    With ``profile="known"`` (default) the KV takes the shape of the first known profile with a
    transform (kvcodec ships SmolLM2's) and is coded with it: streams of calibrated models decode
    through their transform, the slower path (about half the speed on a CPU), so the controller
    does not overrate loading. ``profile=None`` or no such profile: profile-less streams of
    ``layers x kv_heads x tokens x head_dim``.

    Returns:
        level -> elements per second (empty if the codec is unavailable).
    """
    import torch

    from kvcodec.codec import LEVELS, decode, encode
    from kvcodec.codec.profile import builtin_profiles

    if profile == "known":
        profile = next((p for _, p in builtin_profiles() if p.has_transform), None)
    if profile is not None:
        layers, kv_heads, head_dim = profile.layers, profile.kv_heads, profile.head_dim
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(layers, kv_heads, tokens, head_dim, generator=gen).half()
    values = torch.randn(layers, kv_heads, tokens, head_dim, generator=gen).half()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict[str, float] = {}
    for level in levels or LEVELS:
        blob = encode(keys, values, level=level, model="calibration", profile=profile)
        decode(blob, profile=profile, device=device)  # warm-up (and the kernels' compilation)
        t0 = time.perf_counter()
        decode(blob, profile=profile, device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        out[level] = 2 * keys.numel() / max(time.perf_counter() - t0, 1e-9)
    return out
