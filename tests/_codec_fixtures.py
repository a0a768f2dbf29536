"""Hand-built coder-3 substreams, for tests that pick the deltas themselves."""

from __future__ import annotations

import struct

import numpy as np

from kvcodec.codec import substream


def plain_part(steps: np.ndarray, centers: np.ndarray, classes: np.ndarray, words: np.ndarray,
               escapes: np.ndarray) -> memoryview:
    """A coder-3 quantized part with plain side information (FORMAT.md): what
    :func:`kvcodec.codec.substream.decode_quantized` reads after the raw tokens."""
    side = substream.pack_side(np.asarray(steps, dtype=np.float32), np.asarray(centers), np.asarray(classes, dtype=np.uint8),
                               packed=False)
    return memoryview(b"".join((side, struct.pack("<I", len(escapes)), np.asarray(escapes).astype("<u2").tobytes(),
                                np.asarray(words).astype("<u2").tobytes())))
