"""Scoring a lossy KV cache on the real model (the method of ANCHORS.md).

A :class:`QualityProbe` takes a token sequence, prefills its first ``prefix_len``
tokens (the *exact* prefix KV) and runs the next ``eval_len`` tokens teacher-forced
on top of it, keeping the reference log-probabilities. :meth:`QualityProbe.score`
then swaps the prefix KV for a reconstruction, runs the same eval tokens again and
compares:

``ppl``             perplexity of the ``eval_len`` eval tokens, each predicted from
                    the tokens before it. The first eval token is predicted by the
                    prefix's last position, whose logits come from the prefill
                    itself and so are the same for every reconstruction; the
                    other ``eval_len - 1`` come from the run over the replaced KV
                    (as in ANCHORS.md: ppl 23.37 on GPL-3, 1,536 + 512 tokens)
``ppl_change_pct``  ``100 * (ppl / ppl_ref - 1)``
``agree_pct``       share of the ``eval_len`` positions whose argmax token equals
                    the exact-KV run's argmax (greedy agreement)
``kl_mean``         mean KL(exact || reconstructed) of the next-token distributions, nats

Two baseline quantizers from ANCHORS.md live here too (:func:`quantize_per_token`,
:func:`per_token_baseline`): asymmetric min/max per token in groups of 64
channels, side information counted as an fp16 minimum and scale per group
(8.5 bits/element at 8 bits, 4.5 at 4 bits).

Example::

    loaded = load_model()
    probe = QualityProbe.from_text(loaded, "/usr/share/common-licenses/GPL-3")
    keys, values = probe.exact_kv
    print(probe.score(*per_token_baseline(keys, values, bits=4)))
    # QualityResult(ppl_ref=23.37, ppl=23.48, ppl_change_pct=0.47, agree_pct=93.2, ...)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kvcodec.codec.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from kvcodec.client.model import LoadedModel

__all__ = [
    "QualityResult",
    "QualityProbe",
    "quantize_per_token",
    "per_token_baseline",
    "per_token_bits_per_element",
]


@dataclass(frozen=True)
class QualityResult:
    """How far a reconstructed prefix KV moves the model (see the module docstring)."""

    ppl_ref: float
    ppl: float
    ppl_change_pct: float
    agree_pct: float
    kl_mean: float
    seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class QualityProbe:
    """The exact prefix KV of a text and the reference run of the tokens after it.

    Args:
        loaded: the model (from :func:`kvcodec.client.model.load_model`).
        token_ids: at least ``prefix_len + eval_len`` token ids; the first
            ``prefix_len + eval_len`` are used.
        prefix_len: tokens whose KV is replaced by reconstructions.
        eval_len: tokens scored after the prefix (>= 2).

    Raises:
        InvalidInput: too few tokens or bad lengths.
    """

    def __init__(
        self, loaded: LoadedModel, token_ids: Any, prefix_len: int = 1536, eval_len: int = 512
    ) -> None:
        import torch

        ids = [int(t) for t in token_ids]
        if prefix_len < 1 or eval_len < 2:
            raise InvalidInput(f"prefix_len={prefix_len}, eval_len={eval_len}: need >= 1 and >= 2")
        if len(ids) < prefix_len + eval_len:
            raise InvalidInput(
                f"token_ids: {len(ids)} tokens, need prefix_len + eval_len = {prefix_len + eval_len}"
            )
        self.loaded = loaded
        self.prefix_ids = ids[:prefix_len]
        self.eval_ids = torch.tensor([ids[prefix_len : prefix_len + eval_len]], dtype=torch.long)
        self._keys, self._values, self._first_logp = self._prefill_prefix()
        logp = self._eval_logprobs(self._keys, self._values)
        self._ref_logp = logp
        self._ref_p = logp.exp()
        self._ref_argmax = logp.argmax(-1)
        self.ppl_ref = self._perplexity(logp)

    @classmethod
    def from_text(
        cls,
        loaded: LoadedModel,
        path: str | os.PathLike[str],
        prefix_len: int = 1536,
        eval_len: int = 512,
    ) -> QualityProbe:
        """Build a probe from the first ``prefix_len + eval_len`` tokens of a text file."""
        from kvcodec.client.model import tokenize_file

        return cls(loaded, tokenize_file(loaded, path, prefix_len + eval_len), prefix_len, eval_len)

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    @property
    def eval_len(self) -> int:
        return int(self.eval_ids.shape[1])

    @property
    def exact_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact prefix KV ``(keys, values)`` in the model's dtype (fresh copies)."""
        return self._keys.clone(), self._values.clone()

    def score(self, keys: torch.Tensor, values: torch.Tensor) -> QualityResult:
        """Score a reconstruction of the prefix KV.

        Args:
            keys: ``[layers, kv_heads, prefix_len, head_dim]``, any float dtype
                (cast to the model's dtype).
            values: same shape.

        Returns:
            A :class:`QualityResult` (``seconds`` is this call's wall time).

        Raises:
            InvalidInput: shapes differ from the exact KV's.
        """
        t0 = time.perf_counter()
        self._check_shapes(keys, values)
        logp = self._eval_logprobs(keys, values)
        ppl = self._perplexity(logp)
        agree = float((logp.argmax(-1) == self._ref_argmax).float().mean()) * 100.0
        ref = self._ref_logp
        kl = float((self._ref_p * (ref - logp)).sum(-1).clamp_min(0).mean())  # >= 0; fp32 rounding
        return QualityResult(
            ppl_ref=self.ppl_ref,
            ppl=ppl,
            ppl_change_pct=100.0 * (ppl / self.ppl_ref - 1.0),
            agree_pct=agree,
            kl_mean=kl,
            seconds=time.perf_counter() - t0,
        )

    def ppl_spread(
        self, keys: torch.Tensor, values: torch.Tensor, trials: int = 8, block: int = 256, seed: int = 0
    ) -> list[float]:
        """Perplexity changes of ``trials`` reconstructions as damaged as this one, to tell a
        perplexity change from chance.

        At small errors the change is first-order in the error (flipping the error's sign flips
        it), so one reconstruction's change is one draw of a spread set by the error's size.
        Each trial keeps the error's magnitude and flips its sign independently per (layer,
        keys/values, kv head, ``block`` tokens) (seeded, so repeatable); the standard deviation
        of the returned changes is that spread.

        Args:
            keys, values: the reconstruction, as for :meth:`score`.
            trials: reconstructions to score (>= 2).
            block: tokens that share a sign (a codec's substream length).
            seed: the sign draws' seed.

        Returns:
            ``trials`` perplexity changes in percent.

        Raises:
            InvalidInput: bad shapes, ``trials < 2`` or ``block < 1``.
        """
        import torch

        if trials < 2 or block < 1:
            raise InvalidInput(f"trials={trials}, block={block}: need trials >= 2 and block >= 1")
        self._check_shapes(keys, values)
        gen = torch.Generator().manual_seed(seed)
        layers, heads, tokens, _ = self._keys.shape
        blocks = -(-tokens // block)
        exact = [self._keys.float().cpu(), self._values.float().cpu()]  # the signs are drawn on the CPU
        errors = [keys.float().cpu() - exact[0], values.float().cpu() - exact[1]]
        out = []
        for _ in range(trials):
            flipped = []
            for x, e in zip(exact, errors):
                signs = torch.randint(0, 2, (layers, heads, blocks, 1), generator=gen).float() * 2 - 1
                flipped.append(x + signs.repeat_interleave(block, dim=2)[:, :, :tokens] * e)
            out.append(self.score(*flipped).ppl_change_pct)
        return out

    def loss_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the eval tokens' summed NLL (each scored from the exact prefix KV and the
        eval tokens before it) with respect to the exact prefix keys (as cached: after RoPE) and
        values, in the model's dtype, ``[layers, kv_heads, prefix_len, head_dim]``: to first order an error
        ``e`` of the KV moves that loss by ``grad . e`` (the sensitivity that calibration and the
        saliency and metric benchmarks measure)."""
        import torch

        from kvcodec.client.hf_bridge import kv_to_cache

        loaded = self.loaded
        keys, values = (t.to(loaded.device).requires_grad_(True) for t in self.exact_kv)
        ev = self.eval_ids.to(loaded.device)
        with torch.enable_grad():
            out = loaded.model(input_ids=ev, past_key_values=kv_to_cache(keys, values, loaded.config), use_cache=True)
            torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ev[0, 1:], reduction="sum").backward()
        return keys.grad, values.grad

    def _check_shapes(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for name, t in (("keys", keys), ("values", values)):
            if tuple(t.shape) != tuple(self._keys.shape):
                raise InvalidInput(f"{name}: shape {tuple(t.shape)} != exact KV {tuple(self._keys.shape)}")

    def _prefill_prefix(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact prefix KV and the log-prob of the first eval token from the prefix's last position."""
        import torch

        from kvcodec.client.hf_bridge import cache_to_kv, full_cache

        loaded = self.loaded
        cache = full_cache()  # every layer's KV of every prefix token, sliding-window layers too
        ids = torch.tensor([self.prefix_ids], dtype=torch.long, device=loaded.device)
        with torch.inference_mode():
            out = loaded.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        last = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
        keys, values = cache_to_kv(cache)
        return keys, values, float(last[int(self.eval_ids[0, 0])])

    def _perplexity(self, logp: torch.Tensor) -> float:
        """exp(mean NLL) of the eval tokens: the first from the prefill, the rest from ``logp``."""
        targets = self.eval_ids[0, 1:].unsqueeze(-1)
        nll = -logp[:-1].gather(-1, targets).squeeze(-1).double()
        total = float(nll.sum()) - self._first_logp
        return math.exp(total / (nll.numel() + 1))

    def _eval_logprobs(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the eval positions' logits, [eval_len, vocab], float32."""
        import torch

        from kvcodec.client.hf_bridge import kv_to_cache

        loaded = self.loaded
        cache = kv_to_cache(keys, values, loaded.config, dtype=loaded.dtype, device=loaded.device)
        with torch.inference_mode():
            out = loaded.model(
                input_ids=self.eval_ids.to(loaded.device), past_key_values=cache, use_cache=True
            )
        return torch.log_softmax(out.logits[0].float(), dim=-1).cpu()


def quantize_per_token(
    x: torch.Tensor, bits: int, group: int = 64, *, param_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Asymmetric min/max quantization per token, in groups of ``group`` channels.

    Each group of ``group`` consecutive values along the last dimension gets its
    own minimum and scale; the side information is counted as two fp16 numbers
    (32 bits) per group. ANCHORS.md's figures keep the minimum and the scale
    unrounded (the default, ``param_dtype=None``); ``param_dtype=torch.float16``
    rounds them as a real fp16 container would (at 8 bits this alone moves ppl
    by ~+0.08% on SmolLM2, because a rounded minimum shifts a whole group).

    Args:
        x: ``[..., head_dim]``; ``head_dim`` must be a multiple of ``group``.
        bits: 1..16.
        group: channels per group.
        param_dtype: dtype the minimum and the scale are rounded to, or None.

    Returns:
        The dequantized tensor, same shape and dtype as ``x``.

    Raises:
        InvalidInput: bad ``bits`` or ``group``.
    """
    import torch

    if not 1 <= bits <= 16:
        raise InvalidInput(f"bits: must be in 1..16, got {bits}")
    if group < 1 or x.shape[-1] % group:
        raise InvalidInput(f"group: {group} does not divide the last dimension {x.shape[-1]}")
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    lo = g.amin(-1, keepdim=True)
    hi = g.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    if param_dtype is not None:
        lo, scale = lo.to(param_dtype).float(), scale.to(param_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((g - lo) / scale), 0, levels)
    return (q * scale + lo).reshape(x.shape).to(x.dtype)


def per_token_baseline(
    keys: torch.Tensor,
    values: torch.Tensor,
    bits: int = 8,
    group: int = 64,
    *,
    param_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ANCHORS.md's per-token group quantization of a KV pair (keys and values alike).

    See :func:`quantize_per_token` for the arguments; returns ``(keys, values)`` dequantized.
    """
    return (
        quantize_per_token(keys, bits, group, param_dtype=param_dtype),
        quantize_per_token(values, bits, group, param_dtype=param_dtype),
    )


def per_token_bits_per_element(bits: int, group: int = 64) -> float:
    """Bits per KV element of :func:`per_token_baseline`, side info included (fp16 min + scale)."""
    return bits + 32.0 / group
