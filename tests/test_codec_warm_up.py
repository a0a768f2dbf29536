"""warm_up: the CPU kernels are compiled before anyone times a decode."""

from __future__ import annotations

from kvcodec.codec import quantize, rans, transform, warm_up
from kvcodec.codec.profile import builtin_profiles


def test_warm_up_compiles_every_cpu_decode_path():
    warm_up()
    warm_up()  # idempotent
    outputs = {str(sig[7]) for sig in rans._decode.signatures}
    assert any("uint16" in o for o in outputs) and any("uint32" in o for o in outputs)  # half/bfloat16 and float32
    assert rans._encode.signatures and quantize._round_div.signatures
    if any(p.has_transform for _, p in builtin_profiles()):
        assert transform._finish.signatures
