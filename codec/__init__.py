"""kvcodec.codec: KV tensors <-> checksummed ``.kvc`` bitstreams.

The pipeline, one module per stage::

    quantize.py   per-head uniform steps, per-channel centres (torch, any device)
    transform.py  profile transforms: keys before RoPE, integer KLT bases (exact on any device)
    entropy.py    discrete-Laplace models + constriction ANS (coder 2, old streams)
    rans.py       coder 3: interleaved rANS, static per-class tables (numba, nogil)
    rans_torch.py coder 3 decoded with torch, lanes as a tensor dimension (CPU/CUDA)
    rans_encode.py coder 3 encoded on a device (one Triton launch or a torch loop), numba's bytes
    substream.py  one layer x tensor x token block: quantized or lossless payload
    device_encode.py every quantized substream of a group of layers at once on the device, same bytes
    container.py  header, substream index, CRC-32s, decoder limits (FORMAT.md)
    api.py        encode / decode / decode_layer / inspect / verify
    layers.py     decode_layers: yield layer by layer (numba threads or torch batches)
    kvfile.py     safetensors KV files, the CLI's interchange format

Errors are in :mod:`kvcodec.codec.errors` (root: ``KVCodecError``).
"""

from kvcodec.codec.api import (
    KVPair,
    StreamInfo,
    decode,
    decode_layer,
    encode,
    inspect,
    verify,
    warm_up,
)
from kvcodec.codec.container import DecodeLimits
from kvcodec.codec.errors import KVCodecError
from kvcodec.codec.layers import decode_layers
from kvcodec.codec.levels import DEFAULT_LEVEL, LEVELS

__all__ = [
    "encode",
    "decode",
    "decode_layer",
    "decode_layers",
    "inspect",
    "verify",
    "warm_up",
    "KVPair",
    "StreamInfo",
    "DecodeLimits",
    "KVCodecError",
    "LEVELS",
    "DEFAULT_LEVEL",
]
