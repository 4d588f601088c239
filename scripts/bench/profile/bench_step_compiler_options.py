"""The student train step compiled with XLA's default options against the same step
compiled with extra ones, timed in alternating rounds in one process.

  python scripts/bench/profile/bench_step_compiler_options.py xla_cpu_experimental_ynn_fusion_type=

The step is the issue-#6 reference one (6+6 layers, d 512, vocabulary 10,000, offline KD
with K = 8, alpha 0.5; 32 sentences of 32 source and 32 target tokens, random ids), built
by ``train.make_train_step`` on one device; both programs keep the project's own options
(``train.donated_state_compiler_options``) and each updates its own copy of the state.
Prints both medians (>= 5 runs after warm-up) and the ratio of the times.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
)

from distill_jax import runtime  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("options", nargs="+", metavar="KEY=VALUE")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    runtime.configure_host()

    import jax

    from distill_jax import sharding, train
    from distill_jax.models.transformer import TransformerConfig

    import benchlib
    from bench_scaling import random_kd_batch

    extra = benchlib.parse_compiler_options(args.options)
    cfg = TransformerConfig(vocab_size=10_000)
    mesh = benchlib.one_device_mesh()
    model, tx, state, state_shardings = benchlib.init_student(cfg, mesh)
    batch = random_kd_batch(cfg.vocab_size, rows=32, src_len=32, tgt_len=32, top_k=8)
    loss_fn = train.student_loss_fn(model, train.StudentLossConfig(alpha=0.5))
    step = train.make_train_step(
        loss_fn, tx, mesh, state_shardings, sharding.batch_shardings(batch, mesh)
    )
    batch = sharding.shard_batch(batch, mesh)
    key = jax.random.PRNGKey(1)
    lowered = step.lower(state, batch, key)
    base = dict(train.donated_state_compiler_options(mesh))
    programs = {
        "default": lowered.compile(compiler_options=base),
        "with " + benchlib.describe_options(extra): lowered.compile(
            compiler_options={**base, **extra}
        ),
    }
    states = {name: jax.tree.map(lambda x: x.copy(), state) for name in programs}

    def runner(name):
        def one():
            states[name], metrics = programs[name](states[name], batch, key)
            return metrics

        return one

    timings = benchlib.time_interleaved(
        {name: (runner(name), benchlib.block) for name in programs},
        warmup=args.warmup,
        runs=args.runs,
    )
    default, variant = (t.median_s for t in timings.values())
    print(f"time with the options / default: {variant / default:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
