#!/usr/bin/env bash
# The distillation ablations of issue #6 on an experiment that scripts/experiment.sh has
# run (teacher, soft targets with teacher.top_k >= 32, seed-0 baseline and distilled):
#
#   scripts/ablations.sh CONFIG WORKDIR RESULTS_JSON [--online | --online-only]
#   scripts/ablations.sh configs/multi30k_cpu.py runs/cpu results/multi30k_cpu_ablations.json
#   scripts/ablations.sh configs/multi30k_cpu.py runs/cpu results/multi30k_cpu_online.json --online-only
#
# Seed 0, one change each from the distilled student of CONFIG:
#   distilled-k1, distilled-k32            distill.top_k = 1, 32 (CONFIG: 8)
#   distilled-a0.3, distilled-a0.7         distill.alpha = 0.3, 0.7 (CONFIG: 0.5)
#   distilled-random-teacher               a teacher fine-tuned with the same budget from
#                                          random initialisation instead of the pretrained
#                                          weights (in WORKDIR-random, which shares the data)
#   distilled-online (only with --online)  the teacher inside the train step instead of the
#                                          soft-target cache: the same targets (the tests
#                                          check that both give the same loss) at the cost
#                                          of ~7 teacher forwards a step
# then one table (differences from the seed-0 baseline) and its JSON records. With
# --online-only, only distilled-online is trained and tabled beside baseline and distilled.
# Finished runs are not repeated and interrupted ones resume.
set -euo pipefail
usage="usage: $0 CONFIG WORKDIR RESULTS_JSON [--online | --online-only]"
if [[ $# -lt 3 || $# -gt 4 ]]; then
  echo "$usage" >&2
  exit 2
fi
config="$1" workdir="${2%/}" results="$3"
case "${4:-}" in
  "") online=0 ;;
  --online) online=1 ;;
  --online-only) online=2 ;;
  *) echo "$0: unknown option '$4'; $usage" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
[[ -f "$config" ]] || { echo "$0: no config file '$config'" >&2; exit 2; }
for need in data/dataset.json teacher soft_targets students/baseline/results.json \
            students/distilled/results.json; do
  [[ -e "$workdir/$need" ]] || {
    echo "$0: $workdir/$need is missing: run scripts/experiment.sh with seed 0 first" >&2
    exit 2; }
done
teacher="$(PYTHON="$py" "$root/scripts/fetch_minilm.sh")"
common=(--config "$config" --set "teacher.checkpoint=$teacher" --no-progress)
cli=("$py" -m distill_jax.cli)
student() { echo "== $1"; "${cli[@]}" train-student "${common[@]}" --workdir "$2" --name "$1" "${@:3}"; }

if [[ $online == 2 ]]; then
  student distilled-online "$workdir" --set distill.kd=online
  exec "$py" "$root/scripts/report.py" "$workdir" --runs baseline,distilled,distilled-online \
    --baseline baseline --json "$results"
fi
student distilled-k1 "$workdir" --set distill.top_k=1
student distilled-k32 "$workdir" --set distill.top_k=32
student distilled-a0.3 "$workdir" --set distill.alpha=0.3
student distilled-a0.7 "$workdir" --set distill.alpha=0.7
runs=baseline,distilled,distilled-k1,distilled-k32,distilled-a0.3,distilled-a0.7
if [[ $online == 1 ]]; then
  student distilled-online "$workdir" --set distill.kd=online
  runs+=,distilled-online
fi

random="$workdir-random"
mkdir -p "$random"
[[ -e "$random/data" ]] || ln -s "$(cd "$workdir/data" && pwd)" "$random/data"
echo "== teacher from random initialisation ($random)"
"${cli[@]}" train-teacher "${common[@]}" --workdir "$random" --set teacher.init=random
"${cli[@]}" soft-targets "${common[@]}" --workdir "$random" --set teacher.init=random
student distilled-random-teacher "$random" --set teacher.init=random
runs+=,distilled-random-teacher

"$py" "$root/scripts/report.py" "$workdir" "$random" --runs "$runs" --baseline baseline \
  --json "$results"
