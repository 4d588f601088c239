"""Where the teacher's forward pass spends its time on a CPU: our ops and torch's, side by side.

Builds the same batch as ``scripts/bench/bench_teacher.py`` (``[CLS] a [SEP] b [SEP]`` rows of
random WordPiece ids, a few padded), runs ``--warmup`` forward passes, then ``--steps``
under a profiler, and prints the time per forward pass grouped by what the op computes:

  ours    ``jax.profiler.trace`` of the jitted ``load_bert`` apply; the XLA thunks on the
          host thread are named after HLO instructions, which are mapped to the
          ``op_name`` metadata of the compiled module (``layer_3`` -> ``layer_N``), so a
          row is one kind of op summed over the layers
  theirs  ``torch.profiler`` of transformers' ``BertModel`` (``--torch``), its ``self CPU``
          time per aten op

The two profilers measure differently (host-thread thunk spans vs. aten self time) and
both add overhead, so compare rows within a column more than across; ``bench_teacher.py``
is the benchmark. ``--compiler-option KEY=VALUE`` compiles ours with XLA options.

Run: ``python scripts/bench/profile/profile_teacher.py [--length 128] [--torch]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_teacher  # noqa: E402
import benchlib  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=bench_teacher.DEFAULT_CHECKPOINT)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--padded-rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--torch", action="store_true", help="also profile transformers' BertModel")
    parser.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--host-memory", default="keep", choices=("keep", "system"))
    args = parser.parse_args(argv)
    benchlib.configure_host(args)

    import jax

    from distill_jax.hf import load_bert

    model, params, config = load_bert(args.checkpoint)
    batch = bench_teacher.make_batch(args.batch, args.length, config.vocab_size, args.padded_rows)
    inputs = [jax.device_put(batch[k]) for k in ("input_ids", "token_type_ids", "attention_mask")]

    def apply(params, input_ids, token_type_ids, attention_mask):
        return model.apply(
            {"params": params}, input_ids, token_type_ids, attention_mask, deterministic=True
        )

    options = benchlib.parse_compiler_options(args.compiler_option)
    compiled = jax.jit(apply).lower(params, *inputs).compile(compiler_options=options or None)
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, *inputs))
    rows = benchlib.traced_thunks(
        compiled, lambda: compiled(params, *inputs), args.steps, strip="BertModel/"
    )
    shape = f"{args.batch} x {args.length}"
    print(
        f"ours: jitted Flax BERT, {shape}, ms per forward pass (sum over layers), "
        f"{args.steps} traced passes"
        + (f", {benchlib.describe_options(options)}" if options else "")
    )
    print(benchlib.thunk_markdown(rows[: args.top]))
    print(f"all listed thunks: {sum(ms for _, _, ms in rows):.0f} ms per pass")

    if args.torch:
        import torch
        import transformers
        from torch.profiler import ProfilerActivity, profile

        benchlib.set_torch_threads(None)
        torch_model = transformers.BertModel.from_pretrained(
            args.checkpoint, add_pooling_layer=False
        ).eval()
        torch_batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
        with torch.inference_mode():
            for _ in range(args.warmup):
                torch_model(**torch_batch)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    torch_model(**torch_batch)
        averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        print(f"\ntheirs: transformers BertModel, {shape}, ms per forward pass (self CPU time)")
        print(
            benchlib.markdown_table(
                ["ms", "aten op", "calls per pass"],
                [
                    [
                        f"{e.self_cpu_time_total / args.steps / 1e3:.1f}",
                        e.key,
                        e.count // args.steps,
                    ]
                    for e in averages[: args.top]
                ],
            )
        )
        total = sum(e.self_cpu_time_total for e in averages) / args.steps / 1e3
        print(f"all ops: {total:.0f} ms per pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
