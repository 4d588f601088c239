#!/usr/bin/env bash
# Baseline and distilled students over several seeds in one work directory whose teacher
# and soft targets are already there (e.g. after scripts/demo.sh), then the results table
# with mean +- std per system and the JSON records:
#
#   scripts/seeds.sh CONFIG WORKDIR RESULTS_JSON "SEEDS" [--set FIELD=VALUE ...]
#   scripts/seeds.sh configs/demo_multi30k.py runs/demo results/multi30k_demo_seeds.json "0 1 2" \
#       --set teacher.checkpoint="$PWD/.cache/distill-jax/all-MiniLM-L6-v2"
#
# The overrides must be those the teacher and soft targets were made with (the demo passes
# the teacher's absolute path, as printed by scripts/fetch_minilm.sh). Runs are named
# baseline / distilled for seed 0 (the names scripts/demo.sh uses, so its runs count as
# seed 0) and baseline-s<seed> / distilled-s<seed> otherwise; train.seed = seed
# (parameter initialisation and dropout; the data order stays that of data.seed).
# A finished run is not repeated and an interrupted one resumes.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 CONFIG WORKDIR RESULTS_JSON \"SEEDS\" [--set FIELD=VALUE ...]" >&2
  exit 2
fi
config="$1" workdir="$2" results="$3" seeds="$4"
shift 4
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
runs=()
for seed in $seeds; do
  for kd in none offline; do
    name="$([[ $kd == none ]] && echo baseline || echo distilled)"
    [[ $seed == 0 ]] || name="$name-s$seed"
    runs+=("$name")
    echo "== $name"
    "$py" -m distill_jax.cli train-student --config "$config" --workdir "$workdir" \
      --name "$name" --set distill.kd=$kd --set train.seed=$seed "$@"
  done
done
# Only these runs: the work directory may also hold ablations (scripts/ablations.sh).
"$py" "$root/scripts/report.py" "$workdir" --runs "$(IFS=,; echo "${runs[*]}")" --json "$results"
