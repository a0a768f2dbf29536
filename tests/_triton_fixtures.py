"""Shared by the Triton tests: re-running a module under the interpreter, compiling real cubins."""

from __future__ import annotations

import os
import subprocess
import sys


def rerun_under_interpreter(test_file: str) -> None:
    """Run ``test_file`` in a fresh interpreter with TRITON_INTERPRET=1; fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def compile_without_gpu(module: str, capability: int, cache_dir, ptx_op: str) -> tuple[int, int]:
    """Build ``kvcodec.codec.<module>.compile_for(capability)`` in a subprocess (the real compiler,
    not the interpreter); returns the cubin's size and how often ``ptx_op`` occurs in the PTX."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    code = (f"from kvcodec.codec import {module}; asm = {module}.compile_for({capability}); "
            f"print(len(asm['cubin']), asm['ptx'].count({ptx_op!r}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cubin_bytes, count = (int(x) for x in proc.stdout.split())
    return cubin_bytes, count
