#!/usr/bin/env bash
# One results experiment end to end in WORKDIR: prepare the corpus (from ../shared/data
# when it is there, else the download), fine-tune the C-MLM teacher, extract soft targets,
# then baseline and distilled students over SEEDS (scripts/seeds.sh), the table and the
# JSON records. Every stage skips or resumes what is already done, so a rerun after an
# interruption continues.
#
#   scripts/experiment.sh CORPUS CONFIG WORKDIR RESULTS_JSON "SEEDS" [--set FIELD=VALUE ...]
#   scripts/experiment.sh multi30k configs/multi30k_cpu.py runs/cpu \
#       results/multi30k_cpu_seeds.json "0 1 2"
#   scripts/experiment.sh multi30k configs/multi30k_full.py runs/full \
#       results/multi30k_full_seeds.json "0 1"
#   scripts/experiment.sh gigaword_sample configs/gigaword_cpu.py runs/giga \
#       results/gigaword_cpu.json "0"
#
# CORPUS is multi30k (German->English) or gigaword_sample. The teacher is
# all-MiniLM-L6-v2 from scripts/fetch_minilm.sh (its absolute path is recorded).
set -euo pipefail
if [[ $# -lt 5 ]]; then
  echo "usage: $0 CORPUS CONFIG WORKDIR RESULTS_JSON \"SEEDS\" [--set FIELD=VALUE ...]" >&2
  exit 2
fi
corpus="$1" config="$2" workdir="$3" results="$4" seeds="$5"
shift 5
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
case "$corpus" in
  multi30k) prepare_args=(--dataset multi30k --direction de-en) ;;
  gigaword_sample) prepare_args=(--dataset gigaword_sample) ;;
  *) echo "$0: CORPUS must be multi30k or gigaword_sample, got '$corpus'" >&2; exit 2 ;;
esac
[[ -f "$config" ]] || { echo "$0: no config file '$config'" >&2; exit 2; }
teacher="$(PYTHON="$py" "$root/scripts/fetch_minilm.sh")"
sets=(--set "teacher.checkpoint=$teacher" "$@")
cli=("$py" -m distill_jax.cli)
# Compiled programs are kept in the work directory, so a later seed (or a resumed stage)
# reuses the programs of the first instead of compiling them again.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/jax_cache}"
start=$SECONDS
stage() { echo; echo "== $1 ($(( (SECONDS - start) / 60 )) min elapsed)"; }

stage "prepare $corpus"
if [[ ! -f "$workdir/data/dataset.json" ]]; then
  local_data="$root/../shared/data/$corpus"
  [[ -d "$local_data" ]] && prepare_args+=(--data-dir "$local_data")
  "${cli[@]}" prepare "${prepare_args[@]}" --teacher "$teacher" --out "$workdir/data"
else
  echo "already prepared: $workdir/data"
fi
stage "C-MLM teacher fine-tuning"
"${cli[@]}" train-teacher --config "$config" --workdir "$workdir" "${sets[@]}"
stage "soft targets"
"${cli[@]}" soft-targets --config "$config" --workdir "$workdir" "${sets[@]}"
stage "students over seeds: $seeds"
"$root/scripts/seeds.sh" "$config" "$workdir" "$results" "$seeds" "${sets[@]}"
echo "experiment finished in $(( (SECONDS - start) / 60 )) min"
