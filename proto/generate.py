"""Regenerate the Python modules from ``kvcodec.proto``.

Run from anywhere with the dev extra installed::

    python -m kvcodec.proto.generate          # or: python proto/generate.py

The .proto is compiled from a temporary include root laid out as
``kvcodec/proto/kvcodec.proto`` so that the generated ``kvcodec_pb2_grpc.py``
imports ``from kvcodec.proto import kvcodec_pb2`` (an absolute import that works
inside the package) instead of protoc's default top-level ``import kvcodec_pb2``.
The generated files are committed; regenerate after every .proto change.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "kvcodec.proto"
GENERATED = ("kvcodec_pb2.py", "kvcodec_pb2.pyi", "kvcodec_pb2_grpc.py")


def generate(out_dir: Path = HERE) -> list[Path]:
    """Compile ``kvcodec.proto`` into ``out_dir``.

    Returns:
        The paths written.

    Raises:
        RuntimeError: protoc failed (its message is included).
    """
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "kvcodec" / "proto"
        pkg.mkdir(parents=True)
        shutil.copy(HERE / PROTO, pkg / PROTO)
        include = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main(
            [
                "protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"kvcodec/proto/{PROTO}",
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc exited with {rc} compiling {PROTO}")
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copy(pkg / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path)
    sys.exit(0)
