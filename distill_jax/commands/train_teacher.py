"""``distill-jax train-teacher``: fine-tune BERT as a conditional masked language model
(C-MLM) over the student vocabulary; validation reports masked-token loss and accuracy, and
the soft targets' quality with stride masking (``teacher_quality``: top-1, top-K, p(ref))
on the first ``teacher.quality_examples`` validation pairs."""

from __future__ import annotations

import argparse
import jax

from distill_jax import runlock, runner, sharding, teacher_quality, train
from distill_jax.commands import common
from distill_jax.data.prepared import open_prepared
from distill_jax.teacher import (abstract_init, build_teacher, checkpointer, teacher_optimizer,
                                 teacher_pipeline)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    common.initialize_processes(args)
    config = common.load_experiment(args)
    workdir = common.workdir(args)
    out = workdir / "teacher"
    runlock.acquire(out, "train-teacher")  # one writer per run directory
    runner.check_or_save_config(config.teacher, out / "config.json", what="train-teacher")
    dataset = open_prepared(runner.prepared_dir(config, workdir))
    dtype = runner.compute_dtype(config)
    mesh = sharding.make_mesh(config.mesh)
    rng = jax.random.PRNGKey(config.train.seed)
    teacher = build_teacher(config, dataset.vocab, dtype, jax.random.fold_in(rng, 1))

    optimizer = teacher_optimizer(config)
    init_params = abstract_init(teacher, jax.random.fold_in(rng, 2))
    state, shardings = sharding.create_sharded_state(
        lambda: train.TrainState.create(init_params(), optimizer), mesh)
    if teacher.pretrained_params is not None:
        state = state.replace(params=sharding.place_tree(teacher.pretrained_params,
                                                         shardings.params))

    keys = ("src", "tgt_out", "mlm_mask", "mlm_positions")
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in keys}
    loss_fn = train.cmlm_loss_fn(teacher.model, teacher.teacher_ids, cls_id=teacher.cls_id,
                                 mask_id=teacher.mask_id)
    train_step = train.make_train_step(loss_fn, optimizer, mesh, shardings, batch_shardings,
                                       accum_steps=config.train.accum_steps, compute_dtype=dtype)
    eval_step = train.make_eval_step(loss_fn, mesh, shardings.params, batch_shardings,
                                     compute_dtype=dtype)

    shards = runner.data_shards(mesh)
    pipeline = teacher_pipeline(config, dataset, config.data.train_split, shards, training=True)
    valid = teacher_pipeline(config, dataset, config.data.valid_split, shards, training=False)
    batches = iter(pipeline)
    to_device = lambda batch: sharding.shard_batch({k: batch[k] for k in keys}, mesh)  # noqa: E731

    manager = checkpointer(out / "checkpoints", config)
    log = runner.MetricsLog(out)
    state = runner.resume(manager, state, shardings, batches, log)

    quality = quality_evaluator(config, dataset, teacher, shardings.params, mesh, shards)

    def evaluate(state, step):
        total = runner.evaluate_split(eval_step, state.params, valid, to_device)
        return {"loss": total["loss"][0] / total["loss"][1],
                "masked_accuracy": total["accuracy"][0] / total["accuracy"][1],
                **quality(state.params)}

    runner.train_loop(
        state=state, train_step=train_step, batches=batches, to_device=to_device,
        total_steps=config.teacher.steps, rng=jax.random.fold_in(rng, 3), checkpoints=manager,
        data_state=batches.get_state, log=log, evaluate=evaluate,
        eval_every=config.teacher.eval_every, save_every=config.teacher.save_every,
        desc="teacher", no_progress=args.no_progress)
    manager.close()
    return 0




def quality_evaluator(config, dataset, teacher, param_shardings, mesh, shards):
    """``quality(params) -> {stride_top1, stride_topk, stride_p_ref}`` on the first
    ``teacher.quality_examples`` validation pairs (``teacher_quality``)."""
    from distill_jax.data.pipeline import BatchPipeline, PipelineConfig

    split = config.data.valid_split
    pipeline = BatchPipeline(
        *dataset.records(split, config.teacher.quality_examples),
        PipelineConfig(seed=config.data.seed, shuffle=False, num_epochs=1,
                       tokens_per_batch=config.teacher.tokens_per_batch, batch_multiple=shards,
                       bucket_step=config.data.bucket_step))
    score = teacher_quality.make_scorer(
        teacher, param_shardings, mesh, stride=config.teacher.stride,
        top_k=config.teacher.top_k, temperature=config.distill.temperature)

    def quality(params):
        total = None
        for number in range(pipeline.batches_per_epoch):
            batch = pipeline.load_batch(number)
            arrays = sharding.shard_batch({"src": batch["src"], "tgt_out": batch["tgt_out"]},
                                          mesh)
            total = teacher_quality.add_sums(total, score(params, arrays["src"],
                                                          arrays["tgt_out"]))
        return teacher_quality.rates(total)

    return quality
