"""Corrupt coder-3 words: CorruptStream from both decoders, never a crash or an out-of-bounds read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcodec.codec import container, decode, encode, entropy, rans, rans_torch
from kvcodec.codec.errors import CorruptStream, KVCodecError


def _substream(seed: int = 0, channels: int = 12, tokens: int = 70):
    rng = np.random.default_rng(seed)
    d = np.round(rng.laplace(size=(channels, tokens)) * rng.uniform(0.1, 8, (channels, 1))).astype(np.int32)
    d[0, 3] = 9000
    a = np.abs(d)
    cls = entropy.scale_classes(a.sum(axis=1), a.max(axis=1), tokens)
    words, escapes = rans.encode_deltas(d, cls)
    return words, escapes, cls, tokens


def _both(words, escapes, cls, tokens) -> list[str]:
    """Decode with numba and torch; return which raised CorruptStream (the other must have decoded)."""
    raised = []
    try:
        rans.decode_deltas(words, escapes, cls, tokens)
    except CorruptStream:
        raised.append("numba")
    try:
        rans_torch.decode_symbols([rans_torch.Substream(words, escapes, cls, tokens)])
    except CorruptStream:
        raised.append("torch")
    return raised


@pytest.mark.parametrize("cut", [0, 1, 5, -1, -7])
def test_truncated_words(cut):
    words, escapes, cls, tokens = _substream()
    assert _both(words[:cut], escapes, cls, tokens) == ["numba", "torch"]


def test_extra_words_and_escapes():
    words, escapes, cls, tokens = _substream()
    assert _both(np.concatenate([words, words[:3]]), escapes, cls, tokens) == ["numba", "torch"]
    assert _both(words, np.concatenate([escapes, escapes]), cls, tokens) == ["numba", "torch"]
    assert _both(words, escapes[:0], cls, tokens) == ["numba", "torch"]


def test_random_word_flips_agree_between_decoders():
    words, escapes, cls, tokens = _substream(1)
    rng = np.random.default_rng(2)
    caught = 0
    for _ in range(150):
        w = words.copy()
        for i in rng.integers(0, len(w), size=int(rng.integers(1, 4))):
            w[i] ^= np.uint16(1 << int(rng.integers(16)))
        raised = _both(w, escapes, cls, tokens)
        assert raised in ([], ["numba", "torch"])  # both decoders agree on every mutant
        caught += bool(raised)
    assert caught > 100  # the final-state and word-count checks catch almost every flip


def test_garbage_words_never_crash():
    rng = np.random.default_rng(4)
    cls = np.full(8, 40, dtype=np.uint8)
    for n in (0, 1, 2, 3, 17, 64, 300):
        words = rng.integers(0, 2**16, size=n, dtype=np.uint16)
        escapes = rng.integers(0, 2**16, size=int(rng.integers(0, 4)), dtype=np.uint16)
        assert _both(words, escapes, cls, 40) == ["numba", "torch"]


def test_class_out_of_range():
    words, escapes, cls, tokens = _substream()
    cls = cls.copy()
    cls[2] = entropy.NUM_CLASSES + 1
    with pytest.raises(CorruptStream, match="scale class"):
        rans.decode_deltas(words, escapes, cls, tokens)


def _forge_substream(blob: bytes, sid: int, fn) -> bytes:
    """Rewrite substream ``sid`` with ``fn(payload)`` and fix the index and its CRC."""
    layout = container.parse(blob)
    payloads = [bytes(blob[o : o + n]) for o, n in zip(layout.offsets, layout.lengths)]
    payloads[sid] = fn(payloads[sid])
    return container.pack(layout.header, payloads)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_stream_level_forgeries_raise_codec_errors(backend):
    k = torch.randn(2, 2, 40, 8).half()
    blob = encode(k, k * 0.3, token_block=20, sink_tokens=0)
    side = 4 * 2 + 1 + 2 * 16  # steps, centre width, one-byte centres, classes
    forgeries = [
        lambda p: p[:-2],  # one word short
        lambda p: p + b"\x00\x00",  # one word too many
        lambda p: p[:-1],  # half a word
        lambda p: p[:side] + (2**31).to_bytes(4, "little") + p[side + 4 :],  # escape count lies
        lambda p: p[:side] + b"\x01\x00\x00\x00\x07\x00" + p[side + 4 :],  # an extra escape
        lambda p: p[: side - 16] + bytes([200]) + p[side - 15 :],  # class 200
        lambda p: p[:side + 4] + bytes(len(p) - side - 4),  # words zeroed
    ]
    for forge in forgeries:
        bad = _forge_substream(blob, 1, forge)
        with pytest.raises(KVCodecError):
            decode(bad, backend=backend)
