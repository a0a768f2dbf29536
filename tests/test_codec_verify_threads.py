"""verify(threads=N) checks the same things as the serial check and reports the same error."""

from __future__ import annotations

import pytest
import torch

from kvcodec.codec import container, encode, verify
from kvcodec.codec.errors import ChecksumMismatch


@pytest.fixture(scope="module")
def blob() -> bytes:
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(3, 2, 70, 16, generator=gen).half()
    v = torch.randn(3, 2, 70, 16, generator=gen).half()
    return encode(k, v, level="balanced", token_block=16)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_threads_verify_a_good_stream(blob: bytes, threads: int) -> None:
    assert verify(blob, threads=threads).substreams == container.parse(blob).header.n_substreams


def test_threads_report_the_first_bad_substream_in_order(blob: bytes) -> None:
    layout = container.parse(blob)
    bad = bytearray(blob)
    for sid in (7, 3, 11):  # corrupt three substreams; substream 3 is the first in order
        bad[layout.offsets[sid] + 1] ^= 0x40
    messages = set()
    for threads in (1, 2, 4):
        with pytest.raises(ChecksumMismatch) as exc:
            verify(bytes(bad), threads=threads)
        messages.add(str(exc.value))
    assert len(messages) == 1 and next(iter(messages)).startswith("substream 3 ")
