"""A bounded, seeded fuzz harness for every decoder entry point (RELIABILITY.md case 8).

Inputs are mutations of the golden streams: bit/byte flips, inserts, deletes,
range duplications, truncations and splices of two golden files. Half of the
mutants get their CRCs recomputed afterwards so the damage reaches the header
checks, the substream parsers and the entropy decoder instead of stopping at a
checksum. Mutants whose CRCs were not recomputed must never decode (unless the
mutation was a no-op). Through ``decode``, ``decode_layer``, ``inspect`` and ``verify`` only
:class:`KVCodecError` subclasses may escape, a successful decode must return
the full shape the header promises, and no case may take longer than 2 s.

``KVCODEC_FUZZ_CASES`` (default 2000) and ``KVCODEC_FUZZ_SEED`` scale it up
for a longer local run.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time
from pathlib import Path

import pytest
import torch

from kvcodec.codec import container
from kvcodec.codec.api import decode, decode_layer, inspect, verify
from kvcodec.codec.container import DecodeLimits
from kvcodec.codec.errors import KVCodecError
from kvcodec.codec.profile import load_profile

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "digests.json").read_text())
SEEDS = {name: (GOLDEN / name).read_bytes() for name in sorted(MANIFEST) if not name.startswith("_")}
ORIGINALS = set(SEEDS.values())
# the transform seeds decode only with their profile (any other stream ignores it)
PROFILE = load_profile(GOLDEN / "profile_small_transform.json")
CASES = int(os.environ.get("KVCODEC_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("KVCODEC_FUZZ_SEED", "20261122"))
MAX_SECONDS = 2.0
# Tight enough that a mutated header cannot ask for much, loose enough for the seeds.
LIMITS = DecodeLimits(max_layers=64, max_kv_heads=64, max_head_dim=256, max_tokens=1 << 16,
                      max_elements=1 << 22, max_token_block=4096)


def refresh_crcs(data: bytes) -> bytes:
    """Recompute the header, index and substream CRCs of a (mutated) stream, best effort."""
    b = bytearray(data)
    if len(b) < container.HEADER_FIXED_SIZE:
        return data
    end = container.HEADER_FIXED_SIZE + struct.unpack_from("<H", b, container.HEADER_FIXED_SIZE - 2)[0]
    if len(b) < end + 4:
        return data
    struct.pack_into("<I", b, end, container.crc32(bytes(b[:end])))
    try:
        header, pos = container.parse_header(bytes(b), LIMITS)
    except KVCodecError:
        return bytes(b)
    n = header.n_substreams
    index_end = pos + 8 * n
    if n > 100_000 or len(b) < index_end + 4:
        return bytes(b)
    offset = index_end + 4
    for i in range(n):
        length = struct.unpack_from("<I", b, pos + 8 * i)[0]
        if offset + length <= len(b):
            struct.pack_into("<I", b, pos + 8 * i + 4, container.crc32(bytes(b[offset : offset + length])))
        offset += length
    struct.pack_into("<I", b, index_end, container.crc32(bytes(b[pos:index_end])))
    return bytes(b)


def mutate(rng: random.Random) -> tuple[str, bytes]:
    """One mutant of a random golden stream, with a short description of what was done."""
    name = rng.choice(sorted(SEEDS))
    b = bytearray(SEEDS[name])
    ops = []
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        op = rng.choice(["bit", "byte", "insert", "delete", "dup", "splice", "truncate", "int"])
        pos = rng.randrange(len(b) + 1) if b else 0
        if op == "bit" and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == "byte" and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == "insert":
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == "delete":
            del b[pos : pos + rng.randint(1, 32)]
        elif op == "dup":
            b[pos:pos] = b[pos : pos + rng.randint(1, 64)]
        elif op == "splice":
            other = SEEDS[rng.choice(sorted(SEEDS))]
            cut = rng.randrange(len(other) + 1)
            b = b[:pos] + bytearray(other[cut:])
        elif op == "truncate":
            del b[pos:]
        elif op == "int" and len(b) >= 4:  # an interesting 32-bit value into a field
            p = min(pos, len(b) - 4)
            value = rng.choice([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 4096, 4097, 65535, 65536])
            struct.pack_into("<I", b, p, value)
        ops.append(f"{op}@{pos}")
    fixed = rng.random() < 0.5
    data = refresh_crcs(bytes(b)) if fixed else bytes(b)
    return f"{name} {' '.join(ops)}{' +crc' if fixed else ''}", data


def run_decoders(data: bytes) -> tuple[int, bool]:
    """Run every decoder on ``data``; returns how many accepted it and whether decode did."""
    accepted = 0
    decoded = False
    try:
        kv = decode(data, limits=LIMITS, profile=PROFILE)
        h = container.parse(data, LIMITS).header
        assert tuple(kv.keys.shape) == (h.layers, h.kv_heads, h.tokens, h.head_dim)
        assert kv.values.shape == kv.keys.shape
        if h.mode == 1:  # quantized output is always finite
            assert torch.isfinite(kv.keys).all() and torch.isfinite(kv.values).all()
        accepted += 1
        decoded = True
    except KVCodecError:
        pass
    for call in (
        lambda: decode_layer(data, 0, limits=LIMITS, profile=PROFILE),
        lambda: inspect(data, limits=LIMITS),
        lambda: verify(data, limits=LIMITS, full=True, profile=PROFILE),
        lambda: verify(data, limits=LIMITS, full=False),
        lambda: decode(data, limits=LIMITS, allow_trailing=True, threads=2, profile=PROFILE),
        lambda: decode(data, limits=LIMITS, backend="torch", profile=PROFILE),  # the GPU decoder, on the CPU
    ):
        try:
            call()
            accepted += 1
        except KVCodecError:
            pass
    return accepted, decoded


def test_fuzz_only_codec_errors_escape_and_nothing_hangs():
    for seed in SEEDS.values():  # warm up first: numba compiles the rANS decoder on first use
        run_decoders(seed)
    rng = random.Random(SEED)
    accepted = slowest = 0.0
    for case in range(CASES):
        what, data = mutate(rng)
        start = time.perf_counter()
        try:
            count, decoded = run_decoders(data)
        except Exception as exc:  # noqa: BLE001 - the point of the harness
            pytest.fail(f"case {case} (seed {SEED}: {what}): {type(exc).__name__}: {exc}")
        accepted += count > 0
        if decoded and not what.endswith("+crc"):
            # without forged CRCs, only a no-op mutation may decode: never silently different KV
            assert data in ORIGINALS, f"case {case} ({what}): a corrupted stream decoded"
        elapsed = time.perf_counter() - start
        slowest = max(slowest, elapsed)
        assert elapsed < MAX_SECONDS, f"case {case} ({what}) took {elapsed:.2f} s"
    # Some mutants are harmless (e.g. a changed model name behind a recomputed CRC);
    # most are not.
    assert accepted < CASES / 2, f"{accepted} of {CASES} mutants accepted"
    print(f"fuzz: {CASES} cases, {int(accepted)} accepted, slowest {slowest * 1000:.1f} ms")


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_pass_every_decoder(name):
    assert run_decoders(SEEDS[name]) == (7, True)
