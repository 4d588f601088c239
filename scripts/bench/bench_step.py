"""Benchmark one student train step: step time, target tokens/s, FLOPs and MFU.

MFU is measured against this machine's own peak: the best of several jitted
2048x2048 float32 matmuls. FLOPs per step are counted analytically (6 * matmul
parameters * tokens + attention terms) and read from XLA's cost analysis.

  python scripts/bench/bench_step.py [--configs tiny,reference] [--steps 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import sharding, train
from distill_jax.models.transformer import TransformerConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

# name -> (config, batch rows, source length, target length)
CONFIGS = {
    "tiny": (
        TransformerConfig(
            vocab_size=64,
            d_model=64,
            num_heads=4,
            mlp_dim=128,
            num_encoder_layers=2,
            num_decoder_layers=2,
            max_len=64,
        ),
        32,
        32,
        32,
    ),
    "reference": (TransformerConfig(vocab_size=10_000, max_len=64), 128, 32, 32),
}


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best observed FLOP/s of a jitted n x n float32 matmul."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def analytic_flops(cfg: TransformerConfig, batch: int, src: int, tgt: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step on a full batch."""
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    enc_layer = 4 * d * d + 2 * d * f  # q,k,v,out + ffn
    dec_layer = 8 * d * d + 2 * d * f  # self + cross attention + ffn
    matmul = (
        2
        * batch
        * (
            src * cfg.num_encoder_layers * enc_layer
            + tgt * cfg.num_decoder_layers * dec_layer
            + tgt * d * v
        )
    )
    attention = (
        2
        * batch
        * 2
        * d
        * (cfg.num_encoder_layers * src * src + cfg.num_decoder_layers * (tgt * tgt + tgt * src))
    )
    return 3.0 * (matmul + attention)


def bench(name: str, steps: int, peak: float) -> dict:
    cfg, rows, src_len, tgt_len = CONFIGS[name]
    mesh = benchlib.one_device_mesh()
    model, tx, state, shardings = benchlib.init_student(cfg, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "src": rng.integers(4, cfg.vocab_size, (rows, src_len)).astype(np.int32),
        "tgt_in": rng.integers(4, cfg.vocab_size, (rows, tgt_len)).astype(np.int32),
        "tgt_out": rng.integers(4, cfg.vocab_size, (rows, tgt_len)).astype(np.int32),
    }
    loss_fn = train.student_loss_fn(model, train.StudentLossConfig(alpha=0.0))
    step = train.make_train_step(
        loss_fn, tx, mesh, shardings, sharding.batch_shardings(batch, mesh)
    )
    batch = sharding.shard_batch(batch, mesh)
    key = jax.random.PRNGKey(0)
    compiled = step.lower(state, batch, key).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    times, state = benchlib.time_train_steps(step, state, batch, key, steps)
    step_time = statistics.median(times)
    flops = analytic_flops(cfg, rows, src_len, tgt_len)
    tokens = rows * tgt_len
    return {
        "config": name,
        "batch_rows": rows,
        "target_tokens": tokens,
        "step_time_s": step_time,
        "target_tokens_per_s": tokens / step_time,
        "flops_analytic": flops,
        "flops_xla": xla_flops,
        "mfu_analytic": flops / step_time / peak,
        "mfu_xla": xla_flops / step_time / peak,
        "peak_matmul_flops": peak,
        "device": str(jax.devices()[0].platform),
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,reference", help="comma-separated names")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--json", help="also write the results (one JSON line each) here")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    peak = matmul_peak_flops()
    lines = []
    for name in names:
        line = json.dumps(bench(name, args.steps, peak))
        print(line, flush=True)
        lines.append(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
