"""Coder 3's quantized fields parsed in numba (kvcodec.codec.fields): every malformed field is a
CorruptStream naming it, the same through the parser alone and through the CPU decoder."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from kvcodec.codec import entropy, rans, substream
from kvcodec.codec.errors import CorruptStream

from _codec_fixtures import plain_part

HEADS, TOKENS, DIM = 2, 40, 8
CHANNELS = HEADS * DIM
STEPS = np.array([0.5, 2.0], dtype=np.float32)


def _deltas():
    rng = np.random.default_rng(3)
    d = np.round(rng.laplace(size=(CHANNELS, TOKENS)) * rng.choice([0.5, 6, 80], (CHANNELS, 1))).astype(np.int32)
    d[4, 9] = 25000  # an escape
    a = np.abs(d)
    return d, entropy.scale_classes(a.sum(axis=1), a.max(axis=1), TOKENS)


def _packed_part(centers, classes, words, escapes) -> bytearray:
    side = substream.pack_side(STEPS, np.asarray(centers), np.asarray(classes), packed=True)
    return bytearray(b"".join((side, struct.pack("<I", len(escapes)), escapes.astype("<u2").tobytes(),
                               words.astype("<u2").tobytes())))


def _refused(part: bytes | bytearray, packed: bool, match: str) -> None:
    for parse in (lambda: substream.parse_rans(memoryview(bytes(part)), HEADS, DIM, packed),
                  lambda: substream.decode_quantized(memoryview(bytes(part)), HEADS, TOKENS, DIM, torch.float32,
                                                     torch.float16, packed=packed)):
        with pytest.raises(CorruptStream, match=match):
            parse()


def test_good_parts_parse_to_the_encoders_fields():
    d, classes = _deltas()
    centers = np.arange(CHANNELS, dtype=np.int32) * 37 - 200  # two-byte centres in the plain layout
    words, escapes = rans.encode_deltas(d, classes)
    for part, packed in ((plain_part(STEPS, centers, classes, words, escapes), False),
                         (memoryview(bytes(_packed_part(centers, classes, words, escapes))), True)):
        p = substream.parse_rans(part, HEADS, DIM, packed)
        assert np.array_equal(p.steps, STEPS) and np.array_equal(p.centers, centers)
        assert np.array_equal(p.classes, classes)
        assert np.array_equal(p.words, words) and np.array_equal(p.escapes, escapes)
        out = substream.decode_quantized(part, HEADS, TOKENS, DIM, torch.float32, torch.float32, packed=packed)
        want = (d + centers[:, None]).astype(np.float32).reshape(HEADS, DIM, TOKENS) * STEPS[:, None, None]
        assert torch.equal(out, torch.from_numpy(want.transpose(0, 2, 1).copy()))


def test_malformed_plain_fields_are_refused_by_name():
    d, classes = _deltas()
    words, escapes = rans.encode_deltas(d, classes)
    good = bytes(plain_part(STEPS, np.zeros(CHANNELS, np.int32), classes, words, escapes))
    width_at, classes_at = 4 * HEADS, 4 * HEADS + 1 + CHANNELS
    n_esc_at = classes_at + CHANNELS

    def edit(at: int, data: bytes) -> bytes:
        return good[:at] + data + good[at + len(data):]

    _refused(edit(width_at, b"\x03"), False, "centre width: 3")
    _refused(edit(width_at, b"\x02")[: width_at + 1 + 2 * CHANNELS], False, "side information: .* bytes, needs")
    _refused(edit(classes_at + 5, bytes([entropy.NUM_CLASSES + 1])), False,
             f"channel 5: scale class {entropy.NUM_CLASSES + 1} > {entropy.NUM_CLASSES}")
    _refused(edit(n_esc_at, struct.pack("<I", 10**6)), False, "escape list: 1000000 escapes do not fit")
    _refused(good + b"\x00", False, "is not a whole number of u16 words")
    with pytest.raises(CorruptStream, match="entropy payload"):  # the words themselves: the decoder's to find
        substream.decode_quantized(memoryview(good[:-2]), HEADS, TOKENS, DIM, torch.float32, torch.float16)


def test_malformed_packed_fields_are_refused_by_name():
    d, classes = _deltas()
    words, escapes = rans.encode_deltas(d, classes)
    centers = np.zeros(CHANNELS, np.int32)
    good = _packed_part(centers, classes, words, escapes)
    side_at = 4 * HEADS

    bad = bytearray(good)
    bad[side_at + 1] = entropy.NUM_CLASSES + 3  # the centres row's class
    _refused(bad, True, f"channel 1: scale class {entropy.NUM_CLASSES + 3} > {entropy.NUM_CLASSES}")
    bad = bytearray(good)
    bad[side_at + 6 : side_at + 10] = struct.pack("<I", 2**32 - 1)  # n_side_words
    _refused(bad, True, "side information: .* escapes and 4294967295 words do not fit")
    n_side_words = struct.unpack_from("<I", good, side_at + 6)[0]
    bad = bytearray(good)
    bad[side_at + 6 : side_at + 10] = struct.pack("<I", n_side_words - 1)  # one side word short
    _refused(bad, True, "side information: entropy payload")
    over = classes.astype(np.int64)
    over[7] = entropy.NUM_CLASSES + 1  # a coded class no table has
    _refused(_packed_part(centers, over, words, escapes), True, "decoded class outside")
    wide = centers.astype(np.int64)
    wide[2] = 40000
    _refused(_packed_part(wide, classes, words, escapes), True, "decoded centre outside int16")


def test_short_parts_and_bad_steps_are_refused():
    d, classes = _deltas()
    words, escapes = rans.encode_deltas(d, classes)
    good = bytes(_packed_part(np.zeros(CHANNELS, np.int32), classes, words, escapes))
    _refused(good[: 4 * HEADS + 5], True, "side information: .* bytes, needs")
    _refused(struct.pack("<f", float("nan")) + good[4:], True, "step sizes")
