"""``distill-jax soft-targets``: run the fine-tuned teacher over a split with stride
masking and write its top-K logits and ids into the memory-mapped cache
(``WORKDIR/soft_targets/SPLIT``, see ``soft_target_cache``).

Every process scores its own rows of every batch and writes them into the shared cache
files; the extraction resumes where an interrupted one stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from distill_jax import runner
from distill_jax.commands import common
from distill_jax.data.pipeline import BatchPipeline, PipelineConfig

FLUSH_EVERY = 20  # batches between durable flushes of the cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    parser.add_argument("--split", default=None, help="split to score (default: data.train_split)")
    parser.add_argument("--force", action="store_true",
                        help="recompute even if a finished cache for this teacher and data exists")


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    pieces = {}
    for shard in array.addressable_shards:
        pieces.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)


def run(args: argparse.Namespace) -> int:
    from jax.experimental import multihost_utils

    from distill_jax import sharding, student
    from distill_jax import teacher as teacher_lib
    from distill_jax.data.prepared import open_prepared
    from distill_jax.soft_target_cache import CacheError, create_or_resume, open_cache

    common.initialize_processes(args)
    config = common.load_experiment(args)
    workdir = Path(args.workdir)
    split = args.split or config.data.train_split
    dataset = open_prepared(runner.prepared_dir(config, workdir))
    dtype = runner.compute_dtype(config)
    identity = student.cache_identity(config, dataset, split, config.teacher.top_k)
    records, lengths = dataset.records(split, config.data.example_limit(split))  # lengths [n, 2]
    cache_path = str(workdir / "soft_targets" / split)
    if not args.force and (Path(cache_path) / "header.json").is_file():
        # A finished cache made from this teacher and data is reused, not recomputed.
        try:
            cache = open_cache(cache_path, identity, num_examples=len(lengths))
        except CacheError as error:
            if runner.is_chief():
                print(f"recomputing the soft targets: {error}", flush=True)
        else:
            if runner.is_chief():
                print(f"soft targets of {len(cache)} {split} examples (K={cache.top_k}) are "
                      f"already in {cache_path}; nothing to do (--force recomputes them)",
                      flush=True)
            return 0

    mesh = sharding.make_mesh(config.mesh)
    teacher, params, param_shardings = teacher_lib.load_finetuned(
        config, workdir, dataset.vocab, mesh, dtype)
    # Process 0 creates (or checks) the files; the others open them once they exist.
    if jax.process_index() == 0:
        writer = create_or_resume(cache_path, identity, lengths[:, 1])
    multihost_utils.sync_global_devices("soft-target cache created")
    if jax.process_index() != 0:
        writer = create_or_resume(cache_path, identity, lengths[:, 1],
                                  process_index=jax.process_index())

    pipeline = BatchPipeline(records, lengths, PipelineConfig(
        seed=config.data.seed, shuffle=False, num_epochs=1,
        tokens_per_batch=config.teacher.tokens_per_batch,
        batch_multiple=runner.data_shards(mesh), bucket_step=config.data.bucket_step))
    rows = sharding.batch_sharding(mesh)
    extract = jax.jit(
        lambda p, src, tgt_out: teacher_lib.stride_topk(
            teacher, p, src, tgt_out, stride=config.teacher.stride, top_k=config.teacher.top_k),
        in_shardings=(param_shardings, rows, rows), out_shardings=(rows, rows))

    bar = runner.progress(pipeline.batches_per_epoch, 0, f"soft targets ({split})",
                          args.no_progress)
    for number in range(pipeline.batches_per_epoch):
        batch = pipeline.load_batch(number)
        index = batch["index"]
        if writer.pending(i for i in index if i >= 0) or jax.process_count() > 1:
            # Every process must join the jitted call; single-process runs skip finished batches.
            arrays = sharding.shard_batch({"src": batch["src"], "tgt_out": batch["tgt_out"]}, mesh)
            logits, ids = extract(params, arrays["src"], arrays["tgt_out"])
            logits, ids = local_rows(logits), local_rows(ids)  # [rows, T, K]
            for row, record in enumerate(index):
                if record >= 0 and not writer.done[record]:
                    length = int(lengths[record, 1])
                    writer.write(int(record), logits[row, :length], ids[row, :length])
        if (number + 1) % FLUSH_EVERY == 0:
            writer.flush()
        bar.update(1)
    bar.close()
    writer.flush()
    multihost_utils.sync_global_devices("soft targets written")
    if runner.is_chief():
        path = writer.finalize(num_processes=jax.process_count())
        print(f"soft targets of {writer.num_examples} {split} examples (K={identity.top_k}) "
              f"-> {path}", flush=True)
    multihost_utils.sync_global_devices("soft-target cache finalized")
    return 0
