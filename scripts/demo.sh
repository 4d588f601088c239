#!/usr/bin/env bash
# The demo, end to end on Multi30k German->English (configs/demo_multi30k.py):
#   install -> prepare -> C-MLM teacher fine-tuning (all-MiniLM-L6-v2) -> soft targets
#   -> baseline student and distilled student -> a table of validation / test2016 BLEU
#   and PNG training curves in $WORKDIR (default runs/demo).
# Uses ../shared/data/multi30k when it is there, otherwise downloads the corpus.
#   scripts/demo.sh            the full demo (under an hour on a 2-core CPU)
#   scripts/demo.sh --quick    a few steps of everything (a smoke test, used by CI)
#   scripts/demo.sh --plan     print the work directory, config and settings, run nothing
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
quick=0
plan=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --plan) plan=1 ;;
    *) echo "usage: scripts/demo.sh [--quick] [--plan]" >&2; exit 2 ;;
  esac
done
if [[ $quick == 1 ]]; then
  default_workdir="$root/runs/demo-quick"
else
  default_workdir="$root/runs/demo"
fi
workdir="${WORKDIR:-$default_workdir}"
venv="${VENV:-$root/.venv}"
config=configs/demo_multi30k.py
quick_sets=()
if [[ $quick == 1 ]]; then
  # Coarse buckets (multiples of 32) keep the number of compiled shapes down; the students,
  # barely trained, would not stop before the length bound, so it is short (0.5 S + 4).
  quick_sets=(--set teacher.steps=4 --set teacher.eval_every=4 --set teacher.save_every=4
         --set teacher.quality_examples=64
         --set data.train_examples=256 --set train.steps=8 --set train.eval_every=4
         --set train.save_every=4 --set train.warmup_steps=2 --set train.bleu_sentences=32
         --set data.test_splits=test2016 --set decode.beam_size=2 --set data.bucket_step=32
         --set decode.bucket_step=32 --set decode.max_len_a=0.5 --set decode.max_len_b=4)
fi
if [[ $plan == 1 ]]; then
  echo "workdir: $workdir"
  echo "config: $config"
  echo "settings: ${quick_sets[*]:-(the config as it is)}"
  exit 0
fi
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
"$py" -m pip install --quiet -e ".[plots]" 2>&1 | grep -v "is ignored" || true
cli=("$py" -m distill_jax.cli)

teacher="$(PYTHON="$py" scripts/fetch_minilm.sh)"
sets=(--set "teacher.checkpoint=$teacher" "${quick_sets[@]}")

start=$SECONDS
stage() { echo; echo "== $1 ($(( (SECONDS - start) / 60 )) min elapsed)"; }

stage "prepare Multi30k de-en"
PYTHON="$py" scripts/prepare_multi30k.sh "$workdir" "$teacher"

stage "C-MLM teacher fine-tuning"
"${cli[@]}" train-teacher --config "$config" --workdir "$workdir" "${sets[@]}"
stage "soft targets"
"${cli[@]}" soft-targets --config "$config" --workdir "$workdir" "${sets[@]}"
stage "baseline student (no distillation)"
"${cli[@]}" train-student --config "$config" --workdir "$workdir" "${sets[@]}" --set distill.kd=none
stage "distilled student"
"${cli[@]}" train-student --config "$config" --workdir "$workdir" "${sets[@]}" --set distill.kd=offline
stage "report"
"$py" scripts/report.py "$workdir"
echo "demo finished in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
