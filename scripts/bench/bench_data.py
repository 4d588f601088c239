#!/usr/bin/env python
"""Input-pipeline benchmark on a prepared dataset (e.g. Multi30k train).

    python scripts/bench/bench_data.py PREPARED_DIR [--split train] [--tokens-per-batch 4096]
        [--bucket-step 8] [--threads 2] [--epochs 1] [--mlm-mask-rate 0.15]

Prints batches/s, real tokens/s (source + target), the padding fraction and the number of
distinct batch shapes of one epoch. With ``--compare-student``, also times the reference
student (6+6, d 512, the dataset's vocabulary) training on real batches of this pipeline
(median of 5 steps after warm-up, one device) and prints how many times faster the
pipeline produces batches than the student consumes them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from distill_jax.data.pipeline import BatchPipeline, PipelineConfig
from distill_jax.data.prepared import open_prepared

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a directory written by `distill-jax prepare`")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--bucket-step", type=int, default=8)
    parser.add_argument("--batch-multiple", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--mlm-mask-rate", type=float, default=None)
    parser.add_argument(
        "--compare-student",
        action="store_true",
        help="also time the reference student's train step on these batches",
    )
    args = parser.parse_args()

    dataset = open_prepared(args.data)
    config = PipelineConfig(
        tokens_per_batch=args.tokens_per_batch,
        bucket_step=args.bucket_step,
        batch_multiple=args.batch_multiple,
        num_threads=args.threads,
        num_epochs=args.epochs,
        mlm_mask_rate=args.mlm_mask_rate,
    )
    pipeline = BatchPipeline(
        dataset.source(args.split),
        dataset.lengths(args.split),
        config,
        process_index=0,
        process_count=1,
    )
    stats = pipeline.statistics()
    start = time.perf_counter()
    batches = tokens = 0
    for batch in pipeline:
        batches += 1
        tokens += int(np.count_nonzero(batch["src"]) + np.count_nonzero(batch["tgt_out"]))
    seconds = time.perf_counter() - start
    print(
        f"{args.split}: {pipeline.counts['kept']} examples, {batches} batches in "
        f"{seconds:.2f} s: {batches / seconds:.1f} batches/s, {tokens / seconds:,.0f} tokens/s"
    )
    print(
        f"padding {stats['padding_fraction']:.2%} of source+target slots, "
        f"{len(stats['shapes'])} distinct shapes (rows, src_len, tgt_len): {stats['shapes']}"
    )
    if args.compare_student:
        steps_per_s = student_steps_per_second(dataset, pipeline)
        print(
            f"reference student: {steps_per_s:.4f} train steps/s on these batches; the "
            f"pipeline is {batches / seconds / steps_per_s:,.0f}x faster than training"
        )


def student_steps_per_second(dataset, pipeline, timed_steps: int = 5) -> float:
    """Train steps per second of the reference student on the pipeline's first batches
    (shapes vary with the bucket, so each timed step uses the same warmed-up batch)."""
    import statistics

    import jax

    from distill_jax import sharding, train
    from distill_jax.models.transformer import TransformerConfig

    mesh = benchlib.one_device_mesh()
    model, tx, state, shardings = benchlib.init_student(
        TransformerConfig(vocab_size=len(dataset.vocab)), mesh
    )
    keys = ("src", "tgt_in", "tgt_out")
    batch = {k: pipeline.load_batch(0)[k] for k in keys}
    step = train.make_train_step(
        train.student_loss_fn(model), tx, mesh, shardings, sharding.batch_shardings(batch, mesh)
    )
    batch = sharding.shard_batch(batch, mesh)
    rng = jax.random.PRNGKey(0)
    times, _ = benchlib.time_train_steps(step, state, batch, rng, timed_steps)
    return 1.0 / statistics.median(times)


if __name__ == "__main__":
    main()
