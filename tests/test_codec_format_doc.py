"""FORMAT.md is normative: its header table and worked example must match the code."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import torch

from kvcodec.codec import container
from kvcodec.codec.api import decode, inspect, verify

FORMAT_MD = Path(__file__).resolve().parent.parent / "FORMAT.md"
TEXT = FORMAT_MD.read_text(encoding="utf-8")
_TYPES = {"u8": "B", "u16": "H", "u32": "I", "i64": "q"}


def header_table() -> list[tuple[int, int, str, str]]:
    """Rows ``(offset, size, type, field)`` of the "Header fields" table."""
    section = TEXT.split("### Header fields", 1)[1].split("###", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (\w+) \| ([\w-]+) \| (\w+) \|", section, flags=re.M)
    return [(int(o), int(s) if s.isdigit() else -1, t, f) for o, s, t, f in rows]


def worked_example() -> bytes:
    """The xxd dump under "Worked example", as bytes."""
    section = TEXT.split("### Worked example", 1)[1]
    dump = section.split("```", 2)[1]
    out = bytearray()
    for line in dump.strip().splitlines():
        hexpart = line.split(":", 1)[1][:41]
        out += bytes.fromhex(hexpart.replace(" ", ""))
    return bytes(out)


def test_header_table_matches_the_struct():
    rows = header_table()
    fixed = [r for r in rows if r[3] != "model"]
    assert fixed[-1][0] + fixed[-1][1] == container.HEADER_FIXED_SIZE
    offset = 0
    for off, size, typ, field in fixed:
        assert off == offset, f"{field}: documented at {off}, follows a field ending at {offset}"
        if typ in _TYPES:
            assert struct.calcsize("<" + _TYPES[typ]) == size, field
        offset += size
    # a header packed by the code puts each documented field at its documented offset
    header = container.Header(mode=1, level=3, dtype="bfloat16", coder=2, layers=7, kv_heads=5,
                              tokens=300, head_dim=9, token_block=64, raw_tokens=2,
                              first_position=-12345, model="abc", profile=bytes(range(32)))
    blob = container.pack(header, [b""] * header.n_substreams)
    expect = {"version": 1, "flags": 0, "mode": 1, "level": 3, "dtype": 2, "coder": 2, "layers": 7,
              "kv_heads": 5, "tokens": 300, "head_dim": 9, "token_block": 64, "raw_tokens": 2,
              "reserved": 0, "first_position": -12345, "model_len": 3}
    for off, _, typ, field in fixed:
        if field in expect:
            assert struct.unpack_from("<" + _TYPES[typ], blob, off)[0] == expect[field], field
    assert blob[:8] == container.MAGIC
    assert blob[52:84] == bytes(range(32))
    assert blob[container.HEADER_FIXED_SIZE : container.HEADER_FIXED_SIZE + 3] == b"abc"


def test_documented_magic_is_the_code_magic():
    assert "89 4B 56 43 0D 0A 1A 0A" in TEXT
    assert container.MAGIC == bytes.fromhex("894B56430D0A1A0A")


def test_worked_example_decodes_as_described():
    blob = worked_example()
    info = verify(blob)
    assert (info.layers, info.kv_heads, info.tokens, info.head_dim, info.token_block) == (1, 1, 3, 2, 256)
    assert (info.level, info.dtype, info.model, info.first_position) == ("balanced", "float16", "demo", 0)
    assert info.raw_tokens == 1 and info.substreams == 2
    kv = decode(blob)
    assert kv.keys[0, 0, 0].tolist() == [0.5, -1.0]
    assert kv.values[0, 0, 0].tolist() == [1.0, 0.0]
    assert kv.keys.dtype == torch.float16 and torch.isfinite(kv.keys).all()


@pytest.mark.parametrize("cut", [1, 40, 90, 100, 150])
def test_worked_example_truncated_is_refused(cut):
    from kvcodec.codec.errors import KVCodecError

    with pytest.raises(KVCodecError):
        inspect(worked_example()[:-cut])
