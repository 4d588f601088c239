#!/usr/bin/env bash
# What online distillation costs against offline (issue #6's online vs offline ablation):
# trains two students of CONFIG for STEPS updates in WORKDIR (which must hold the
# fine-tuned teacher and its soft-target cache, e.g. after scripts/experiment.sh):
#   cost-offline  distill.kd=offline  top-K targets read from the cache
#   cost-online   distill.kd=online   the teacher's stride-masked forward passes run inside
#                                     every train step (the same targets, computed live)
# and prints each one's median training throughput (target tokens/s over the logged
# windows, the first two windows, which include compilation, left out) and their ratio.
# Both use greedy decoding for their final scoring, which is not timed here.
# Usage: bash scripts/online_cost.sh CONFIG WORKDIR STEPS [--set KEY=VALUE ...]
# (the teacher checkpoint is the local MiniLM, as in scripts/experiment.sh)
set -euo pipefail
usage="usage: bash scripts/online_cost.sh CONFIG WORKDIR STEPS [--set KEY=VALUE ...]"
config=${1:?$usage} workdir=${2:?$usage} steps=${3:?$usage}
shift 3
[[ -f "$config" ]] || { echo "$0: no config file '$config'" >&2; exit 2; }
for need in "$workdir/teacher/checkpoints" "$workdir/soft_targets/train"; do
  [ -d "$need" ] || { echo "$0: $need is missing: run the teacher and soft-targets stages first (scripts/experiment.sh)" >&2; exit 2; }
done
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
teacher="$(PYTHON="$python" "$root/scripts/fetch_minilm.sh")"
for kd in offline online; do
  rm -rf "$workdir/students/cost-$kd"
  "$python" -m distill_jax.cli train-student --config "$config" --workdir "$workdir" \
    --name "cost-$kd" --no-progress --set "teacher.checkpoint=$teacher" "$@" \
    --set distill.kd=$kd --set train.steps=$steps \
    --set train.eval_every=$((steps * 10)) --set train.save_every=$steps \
    --set decode.method=greedy >/dev/null
done
"$python" - "$workdir" <<'PY'
import json, statistics, sys
rates = {}
for kd in ("offline", "online"):
    lines = open(f"{sys.argv[1]}/students/cost-{kd}/metrics.jsonl").read().splitlines()
    windows = [json.loads(x) for x in lines if json.loads(x)["split"] == "train"][2:]
    if not windows:
        sys.exit(f"cost-{kd}: too few logged train windows; use more steps")
    rates[kd] = statistics.median(w["target_tokens_per_s"] for w in windows)
    print(f"{kd:8s} median {rates[kd]:8.1f} target tokens/s over {len(windows)} windows")
print(f"online / offline throughput: {rates['online'] / rates['offline']:.3f}")
PY
