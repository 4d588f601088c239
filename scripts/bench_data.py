#!/usr/bin/env python
"""Input-pipeline benchmark on a prepared dataset (e.g. Multi30k train).

    python scripts/bench_data.py PREPARED_DIR [--split train] [--tokens-per-batch 4096]
        [--bucket-step 8] [--threads 2] [--epochs 1] [--mlm-mask-rate 0.15]

Prints batches/s, real tokens/s (source + target), the padding fraction and the number of
distinct batch shapes of one epoch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from distill_jax.data.pipeline import BatchPipeline, PipelineConfig
from distill_jax.data.prepared import open_prepared


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
    args = parser.parse_args()

    dataset = open_prepared(args.data)
    config = PipelineConfig(tokens_per_batch=args.tokens_per_batch, bucket_step=args.bucket_step,
                            batch_multiple=args.batch_multiple, num_threads=args.threads,
                            num_epochs=args.epochs, mlm_mask_rate=args.mlm_mask_rate)
    pipeline = BatchPipeline(dataset.source(args.split), dataset.lengths(args.split), config,
                             process_index=0, process_count=1)
    stats = pipeline.statistics()
    start = time.perf_counter()
    batches = tokens = 0
    for batch in pipeline:
        batches += 1
        tokens += int(np.count_nonzero(batch["src"]) + np.count_nonzero(batch["tgt_out"]))
    seconds = time.perf_counter() - start
    print(f"{args.split}: {pipeline.counts['kept']} examples, {batches} batches in "
          f"{seconds:.2f} s: {batches / seconds:.1f} batches/s, {tokens / seconds:,.0f} tokens/s")
    print(f"padding {stats['padding_fraction']:.2%} of source+target slots, "
          f"{len(stats['shapes'])} distinct shapes (rows, src_len, tgt_len): {stats['shapes']}")


if __name__ == "__main__":
    main()
