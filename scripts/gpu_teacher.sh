#!/usr/bin/env bash
# The one command of a lent GPU session (docs/gpu.md): from the repository root, with the
# folder scripts/gpu_pack.py filled (.device/, carried) and OUT set to the folder whose
# files come back, it fine-tunes the C-MLM teacher (bf16 on a GPU, sized for the time
# budget), extracts its soft targets for train and val, scores the teacher on val, trains
# students if time is left, and leaves in OUT the soft-target caches as a split archive
# and a results record (scripts/gpu_teacher.py; at most 8 files of at most 16 MiB).
# scripts/gpu_unpack.py then brings the caches into a CPU work directory.
#
#   OUT=DIR bash scripts/gpu_teacher.sh [--budget-s 540] [--steps N] [--set FIELD=VALUE ...]
#
# Options (all of scripts/gpu_teacher.py; --help lists them): --pack DIR (default .device),
# --config (default configs/multi30k_strong.py), --workdir (default /tmp/gpu-teacher-work),
# --steps / --tokens (teacher.steps / teacher.tokens_per_batch), --budget-s (wall-clock
# seconds for everything), --reserve-s (kept for extraction and packing after the
# teacher), --students "NAME:FIELD=VALUE,... ...", --dtype. PYTHON: the interpreter
# (default python3). It also runs on a CPU (JAX on CPU, float32) with a tiny config.
set -euo pipefail
usage() {
  echo "usage: OUT=DIR bash $0 [--pack DIR] [--config FILE] [--steps N] [--budget-s S] [--set FIELD=VALUE ...]" >&2
  exit 2
}
if [[ -z "${OUT:-}" ]]; then
  echo "$0: OUT is not set (the folder whose files come back)" >&2
  usage
fi
# (bad options: scripts/gpu_teacher.py prints its usage and exits with 2)
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "${PYTHON:-python3}" "$root/scripts/gpu_teacher.py" --out "$OUT" "$@"
