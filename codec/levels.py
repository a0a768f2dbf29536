"""Quality levels: what each named level trades.

A level fixes the quantization step of every substream relative to the spread
of its data, plus a per-layer refinement (the first layers of a transformer
are the most sensitive to KV error, so they get a finer step)::

    level      id  mode        step / RMS   note
    lossless   0   lossless    -            bit-exact for the input dtype
    high       1   quantized   0.10         near-lossless
    balanced   2   quantized   0.30         the default
    compact    3   quantized   0.75         aggressive

The ids are part of the bitstream (FORMAT.md); names are for people.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcodec.codec.errors import InvalidInput

MODE_LOSSLESS = 0
MODE_QUANTIZED = 1


@dataclass(frozen=True)
class Level:
    """One named quality level.

    Attributes:
        name: the level's name (``balanced`` ...).
        id: the level id written into the stream header.
        mode: ``MODE_LOSSLESS`` or ``MODE_QUANTIZED``.
        key_step: key quantization step as a fraction of the substream's RMS.
        value_step: value quantization step as a fraction of the RMS.
        sensitive_layers: how many leading layers get ``sensitive_factor``.
        sensitive_factor: step multiplier for those layers (< 1 = finer).
        patch_fraction: share of a stream's tokens whose values get a patch
            (:mod:`kvcodec.codec.patch`; needs a profile with the model's RoPE).
    """

    name: str
    id: int
    mode: int
    key_step: float = 0.0
    value_step: float = 0.0
    sensitive_layers: int = 2
    sensitive_factor: float = 0.5
    patch_fraction: float = 0.0

    def step_fraction(self, layer: int, is_value: bool) -> float:
        """Return the step, as a fraction of RMS, for one layer and tensor."""
        base = self.value_step if is_value else self.key_step
        if layer < self.sensitive_layers:
            base *= self.sensitive_factor
        return base


LOSSLESS = Level("lossless", 0, MODE_LOSSLESS)
HIGH = Level("high", 1, MODE_QUANTIZED, key_step=0.10, value_step=0.10, patch_fraction=0.02)
BALANCED = Level("balanced", 2, MODE_QUANTIZED, key_step=0.30, value_step=0.30)
COMPACT = Level("compact", 3, MODE_QUANTIZED, key_step=0.75, value_step=0.75)

_BY_NAME = {lv.name: lv for lv in (LOSSLESS, HIGH, BALANCED, COMPACT)}
_BY_ID = {lv.id: lv for lv in _BY_NAME.values()}
LEVELS: tuple[str, ...] = tuple(_BY_NAME)
DEFAULT_LEVEL = "balanced"


def get_level(name: str | Level) -> Level:
    """Look a level up by name; raises :class:`InvalidInput` for unknown names."""
    if isinstance(name, Level):
        return name
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InvalidInput(f"level: unknown level {name!r} (choose from {', '.join(LEVELS)})") from None


def level_by_id(level_id: int) -> Level | None:
    """Return the level with this header id, or None if unknown."""
    return _BY_ID.get(level_id)
