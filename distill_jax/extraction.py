"""Soft-target extraction (docs/method.md §2): run the fine-tuned teacher over a split with
stride masking and write its top-K logits and ids into the soft-target cache
(``WORKDIR/soft_targets/SPLIT``, local or ``gs://``, see ``soft_target_cache``).

The cache is filled chunk by chunk. Every process takes part in every batch (each scores
its own rows of the global batch); the rows of a chunk are gathered on every process and
the chunk's owner (chunks are dealt round-robin over the processes) writes it, so each
stored object has one writer. Each chunk's batches are planned from that chunk's examples
alone, so a chunk's values do not depend on which chunks were computed before it: an
interrupted extraction resumes with the chunks that are not stored yet and ends with the
cache an uninterrupted one writes. ``header.json`` is written last, by process 0.

The targets come from the best checkpoint of a *finished* teacher run (an unfinished one
is refused), or from the checkpoint ``teacher_step`` names; its step and digest are
part of the cache's identity, so a finished cache made from another checkpoint is remade,
not reused (``teacher.select_finetuned``, docs/interfaces.md).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import numpy as np

from distill_jax import runner, storage
from distill_jax.data.pipeline import BatchPipeline, PipelineConfig
from distill_jax.errors import UserError
from distill_jax.experiment import ExperimentConfig
from distill_jax.soft_target_cache import DEFAULT_CHUNK_ROWS, CacheError

logger = logging.getLogger(__name__)

WRITES_IN_FLIGHT = 8  # chunk writes a process leaves running before waiting for them


class _Subset:
    """Records ``ids`` of a random-access source, as a source of their own."""

    def __init__(self, source, ids: np.ndarray):
        self.source, self.ids = source, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.source[int(self.ids[int(index)])]

    def __getitems__(self, indices):
        return self.source.__getitems__([int(self.ids[int(i)]) for i in indices])


def global_rows(array: jax.Array) -> np.ndarray:
    """Every row of a batch-sharded global array, on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


@dataclasses.dataclass(frozen=True)
class SoftTargets:
    """What :func:`extract` produced: the finished cache of a split."""

    path: str  # WORKDIR/soft_targets/SPLIT (local or gs://)
    split: str
    num_examples: int  # examples (pairs) in the cache
    top_k: int  # entries kept per target position
    teacher_step: int  # the teacher checkpoint they come from
    teacher_digest: str  # its digest (checkpoint.Checkpointer.fingerprint)
    reused: bool  # True: a finished cache of this teacher and data was already there


