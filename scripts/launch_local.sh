#!/usr/bin/env bash
# Runs N copies of a command on this machine as one multi-process JAX job on loopback
# (simulated hosts, DEVICES_PER_PROCESS CPU devices each, default 4):
#
#   scripts/launch_local.sh 2 distill-jax train-student --config configs/tiny.py --workdir /tmp/w
#
# Each copy gets DISTILL_JAX_COORDINATOR=127.0.0.1:<free port>, DISTILL_JAX_NUM_PROCESSES=N
# and DISTILL_JAX_PROCESS_ID=i; its output lines are prefixed with [i]. SIGINT/SIGTERM are
# forwarded; if one copy fails the others are stopped. Exit status 0 only if all succeed.
# DEVICES_PER_PROCESS=0 leaves the platform and XLA_FLAGS alone (e.g. one GPU per copy via
# CUDA_VISIBLE_DEVICES). See `python -m distill_jax.launch --help`; LAUNCH_PYTHON picks the
# interpreter.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 N COMMAND [ARGS...]" >&2
  exit 2
fi
n="$1"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${LAUNCH_PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m distill_jax.launch --local-processes "$n" \
  --devices-per-process "${DEVICES_PER_PROCESS:-4}" -- "$@"
