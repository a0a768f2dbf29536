"""The fused Triton rANS kernel, run by Triton's CPU interpreter, equals the numba decoder bit for bit.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton is first
imported in the process. This module sets it at import; if triton was already
imported (by another test module) without it, the in-process tests skip and
one test reruns this module in a subprocess instead, so the checks always run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from _triton_fixtures import compile_without_gpu, rerun_under_interpreter
import torch

from kvcodec.codec import decode, encode, entropy, rans, rans_torch, rans_triton
from kvcodec.codec.errors import CorruptStream
from kvcodec.codec.layers import decode_layers
from kvcodec.codec.rans_torch import Substream

pytestmark = pytest.mark.skipif(not rans_triton.available(), reason="triton is not installed (extra 'gpu')")
in_process = pytest.mark.skipif(_PREIMPORTED, reason="triton was imported before TRITON_INTERPRET=1; see the subprocess test")
GOLDEN = Path(__file__).parent / "golden"
# every lossy tiny_fp32 stream, and two of small_fp16 (~4 s each in the interpreter)
LOSSY = sorted(p.name for p in GOLDEN.glob("tiny_fp32.*.kvc") if "lossless" not in p.name)
LOSSY += ["small_fp16.balanced.kvc", "small_fp16.profiled.high.kvc"]


def _random_substream(rng: np.random.Generator, big: bool = False) -> tuple[Substream, np.ndarray]:
    """Small random deltas (some channels uncoded, some escapes); ``big`` gives all 32 lanes."""
    channels, tokens = (40, 60) if big else (int(rng.integers(1, 24)), int(rng.integers(1, 70)))
    scale = rng.choice([2.0, 20.0] if big else [0.0, 0.05, 0.5, 2.0, 20.0, 400.0], size=(channels, 1))
    d = np.round(rng.laplace(size=(channels, tokens)) * scale).astype(np.int32)
    for _ in range(int(rng.integers(0, 3))):  # outliers -> escapes of either sign
        d[rng.integers(channels), rng.integers(tokens)] = int(rng.choice([-1, 1]) * rng.integers(100, 60000))
    a = np.abs(d)
    cls = entropy.scale_classes(a.sum(axis=1), a.max(axis=1), tokens)
    words, escapes = rans.encode_deltas(d, cls)
    return Substream(words, escapes, cls, tokens), d


@in_process
@pytest.mark.parametrize("seed", range(2))
def test_kernel_matches_numba_on_random_substreams(seed):
    rng = np.random.default_rng(seed)
    pairs = [_random_substream(rng, big=(i == 0)) for i in range(18)]
    subs = [s for s, _ in pairs]
    lanes = {rans_torch._lanes(int((s.classes != 0).sum()) * s.tokens) for s in subs}
    assert 32 in lanes and any(0 < n < 32 for n in lanes)
    assert sum(len(s.escapes) for s in subs) > 0 and len({int(c) for s in subs for c in s.classes}) > 3
    out = rans_triton.decode_symbols(subs)  # one launch for the whole batch
    for (sub, d), got in zip(pairs, out):
        ref = rans.decode_deltas(sub.words, sub.escapes, sub.classes, sub.tokens)
        assert np.array_equal(ref, d)
        assert got.dtype == torch.int32 and np.array_equal(got.numpy(), ref)


@in_process
@pytest.mark.parametrize("name", LOSSY)
def test_golden_stream_decodes_identically(name):
    blob = (GOLDEN / name).read_bytes()
    ref = decode(blob, backend="numba")
    got = decode(blob, backend="triton")
    assert _bits(got.keys).equal(_bits(ref.keys)) and _bits(got.values).equal(_bits(ref.values))


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


@in_process
def test_decode_layers_with_triton_backend():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 40, 16, generator=g)
    k[..., 3] *= 30
    blob = encode(k.half(), (k * 0.3).half(), level="compact", token_block=16)
    ref = decode(blob, backend="numba")
    for layer, keys, values in decode_layers(blob, backend="triton", batch_layers=1):
        assert torch.equal(keys, ref.keys[layer]) and torch.equal(values, ref.values[layer])


def _corruptions(sub: Substream) -> list[Substream]:
    w, e = sub.words, sub.escapes
    flipped = w.copy()
    flipped[len(w) // 2] ^= 0x5A5A
    return [
        Substream(flipped, e, sub.classes, sub.tokens),  # a word changed
        Substream(w[:-3], e, sub.classes, sub.tokens),  # words cut short
        Substream(np.append(w, np.uint16(7)), e, sub.classes, sub.tokens),  # a word too many
        Substream(w, e[:-1], sub.classes, sub.tokens),  # an escape missing
        Substream(w, np.append(e, np.uint16(1)), sub.classes, sub.tokens),  # an escape too many
        Substream(w[:5], e, sub.classes, sub.tokens),  # fewer words than initial states
    ]


@in_process
def test_corrupt_substreams_raise_corrupt_stream():
    rng = np.random.default_rng(7)
    d = np.round(rng.laplace(size=(6, 40)) * 3).astype(np.int32)
    d[2, 5] = 5000
    a = np.abs(d)
    cls = entropy.scale_classes(a.sum(axis=1), a.max(axis=1), 40)
    words, escapes = rans.encode_deltas(d, cls)
    good = Substream(words, escapes, cls, 40)
    assert len(escapes) == 1
    for bad in _corruptions(good):
        with pytest.raises(CorruptStream):
            rans.decode_deltas(bad.words, bad.escapes, bad.classes, bad.tokens)
        with pytest.raises(CorruptStream, match="batch item 1: entropy payload"):
            rans_triton.decode_symbols([good, bad])
    garbage = Substream(rng.integers(0, 65536, size=len(words), dtype=np.uint16), escapes, cls, 40)
    with pytest.raises(CorruptStream):
        rans_triton.decode_symbols([garbage])


def test_whole_module_in_subprocess_when_triton_was_imported_first():
    if not _PREIMPORTED:
        pytest.skip("triton runs in the interpreter in this process; the tests above ran here")
    rerun_under_interpreter(__file__)


@pytest.mark.parametrize("capability", [80, 90])
def test_kernel_compiles_for_cuda_without_a_gpu(capability, tmp_path):
    """The interpreter does not type-check like the compiler: build the real cubin (A100, H100) too."""
    cubin_bytes, global_loads = compile_without_gpu("rans_triton", capability, tmp_path, "ld.global")
    assert cubin_bytes > 1000 and global_loads > 0


_UNUSABLE = """
import sys
{block}
from kvcodec.codec import decode, rans_triton
from kvcodec.codec.errors import InvalidInput
blob = open({path!r}, "rb").read()
assert decode(blob).keys.shape[0] > 0  # the default back end needs no triton
try:
    decode(blob, backend="triton")
