"""Golden vectors and device independence (RELIABILITY.md case 6).

``tests/golden/`` holds tiny KV inputs (safetensors), their ``.kvc`` streams for
each level and ``digests.json`` (regenerate only deliberately, with
``KVCODEC_REGEN_GOLDEN=1 python scripts/make_golden.py``). Every stream must
decode to the recorded digests forever, and encoding the input must reproduce
the stream byte for byte.

The quantizer claims the same symbols on any device and reduction order
(codec/quantize.py): checked here with 1 vs 2 CPU threads, with a token
permutation (integer statistics must not change), and, when CUDA is present,
CPU vs CUDA. torch's ``meta`` device computes no values, so it cannot stand in
for a GPU; on a CPU-only machine the CUDA tests are skipped, and the torch rANS
decoder (the one CUDA runs) is checked against the golden digests on the CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kvcodec.codec import container
from kvcodec.codec.api import decode, encode, inspect, verify
from kvcodec.codec.kvfile import read_kv
from kvcodec.codec.quantize import head_steps, quantize_block

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "digests.json").read_text())
STREAMS = sorted(k for k in MANIFEST if not k.startswith("_"))
# streams of older encoders that must decode forever: coder 2, and coder 3 before packed side information
LEGACY_DIRS = [GOLDEN.parent / "golden_coder2", GOLDEN.parent / "golden_coder3_plain"]
LEGACY = {f"{d.name}/{k}": (d, v) for d in LEGACY_DIRS if d.is_dir()
          for k, v in json.loads((d / "digests.json").read_text()).items() if not k.startswith("_")}
LEGACY_STREAMS = sorted(LEGACY)
LOSSY_STREAMS = [s for s in STREAMS if MANIFEST[s]["level"] != "lossless"]

_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN.parent.parent / "scripts" / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


def _libzstd() -> str:
    import zstandard

    return ".".join(map(str, zstandard.ZSTD_VERSION))


def _profile(entry: dict) -> Path | None:
    """The profile a golden stream names (transform streams need it to decode)."""
    return GOLDEN / entry["profile"] if "profile" in entry else None


def test_manifest_covers_every_level_and_file():
    levels = {MANIFEST[s]["level"] for s in STREAMS}
    assert levels == {"lossless", "high", "balanced", "compact"}
    on_disk = {p.name for p in GOLDEN.glob("*.kvc")}
    assert on_disk == set(STREAMS)
    assert any("profile" in MANIFEST[s] for s in STREAMS)
    assert any(inspect((GOLDEN / s).read_bytes()).transform for s in STREAMS)
    assert {d.name for d, _ in LEGACY.values()} == {d.name for d in LEGACY_DIRS}, "legacy vectors are missing"


@pytest.mark.parametrize("stream", STREAMS)
def test_golden_stream_decodes_to_recorded_digest(stream):
    entry = MANIFEST[stream]
    blob = (GOLDEN / stream).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == entry["stream_sha256"], "golden file itself changed"
    kv = decode(blob, profile=_profile(entry))
    assert make_golden.tensor_digest(kv.keys) == entry["keys_sha256"]
    assert make_golden.tensor_digest(kv.values) == entry["values_sha256"]
    info = verify(blob, profile=_profile(entry))
    assert info.level == entry["level"] and info.model == entry["model"]
    assert info.first_position == entry["first_position"] and info.total_bytes == entry["bytes"]


@pytest.mark.parametrize("stream", LOSSY_STREAMS)
def test_torch_decoder_gives_the_recorded_digest(stream):
    """The torch rANS decoder (the one CUDA uses), run here on the CPU, decodes the golden
    streams to the same bits as the numba decoder."""
    entry = MANIFEST[stream]
    kv = decode((GOLDEN / stream).read_bytes(), backend="torch", profile=_profile(entry))
    assert make_golden.tensor_digest(kv.keys) == entry["keys_sha256"]
    assert make_golden.tensor_digest(kv.values) == entry["values_sha256"]


@pytest.mark.parametrize("stream", STREAMS)
def test_encoding_golden_input_reproduces_stream(stream):
    entry = MANIFEST[stream]
    if entry["level"] == "lossless" and _libzstd() != MANIFEST["_generated_with"]["libzstd"]:
        pytest.skip(f"lossless bytes depend on libzstd ({_libzstd()} here, "
                    f"{MANIFEST['_generated_with']['libzstd']} at generation); decoding is still checked")
    kv = read_kv(GOLDEN / entry["input"])
    extra = {"profile": GOLDEN / entry["profile"]} if "profile" in entry else {}
    blob = encode(kv.keys, kv.values, level=entry["level"], token_block=entry["token_block"],
                  model=kv.model, first_position=kv.first_position, **extra)
    assert hashlib.sha256(blob).hexdigest() == entry["stream_sha256"]


@pytest.mark.parametrize("stream", [s for s in STREAMS if "profile" in MANIFEST[s]])
def test_profiled_stream_records_the_profile_digest(stream):
    from kvcodec.codec.profile import load_profile

    profile = load_profile(GOLDEN / MANIFEST[stream]["profile"])
    header = container.parse((GOLDEN / stream).read_bytes()).header
    assert header.profile == profile.digest


@pytest.mark.parametrize("stream", LEGACY_STREAMS)
def test_legacy_streams_still_decode_to_recorded_digest(stream):
    """Streams written by older encoders (coder 2, constriction ANS; coder 3 with plain side
    information) decode forever."""
    folder, entry = LEGACY[stream]
    blob = (folder / stream.split("/", 1)[1]).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == entry["stream_sha256"]
    kv = decode(blob)
    assert make_golden.tensor_digest(kv.keys) == entry["keys_sha256"]
    assert make_golden.tensor_digest(kv.values) == entry["values_sha256"]
    verify(blob)


@pytest.mark.parametrize("stream", [s for s in STREAMS if MANIFEST[s]["level"] == "lossless"])
def test_golden_lossless_equals_input_bits(stream):
    kv_in = read_kv(GOLDEN / MANIFEST[stream]["input"])
    kv = decode((GOLDEN / stream).read_bytes())
    for a, b in ((kv.keys, kv_in.keys), (kv.values, kv_in.values)):
        ints = torch.int32 if a.dtype == torch.float32 else torch.int16
        assert torch.equal(a.view(ints), b.view(ints))
    assert kv_in.keys.isnan().any() or kv_in.keys.dtype != torch.bfloat16  # specials really there


def test_golden_small_header_fields():
    info = inspect((GOLDEN / "small_fp16.balanced.kvc").read_bytes())
    assert (info.layers, info.kv_heads, info.tokens, info.head_dim, info.token_block) == (2, 2, 20, 8, 8)
    assert info.dtype == "float16" and info.substreams == 2 * 2 * 3
    assert info.bits_per_element == pytest.approx(8 * info.total_bytes / (2 * 2 * 2 * 20 * 8))


def _symbols(x: torch.Tensor, fraction: float = 0.3):
    steps = head_steps(x, fraction)
    return steps, quantize_block(x, steps)


def _kv_like(seed: int, heads: int = 4, tokens: int = 2048, dim: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(heads, tokens, dim, generator=g) * torch.rand(1, 1, dim, generator=g) * 3
    x[:, :, 5] += 20.0  # outlier channel with a large mean
    return x


def test_symbols_identical_across_thread_counts():
    x = _kv_like(1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s1, b1 = _symbols(x)
        torch.set_num_threads(2)
        s2, b2 = _symbols(x)
    finally:
        torch.set_num_threads(before)
    assert s1.tobytes() == s2.tobytes()
    for name in ("centers", "deltas", "kmax", "abs_sums"):
        assert np.array_equal(getattr(b1, name), getattr(b2, name)), name


def test_symbols_independent_of_token_order():
    """A permuted copy of the tokens (another reduction order) gives the same integer
    statistics and step, and the same symbols permuted."""
    x = _kv_like(2, tokens=300)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))
    s1, b1 = _symbols(x)
    s2, b2 = _symbols(x[:, perm].contiguous())
    assert s1.tobytes() == s2.tobytes()
    assert np.array_equal(b1.centers, b2.centers) and np.array_equal(b1.kmax, b2.kmax)
    assert np.array_equal(b1.abs_sums, b2.abs_sums)
    assert np.array_equal(b1.deltas[:, perm.numpy()], b2.deltas)


def test_encode_of_non_contiguous_view_matches_contiguous():
    kv = read_kv(GOLDEN / "kv_small_fp16.safetensors")
    strided_k = kv.keys.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided_k.is_contiguous()
    a = encode(kv.keys, kv.values, level="balanced", token_block=8, model=kv.model)
    b = encode(strided_k, kv.values, level="balanced", token_block=8, model=kv.model)
    assert a == b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("stream", LOSSY_STREAMS + ["small_fp16.lossless.kvc"])
def test_cuda_encode_and_decode_match_golden(stream):
    entry = MANIFEST[stream]
    kv = read_kv(GOLDEN / entry["input"])
    extra = {"profile": GOLDEN / entry["profile"]} if "profile" in entry else {}
    blob = encode(kv.keys.cuda(), kv.values.cuda(), level=entry["level"], token_block=entry["token_block"],
                  model=kv.model, first_position=kv.first_position, **extra)
    if entry["level"] != "lossless" or _libzstd() == MANIFEST["_generated_with"]["libzstd"]:
        assert hashlib.sha256(blob).hexdigest() == entry["stream_sha256"]
    out = decode((GOLDEN / stream).read_bytes(), device="cuda")
    assert out.keys.is_cuda
    assert make_golden.tensor_digest(out.keys.cpu()) == entry["keys_sha256"]
    assert make_golden.tensor_digest(out.values.cpu()) == entry["values_sha256"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_symbols_equal_cpu_symbols_on_large_block():
    x = _kv_like(4, tokens=4096, dim=128)
    s1, b1 = _symbols(x)
    s2, b2 = _symbols(x.cuda())
    assert s1.tobytes() == s2.tobytes()
    assert np.array_equal(b1.deltas, b2.deltas) and np.array_equal(b1.centers, b2.centers)


def test_layout_matches_header_arithmetic():
    blob = (GOLDEN / "small_fp16.high.kvc").read_bytes()
    layout = container.parse(blob)
    assert layout.offsets[-1] + layout.lengths[-1] == len(blob)
    assert layout.header_bytes == container.HEADER_FIXED_SIZE + len(b"golden-small") + 4
