#!/usr/bin/env bash
# Prepares Multi30k de-en for the teacher TEACHER (a BERT folder) into WORKDIR/data, the
# step every Multi30k experiment script starts with: from ../shared/data/multi30k beside
# the checkout when it is there, else downloaded. Does nothing when WORKDIR/data is
# already prepared.
#
#   scripts/prepare_multi30k.sh WORKDIR TEACHER     (PYTHON: the interpreter, default .venv's)
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 WORKDIR TEACHER" >&2
  exit 2
fi
workdir="$1" teacher="$2"
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
if [[ -f "$workdir/data/dataset.json" ]]; then
  echo "already prepared: $workdir/data"
  exit 0
fi
data_args=()
if [[ -f "$root/../shared/data/multi30k/train.de" ]]; then
  data_args=(--data-dir "$root/../shared/data/multi30k")
fi
"$py" -m distill_jax.cli prepare --dataset multi30k --direction de-en "${data_args[@]}" \
  --teacher "$teacher" --out "$workdir/data"
