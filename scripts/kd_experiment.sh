#!/usr/bin/env bash
# The distillation result end to end in WORKDIR (#35): prepare Multi30k de-en (from
# ../shared/data when it is there), fine-tune the C-MLM teacher, extract its soft targets
# (train, and val for the teacher-quality summary), train the seed-0 baseline and every
# candidate distillation setting, CHOOSE the candidate with the best seed-0 val BLEU, train
# seeds 1 and 2 of the baseline and of the chosen student, write the table, and only then
# score the release-only test sets (test2017, mscoco2017, test2018) once for those systems.
# Every stage skips or resumes what is done, so rerunning after an interruption continues.
#
#   scripts/kd_experiment.sh CONFIG WORKDIR RESULTS_STEM [--set FIELD=VALUE ...]
#   scripts/kd_experiment.sh configs/multi30k_strong.py /work/runs/strong results/multi30k_strong
#
# Writes RESULTS_STEM_candidates.json (seed 0: baseline and every candidate),
# RESULTS_STEM_seeds.json (3 seeds of baseline and chosen; mean +- std per system) and
# RESULTS_STEM_release.json (the release-only sets). CANDIDATES (environment) replaces the
# candidate list: "name:FIELD=VALUE,FIELD=VALUE name2:..." (all students share the config's
# budget: train.steps updates, checkpoint chosen on val; with --set train.patience=P each
# trains until val stops improving instead, train.steps being the most it may take, and a
# rerun with more steps or patience continues the finished students in place, their
# earlier results kept in RUN_DIR/at_step_N/). TEACHER_STAGES=skip trains no
# teacher and extracts nothing: the students use the soft-target caches already in
# WORKDIR/soft_targets (train and val), e.g. a GPU teacher's put there by
# scripts/gpu_unpack.py; pass the --set lines its record names (docs/gpu.md) so that the
# students' cache identity is that teacher's.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 CONFIG WORKDIR RESULTS_STEM [--set FIELD=VALUE ...]" >&2
  exit 2
fi
config="$1" workdir="$2" stem="$3"
shift 3
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
[[ -f "$config" ]] || { echo "$0: no config file '$config'" >&2; exit 2; }
teacher_stages="${TEACHER_STAGES:-run}"
case "$teacher_stages" in
  run) ;;
  skip)
    for split in train val; do
      [[ -d "$workdir/soft_targets/$split" ]] || {
        echo "$0: TEACHER_STAGES=skip needs the soft targets of $split in" \
          "$workdir/soft_targets/$split (scripts/gpu_unpack.py puts a GPU run's there)" >&2
        exit 2
      }
    done ;;
  *) echo "$0: TEACHER_STAGES must be run or skip, not '$teacher_stages'" >&2; exit 2 ;;
esac
# K 1 (the best of the 4,000-pair ablations), T 1 (the teacher's own sharpness, p(ref) 0.65
# at T 1) and the paper's weights (T 10 makes the 8 kept pieces nearly flat).
candidates="${CANDIDATES:-k1:distill.alpha=0.5,distill.top_k=1 t1:distill.alpha=0.5,distill.temperature=1,distill.top_k=8 paper:distill.alpha=0.5,distill.temperature=10,distill.top_k=8}"
teacher="$(PYTHON="$py" "$root/scripts/fetch_minilm.sh")"
sets=(--set "teacher.checkpoint=$teacher" "$@")
cli=("$py" -m distill_jax.cli)
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/jax_cache}"
start=$SECONDS
stage() { echo; echo "== $1 ($(( (SECONDS - start) / 60 )) min elapsed, $(date -u +%H:%M) UTC)"; }
student() {  # NAME SEED [FIELD=VALUE ...]
  local name="$1" seed="$2"; shift 2
  local extra=()
  for kv in "$@"; do extra+=(--set "$kv"); done
  stage "student $name"
  "${cli[@]}" train-student --config "$config" --workdir "$workdir" --name "$name" \
    "${sets[@]}" --set train.seed="$seed" "${extra[@]}"
}

stage "prepare multi30k"
PYTHON="$py" "$root/scripts/prepare_multi30k.sh" "$workdir" "$teacher"
if [[ "$teacher_stages" == run ]]; then
  stage "C-MLM teacher fine-tuning"
  "${cli[@]}" train-teacher --config "$config" --workdir "$workdir" "${sets[@]}"
  for split in train val; do
    stage "soft targets ($split)"
    "${cli[@]}" soft-targets --config "$config" --workdir "$workdir" "${sets[@]}" --split "$split"
  done
else
  stage "teacher stages skipped: the students use $workdir/soft_targets (TEACHER_STAGES=skip)"
fi

names=(baseline)
student baseline 0 distill.kd=none
for cand in $candidates; do
  name="${cand%%:*}"
  IFS=, read -r -a fields <<< "${cand#*:}"
  names+=("$name")
  student "$name" 0 distill.kd=offline "${fields[@]}"
done
stage "choose on val"
"$py" "$root/scripts/report.py" "$workdir" --runs "$(IFS=,; echo "${names[*]}")" \
  --baseline baseline --json "${stem}_candidates.json"
chosen="$("$py" - "$workdir" "${names[@]:1}" <<'PY'
import json, sys
workdir, names = sys.argv[1], sys.argv[2:]
def val_bleu(name):
    return json.load(open(f"{workdir}/students/{name}/results.json"))["splits"]["val"]["bleu"]
print(max(names, key=val_bleu))
PY
)"
echo "chosen on seed-0 val BLEU: $chosen"
chosen_fields=()
for cand in $candidates; do
  [[ "${cand%%:*}" == "$chosen" ]] && IFS=, read -r -a chosen_fields <<< "${cand#*:}"
done
for seed in 1 2; do
  student "baseline-s$seed" "$seed" distill.kd=none
  student "$chosen-s$seed" "$seed" distill.kd=offline "${chosen_fields[@]}"
done
runs="baseline,baseline-s1,baseline-s2,$chosen,$chosen-s1,$chosen-s2"
stage "table"
"$py" "$root/scripts/report.py" "$workdir" --runs "$runs" --baseline baseline \
  --json "${stem}_seeds.json"
stage "release-only test sets (scored once, never used for a choice)"
"$py" "$root/scripts/release_eval.py" --config "$config" --workdir "$workdir" --runs "$runs" \
  --json "${stem}_release.json" "${sets[@]}"
echo "experiment finished in $(( (SECONDS - start) / 60 )) min"
