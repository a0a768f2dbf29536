"""Stage 2: entropy coding of quantized symbols (constriction ANS).

Each channel of a substream is modelled by a two-sided geometric (discrete
Laplace) distribution centred on zero, truncated to ``[-kmax, kmax]``:

    p(d) ∝ f[|d|],   f[0] = 2**22,   f[k] = max(1, (f[k-1] * RHO_Q20[c]) >> 20)

where ``c`` is the channel's *scale class*, one byte of side information.
The table ``RHO_Q20`` below is normative (FORMAT.md): class ``c`` (1-based)
corresponds to a mean absolute symbol of ``2 ** ((c - 40) / 4)``, so classes
are a quarter-octave apart (the rate lost to that rounding is under 0.01
bit/symbol). Class 0 means every symbol is zero and nothing is coded. All
table arithmetic is integer, so encoder and decoder build identical models
on any machine.

Symbols are coded with constriction's ANS stack coder, channel after
channel, one model per channel; the stream is a sequence of little-endian
uint32 words.
"""

from __future__ import annotations

import functools

import numpy as np

from kvcodec.codec.errors import CorruptStream, LimitExceeded

F0_BITS = 22
# Decode-work limit for coder-2 model tables: entries per payload byte, plus a floor.
TABLE_ENTRIES_PER_BYTE = 64
TABLE_ENTRIES_FLOOR = 1 << 16
RHO_Q20 = (
    609, 724, 861, 1024, 1218, 1448, 1722, 2048, 2435, 2896,
    3444, 4096, 4871, 5792, 6888, 8192, 9741, 11584, 13775, 16380,
    19477, 23159, 27535, 32736, 38914, 46251, 54958, 65282, 77510, 91969,
    109026, 129086, 152572, 179907, 211470, 247535, 288195, 333277, 382276, 434334,
    488287, 542783, 596451, 648056, 696616, 741455, 782192, 818703, 851060, 879470,
    904226, 925664, 944135, 959982, 973532, 985086, 994914, 1003259, 1010332, 1016320,
    1021383, 1025661, 1029273, 1032320, 1034889, 1037055, 1038879, 1040416, 1041710, 1042799,
    1043716, 1044488, 1045137, 1045684, 1046143, 1046530, 1046855, 1047129, 1047359, 1047552,
    1047715, 1047852, 1047967, 1048064, 1048146, 1048214, 1048272, 1048320, 1048361, 1048395,
    1048424, 1048448, 1048468, 1048485, 1048500, 1048512, 1048522, 1048531, 1048538, 1048544,
    1048549, 1048553, 1048557, 1048560, 1048563, 1048565, 1048566,
)
NUM_CLASSES = len(RHO_Q20)  # classes 1..NUM_CLASSES; 0 = all zero
# Class boundaries: mean |d| between 2**((c-40)/4 - 1/8) and 2**((c-40)/4 + 1/8) -> class c.
BOUNDS = np.array([2.0 ** ((c - 40) / 4 + 0.125) for c in range(1, NUM_CLASSES)], dtype=np.float64)


def scale_classes(abs_sums: np.ndarray, kmax: np.ndarray, count: int) -> np.ndarray:
    """Pick each channel's scale class from its sum of ``|delta|`` over ``count`` symbols."""
    means = np.asarray(abs_sums, dtype=np.float64) / count  # the same float division as s / count
    cls = 1 + np.searchsorted(BOUNDS, means, side="left")  # == bisect.bisect_left
    return np.where(np.asarray(kmax) > 0, cls, 0).astype(np.uint8)


_PREFIXES: dict[int, list[int]] = {}


def half_table(cls: int, kmax: int) -> np.ndarray:
    """Return ``f[0..kmax]`` (int64) for scale class ``cls``.

    The recurrence is evaluated lazily and cached per class; once ``f`` reaches 1
    it stays 1 (``floor(f * rho) < f`` for ``rho < 1``).
    """
    f = _PREFIXES.setdefault(cls, [1 << F0_BITS])
    rho = RHO_Q20[cls - 1]
    while len(f) <= kmax and f[-1] > 1:
        f.append(max(1, (f[-1] * rho) >> 20))
    out = np.ones(kmax + 1, dtype=np.int64)
    n = min(len(f), kmax + 1)
    out[:n] = f[:n]
    return out


