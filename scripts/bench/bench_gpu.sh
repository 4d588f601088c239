#!/usr/bin/env bash
# The GPU benchmarks of issue #6, in one go, on a machine whose JAX and torch see a GPU:
#   * student train step, bf16, at the issue's shape (B32 x 32) and at GPU-sized
#     batches (B256 / B512 x 64): our FLOP utilisation against the measured bf16 matmul
#     peak (target >= 45%) and the ratio to the PyTorch nn.Transformer step;
#   * beam search (beam 5, 32 forced tokens) at batch 32 and 256: sentences/s, ratio to
#     transformers' MarianMTModel.generate on the GPU;
#   * teacher forward (MiniLM shapes: 6 layers, 384 wide) at B32 x 64/128 and B256 x 128,
#     the last also with the fused cuDNN attention kernel.
# Usage: bash scripts/bench/bench_gpu.sh OUT_DIR [TEACHER_CHECKPOINT]
# Without a checkpoint, a randomly initialised BERT of all-MiniLM-L6-v2's shape is saved
# in Hugging Face format first (timings do not depend on the weights' values).
set -euo pipefail
out=${1:?usage: bash scripts/bench/bench_gpu.sh OUT_DIR [TEACHER_CHECKPOINT]}
checkpoint=${2:-}
here=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX and torch share the GPU in one process: JAX preallocates only part of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
mkdir -p "$out"
python3 -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

if [ -z "$checkpoint" ]; then
  checkpoint="${TMPDIR:-/tmp}/minilm-shaped-bert"
  python3 - "$checkpoint" <<'PY'
import sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                              num_attention_heads=12, intermediate_size=1536,
                              max_position_embeddings=512, type_vocab_size=2)
transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(sys.argv[1])
print("saved a random MiniLM-shaped BERT to", sys.argv[1])
PY
fi

step() { python3 "$here/scripts/bench/bench_student_step.py" --dtype bfloat16 --runs 10 --warmup 3 "$@"; }
step --batch 32 --src-len 32 --tgt-len 32 --json "$out/student_step_b32.json"
step --batch 256 --src-len 64 --tgt-len 64 --padded-rows 32 --json "$out/student_step_b256.json"
step --batch 512 --src-len 64 --tgt-len 64 --padded-rows 64 --json "$out/student_step_b512.json"

beam() { python3 "$here/scripts/bench/bench_beam.py" --dtype bfloat16 --runs 5 "$@"; }
beam --batch 32 --json "$out/beam_b32.json"
beam --batch 256 --padded-rows 32 --json "$out/beam_b256.json"

python3 "$here/scripts/bench/bench_teacher.py" --dtype bfloat16 --runs 10 --checkpoint "$checkpoint" \
  --batch 32 --lengths 64 128 --json "$out/teacher_b32.json"
python3 "$here/scripts/bench/bench_teacher.py" --dtype bfloat16 --runs 10 --checkpoint "$checkpoint" \
  --batch 256 --lengths 128 --padded-rows 32 --json "$out/teacher_b256.json"
# the fused cuDNN attention kernel (teacher.inference_attention = "cudnn")
python3 "$here/scripts/bench/bench_teacher.py" --dtype bfloat16 --runs 10 --checkpoint "$checkpoint" \
  --attention cudnn --batch 256 --lengths 128 --padded-rows 32 --json "$out/teacher_b256_cudnn.json"
[ -n "${2:-}" ] || rm -rf "$checkpoint"
