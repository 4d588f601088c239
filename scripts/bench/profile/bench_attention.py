"""The attention core, softmax(q k^T) v, in two float32 formulations, timed in one process.

  normalise first   weights = softmax(where(mask, q k^T, -1e9)); weights @ v
                    (the textbook form; ``MultiHeadAttention`` in training calls)
  deferred          ``fast_paths.deferred_softmax_weighted_sum``, what
                    ``MultiHeadAttention`` runs in inference (deterministic) calls:
                    e = exp(s - max(s)); (e @ v) / sum(e), so
                    the division touches the [.., q, head_dim] result instead of the
                    [.., q, kv_len] weights; its gradient is a custom VJP in flash
                    attention's form (row sums of g * out instead of dp * p)

Both take heads-major inputs, queries [batch, heads, q, head_dim] already scaled, keys and
values [batch, heads, kv_len, head_dim] (or keys transposed, [batch, heads, head_dim,
kv_len], as the decoding cache holds them), and a boolean mask [batch, 1, 1 | q, kv_len]
with padding; forward pass only, or forward + gradient (``--grad``). Shapes (``--case``):

  teacher128   32 x 12 heads x 128 x 128, head_dim 32   (MiniLM, bench_teacher.py)
  teacher64    32 x 12 heads x 64 x 64, head_dim 32
  student      32 x 8 heads x 32 x 32, head_dim 64      (bench_student_step.py)
  decode       32 sentences x 8 heads, 5 queries (beams) x 160 cache slots, head_dim 64,
               keys transposed                         (one beam-search step, bench_beam.py)

Each case: both jitted programs, their largest difference, then alternating timed rounds
(``benchlib.time_interleaved``) and the ratio of the medians.

Run: ``python scripts/bench/profile/bench_attention.py [--case teacher128 ...] [--grad] [--runs 9]``.
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

CASES = {  # batch, heads, q_len, kv_len, head_dim, keys transposed
    "teacher128": (32, 12, 128, 128, 32, False),
    "teacher64": (32, 12, 64, 64, 32, False),
    "student": (32, 8, 32, 32, 64, False),
    "decode": (32, 8, 5, 160, 64, True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--grad", action="store_true", help="time forward + gradient")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    runtime.configure_host()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from distill_jax.models import fast_paths

    import benchlib

    def scores(q, k, transposed):
        return jnp.einsum("bhqd,bhdk->bhqk" if transposed else "bhqd,bhkd->bhqk", q, k)

    def normalise_first(q, k, v, mask, transposed):
        logits = jnp.where(mask, scores(q, k, transposed), fast_paths.MASK_VALUE)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v)

    def deferred(q, k, v, mask, transposed):
        logits = jnp.where(mask, scores(q, k, transposed), fast_paths.MASK_VALUE)
        return fast_paths.deferred_softmax_weighted_sum(logits, v)

    machine = benchlib.machine_info(with_torch=False)
    print(f"machine: {benchlib.describe_machine(machine)}")
    benchlib.warn_if_loaded(machine)
    rows = []
    for case in args.case:
        batch, heads, q_len, kv_len, head_dim, transposed = CASES[case]
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(keys[0], (batch, heads, q_len, head_dim)) / np.sqrt(head_dim)
        k = jax.random.normal(
            keys[1], (batch, heads) + ((head_dim, kv_len) if transposed else (kv_len, head_dim))
        )
        v = jax.random.normal(keys[2], (batch, heads, kv_len, head_dim))
        mask = np.ones((batch, 1, 1, kv_len), bool)
        mask[-4:, ..., kv_len // 2 :] = False  # four padded rows
        mask = jnp.asarray(mask)

        programs = {}
        for name, core in (("normalise first", normalise_first), ("deferred", deferred)):

            def fn(q, k, v, core=core, mask=mask, transposed=transposed):
                return core(q, k, v, mask, transposed)

            if args.grad:
                fn = jax.grad(
                    lambda q, k, v, fn=fn: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2)
                )
            programs[name] = jax.jit(fn)
        outs = {name: jax.tree.leaves(p(q, k, v)) for name, p in programs.items()}
        diff = max(float(jnp.abs(a - b).max()) for a, b in zip(*outs.values()))
        print(f"{case}: max |normalise first - deferred| = {diff:.2e}")
        timings = benchlib.time_interleaved(
            {
                name: (lambda p=p, q=q, k=k, v=v: p(q, k, v), benchlib.block)
                for name, p in programs.items()
            },
            warmup=args.warmup,
            runs=args.runs,
        )
        first, later = (timings[n].median_s for n in ("normalise first", "deferred"))
        shape = f"{batch} x {heads} heads x {q_len} x {kv_len}, head_dim {head_dim}" + (
            ", keys transposed" if transposed else ""
        )
        rows.append(
            [
                case,
                shape,
                f"{first * 1e3:.2f}",
                f"{later * 1e3:.2f}",
                f"{first / later:.2f}x",
                f"{diff:.1e}",
            ]
        )
    print()
    print(
        benchlib.markdown_table(
            ["case", "shape", "normalise first ms", "deferred ms", "speed-up", "max diff"], rows
        )
    )
    print(
        f"\n{'forward + gradient' if args.grad else 'forward'}, median of {args.runs} "
        f"alternating runs after {args.warmup} warm-up rounds"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