def extract(
    config: ExperimentConfig,
    workdir: storage.PathLike,
    split: str,
    *,
    force: bool = False,
    teacher_step: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    no_progress: bool = False,
) -> SoftTargets:
    """Fills ``WORKDIR/soft_targets/SPLIT`` with the fine-tuned teacher's stride-masked
    top-K soft targets (module docstring); ``force`` removes an existing cache first. Call
    it with the run directory's lock held (``runlock``)."""
    from jax.experimental import multihost_utils

    from distill_jax import sharding, student
    from distill_jax import teacher as teacher_lib
    from distill_jax.data.prepared import open_prepared
    from distill_jax.soft_target_cache import create_or_resume, is_finished, open_cache, remove

    workdir = storage.path(workdir)
    if chunk_rows < 1:
        raise UserError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    dataset = open_prepared(runner.prepared_dir(config, workdir))
    dtype = runner.compute_dtype(config)
    # The teacher checkpoint the targets come from (an unfinished run is refused unless
    # --teacher-step names one); its step and digest are part of the cache's identity.
    selected = teacher_lib.select_finetuned(config, workdir, teacher_step)
    last_saved = selected.saved_steps[-1]
    if selected.explicit and last_saved < config.teacher.steps and runner.is_chief():
        logger.warning(
            "soft targets from the teacher checkpoint of step %d (--teacher-step) of an "
            "unfinished run: its last checkpoint is step %d of teacher.steps=%d",
            selected.step,
            last_saved,
            config.teacher.steps,
        )
    identity = dataclasses.replace(
        student.cache_identity(config, dataset, split, config.teacher.top_k),
        teacher_step=selected.step,
        teacher_digest=selected.digest,
    )
    records, lengths = dataset.records(split, config.data.example_limit(split))  # lengths [n, 2]
    cache_path = workdir / "soft_targets" / split
    done = functools.partial(
        SoftTargets,
        str(cache_path),
        split,
        len(lengths),
        identity.top_k,
        selected.step,
        selected.digest,
    )
    if not force and is_finished(cache_path):
        # A finished cache made from this teacher and data is reused, not recomputed.
        try:
            cache = open_cache(cache_path, identity, num_examples=len(lengths))
        except CacheError as error:
            if runner.is_chief():
                print(f"recomputing the soft targets: {error}", flush=True)
        else:
            if runner.is_chief():
                print(
                    f"soft targets of {len(cache)} {split} examples (K={cache.top_k}) are "
                    f"already in {cache_path}; nothing to do (--force recomputes them)",
                    flush=True,
                )
                print(quality_summary(config, workdir, selected.step), flush=True)
            return done(reused=True)

    mesh = sharding.make_mesh(config.mesh)
    teacher, params, param_shardings = teacher_lib.load_finetuned(
        config, workdir, dataset.vocab, mesh, dtype, selected
    )
    # Process 0 creates (or checks) the cache; the others open it once it exists.
    try:
        if jax.process_index() == 0:
            if force and cache_path.exists():
                remove(cache_path)  # finished or not: --force starts again
            writer = create_or_resume(cache_path, identity, lengths[:, 1], chunk_rows=chunk_rows)
        multihost_utils.sync_global_devices("soft-target cache created")
        if jax.process_index() != 0:
            writer = create_or_resume(
                cache_path, identity, lengths[:, 1], chunk_rows=chunk_rows, create=False
            )
    except CacheError as err:
        raise UserError(str(err)) from None
    # Every process works through the same list of pending chunks (process 0's listing).
    stored = np.zeros(writer.num_chunks, np.int32)
    if jax.process_index() == 0:
        stored[list(writer.stored_chunks())] = 1
    stored = np.asarray(multihost_utils.broadcast_one_to_all(stored))
    pending = [int(c) for c in np.flatnonzero(stored == 0)]

    rows = sharding.batch_sharding(mesh)
    extract = jax.jit(
        lambda p, src, tgt_out: teacher_lib.stride_topk(
            teacher, p, src, tgt_out, stride=config.teacher.stride, top_k=config.teacher.top_k
        ),
        in_shardings=(param_shardings, rows, rows),
        out_shardings=(rows, rows),
    )
    pipeline_config = PipelineConfig(
        seed=config.data.seed,
        shuffle=False,
        num_epochs=1,
        tokens_per_batch=config.teacher.tokens_per_batch,
        batch_multiple=runner.data_shards(mesh),
        bucket_step=config.data.bucket_step,
    )

    bar = runner.progress(
        writer.num_chunks,
        writer.num_chunks - len(pending),
        f"soft targets ({split}, chunks)",
        no_progress,
    )
    for turn, chunk in enumerate(pending):
        runner.crash_point(f"chunk-start:{turn}", settle=writer.flush)  # (crash tests only)
        examples = np.asarray(writer.examples_of(chunk), np.int64)  # [examples of the chunk]
        pipeline = BatchPipeline(_Subset(records, examples), lengths[examples], pipeline_config)
        owner = turn % jax.process_count()
        results = {}
        for number in range(pipeline.batches_per_epoch):
            batch = pipeline.load_batch(number)
            arrays = sharding.shard_batch({"src": batch["src"], "tgt_out": batch["tgt_out"]}, mesh)
            logits, ids = extract(params, arrays["src"], arrays["tgt_out"])
            logits, ids = global_rows(logits), global_rows(ids)  # [global rows, T, K]
            if owner != jax.process_index():
                continue
            for row, local in enumerate(pipeline.plan(0).batches[number]):  # global rows
                if local >= 0:
                    example = int(examples[local])
                    length = int(lengths[example, 1])
                    results[example] = (logits[row, :length], ids[row, :length])
        if owner == jax.process_index():
            writer.write_chunk(chunk, results)
            runner.crash_point(f"chunk:{turn}")  # (crash tests only)
            if writer.writes_in_flight() >= WRITES_IN_FLIGHT:
                writer.flush()
        bar.update(1)
    bar.close()
    writer.flush()
    multihost_utils.sync_global_devices("soft targets written")
    if runner.is_chief():
        try:
            path = writer.finalize()
        except CacheError as err:
            raise UserError(str(err)) from None
        print(
            f"soft targets of {writer.num_examples} {split} examples (K={identity.top_k}) "
            f"from the teacher checkpoint {selected.describe()} -> {path}",
            flush=True,
        )
        print(quality_summary(config, workdir, selected.step), flush=True)
    multihost_utils.sync_global_devices("soft-target cache finalized")
    return done(reused=False)


def quality_summary(config: ExperimentConfig, workdir, step: int) -> str:
    """The teacher checkpoint's soft-target quality on validation, from its run's log."""
    from distill_jax import teacher_quality

    return teacher_quality.checkpoint_summary(
        storage.path(workdir) / "teacher", step, config.teacher.top_k, config.distill.temperature
    )