except InvalidInput as exc:
    print(rans_triton.available(), exc)
"""


@pytest.mark.parametrize("blocked", [True, False], ids=["triton-missing", "cpu-without-interpreter"])
def test_unusable_triton_is_a_clear_invalid_input(blocked):
    code = _UNUSABLE.format(block="sys.modules['triton'] = None" if blocked else "", path=str(GOLDEN / LOSSY[0]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if blocked:
        assert proc.stdout.startswith("False backend 'triton': triton is not installed")
    else:
        assert proc.stdout.startswith("True backend 'triton': device cpu cannot run the kernel")


@in_process
def test_fuzzed_words_agree_with_numba():
    """Random word and escape edits: the kernel raises exactly when numba does, else returns its deltas."""
    rng = np.random.default_rng(11)
    agreed = raised = 0
    for _ in range(12):
        sub, _ = _random_substream(rng)
        words, escapes = sub.words.copy(), sub.escapes.copy()
        if len(words) and rng.random() < 0.8:
            words[rng.integers(len(words))] = rng.integers(0, 65536)
        elif len(escapes):
            escapes[rng.integers(len(escapes))] ^= np.uint16(1 << int(rng.integers(16)))
        bad = Substream(words, escapes, sub.classes, sub.tokens)
        try:
            ref = rans.decode_deltas(bad.words, bad.escapes, bad.classes, bad.tokens)
        except CorruptStream:
            with pytest.raises(CorruptStream):
                rans_triton.decode_symbols([bad])
            raised += 1
            continue
        assert np.array_equal(rans_triton.decode_symbols([bad])[0].numpy(), ref)
        agreed += 1
    assert raised > 0 and agreed + raised == 12