def frequencies(cls: int, kmax: int) -> np.ndarray:
    """Return the integer frequency of each symbol index ``d + kmax`` in ``[0, 2*kmax]``."""
    half = half_table(cls, kmax)
    return np.concatenate([half[:0:-1], half])


@functools.lru_cache(maxsize=8192)
def _model(cls: int, kmax: int):  # -> constriction Categorical
    import constriction

    freqs = frequencies(cls, kmax).astype(np.float64)
    return constriction.stream.model.Categorical(freqs, perfect=False)


def ideal_bits(deltas: np.ndarray, kmax: np.ndarray, classes: np.ndarray) -> float:
    """Information content (bits) of the symbols under their models (for reports)."""
    total = 0.0
    for c in range(deltas.shape[0]):
        if kmax[c] == 0:
            continue
        f = frequencies(int(classes[c]), int(kmax[c])).astype(np.float64)
        p = f / f.sum()
        total -= float(np.log2(p[deltas[c] + kmax[c]]).sum())
    return total


def encode_symbols(deltas: np.ndarray, kmax: np.ndarray, classes: np.ndarray) -> bytes:
    """Entropy-code ``deltas`` ([channels, tokens] int32) channel by channel.

    Returns:
        The ANS words as little-endian bytes.
    """
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    for c in range(deltas.shape[0] - 1, -1, -1):
        k = int(kmax[c])
        if k == 0:
            continue
        symbols = (deltas[c] + k).astype(np.int32, copy=False)
        coder.encode_reverse(symbols, _model(int(classes[c]), k))
    return coder.get_compressed().astype("<u4").tobytes()


def decode_symbols(
    data: bytes | memoryview, kmax: np.ndarray, classes: np.ndarray, tokens: int
) -> np.ndarray:
    """Inverse of :func:`encode_symbols`.

    Raises:
        CorruptStream: the words do not decode to exactly the expected symbols.
        LimitExceeded: the side information asks for more model-table work than
            the payload's size justifies (a crafted stream could otherwise cost
            ~100 µs of CPU per input byte).
    """
    import constriction

    if len(data) % 4:
        raise CorruptStream(f"entropy payload: {len(data)} bytes is not a whole number of words")
    models = {(int(c), int(k)) for c, k in zip(classes.tolist(), kmax.tolist()) if k > 0}
    entries = sum(2 * k + 1 for _, k in models)
    budget = TABLE_ENTRIES_PER_BYTE * len(data) + TABLE_ENTRIES_FLOOR
    if entries > budget:
        raise LimitExceeded(
            f"entropy models: {entries} table entries for a {len(data)}-byte payload (limit {budget})"
        )
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    out = np.zeros((len(kmax), tokens), dtype=np.int32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        for c in range(len(kmax)):
            k = int(kmax[c])
            if k == 0:
                continue
            out[c] = coder.decode(_model(int(classes[c]), k), tokens) - k
        leftover = not coder.is_empty()
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CorruptStream(f"entropy payload: undecodable ({exc})") from None
    if leftover:
        raise CorruptStream("entropy payload: words left over after the last symbol")
    return out


def check_classes(classes: np.ndarray, kmax: np.ndarray) -> None:
    """Validate side information read from a stream before any table is built."""
    bad = np.nonzero(classes > NUM_CLASSES)[0]
    if len(bad):
        raise CorruptStream(f"channel {bad[0]}: scale class {classes[bad[0]]} > {NUM_CLASSES}")
    bad = np.nonzero((classes == 0) != (kmax == 0))[0]
    if len(bad):
        raise CorruptStream(
            f"channel {bad[0]}: scale class {classes[bad[0]]} inconsistent with kmax {kmax[bad[0]]}"
        )


def entropy_bits(deltas: np.ndarray) -> float:
    """Empirical zeroth-order entropy of each channel's symbols, summed (bits)."""
    total = 0.0
    for row in deltas:
        _, counts = np.unique(row, return_counts=True)
        p = counts / counts.sum()
        total -= float((counts * np.log2(p)).sum())
    return total


__all__ = [
    "RHO_Q20",
    "NUM_CLASSES",
    "scale_classes",
    "frequencies",
    "encode_symbols",
    "decode_symbols",
    "check_classes",
    "ideal_bits",
    "entropy_bits",
]
