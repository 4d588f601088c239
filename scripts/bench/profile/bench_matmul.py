"""The GEMMs of the three PyTorch comparisons, alone: XLA's CPU dot vs torch's, per shape.

Each row is one ``[rows, in] @ [in, out]`` float32 product that the compared programs run
(teacher forward at 32 x 128 = 4,096 rows, the student step at 32 x 32 = 1,024 rows, a
beam-search step at 32 sentences x 5 beams = 160 rows, and the 2048^3 product of the
matmul peak), timed in one process with the sides alternating (``benchlib.time_interleaved``):

  xla     ``jax.jit(lambda a, b: a @ b)`` compiled with the default options (XLA's CPU
          backend hands the dot to YNNPACK)
  xla+OPT the same program compiled with ``--compiler-option KEY=VALUE`` options, one
          extra side per ``--variant NAME:KEY=VALUE[,KEY=VALUE]`` (e.g.
          ``eigen:xla_cpu_experimental_ynn_fusion_type=`` for XLA's own dot emitter,
          ``onednn:xla_cpu_experimental_ynn_fusion_type=,xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT``)
  torch   ``a @ b`` on CPU tensors (MKL's or oneDNN's sgemm, as the torch build chose),
          ``torch.set_num_threads(os.cpu_count())``

Prints GFLOP/s (``2 * rows * in * out`` / median time) per side and the ratio torch / xla.
The products are the bulk of every compared program (85-90% of their FLOPs and, in the
profiles, of their time), so this table bounds what model code can reach against torch on
a machine: where torch's GEMM is faster for the same shapes, a program made only of them
is slower by about as much.

Run: ``python scripts/bench/profile/bench_matmul.py [--runs 15] [--variant ...] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # noqa: E402

# (program, what, rows, in, out)
SHAPES = (
    ("teacher 32x128", "q/k/v", 4096, 384, 1152),
    ("teacher 32x128", "attention out", 4096, 384, 384),
    ("teacher 32x128", "ff in", 4096, 384, 1536),
    ("teacher 32x128", "ff out", 4096, 1536, 384),
    ("student step 32x32", "q/k/v", 1024, 512, 1536),
    ("student step 32x32", "attention out", 1024, 512, 512),
    ("student step 32x32", "ff in", 1024, 512, 2048),
    ("student step 32x32", "ff out", 1024, 2048, 512),
    ("student step 32x32", "logits", 1024, 512, 10000),
    ("beam step 32x5", "q/k/v", 160, 512, 1536),
    ("beam step 32x5", "attention out", 160, 512, 512),
    ("beam step 32x5", "ff in", 160, 512, 2048),
    ("beam step 32x5", "ff out", 160, 2048, 512),
    ("beam step 32x5", "logits", 160, 512, 10000),
    ("peak", "2048^3", 2048, 2048, 2048),
)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, options = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, benchlib.parse_compiler_options(options.split(","))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--host-memory", default="keep", choices=("keep", "system"))
    args = parser.parse_args(argv)
    benchlib.configure_host(args)
    threads = benchlib.set_torch_threads(None)

    import jax
    import torch

    variants = dict(parse_variant(v) for v in args.variant)
    machine = benchlib.machine_info()
    print(f"machine: {benchlib.describe_machine(machine)}; torch threads {threads}")
    rng = np.random.default_rng(0)
    rows, records = [], []
    for program, what, m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ja, jb = jax.device_put(a), jax.device_put(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        lowered = jax.jit(lambda x, y: x @ y).lower(ja, jb)
        default = lowered.compile()
        sides = {"xla": (lambda c=default, a=ja, b=jb: c(a, b), benchlib.block)}
        for name, options in variants.items():
            compiled = lowered.compile(compiler_options=options)
            sides[f"xla+{name}"] = (lambda c=compiled, a=ja, b=jb: c(a, b), benchlib.block)
        sides["torch"] = (lambda a=ta, b=tb: a @ b, lambda x: x)
        timings = benchlib.time_interleaved(sides, warmup=args.warmup, runs=args.runs, label=False)
        flops = 2 * m * k * n
        rate = {side: flops / t.median_s / 1e9 for side, t in timings.items()}
        rows.append(
            [program, what, f"{m} x {k} x {n}"]
            + [f"{rate[side]:.0f}" for side in sides]
            + [f"{rate['torch'] / rate['xla']:.2f}"]
        )
        records.append(
            {
                "benchmark": "matmul",
                "program": program,
                "what": what,
                "shape": [m, k, n],
                "gflop_per_s": rate,
                "runs": args.runs,
                "median_s": {side: t.median_s for side, t in timings.items()},
                "variants": variants,
                "machine": machine,
            }
        )
        print(" | ".join(rows[-1]), flush=True)
    print()
    print(
        benchlib.markdown_table(
            ["program", "product", "rows x in x out"]
            + [f"{side} GFLOP/s" for side in sides]
            + ["torch / xla"],
            rows,
        )
    )
    benchlib.write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
