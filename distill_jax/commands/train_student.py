"""``distill-jax train-student``: the Transformer student with ``--set distill.kd=none``
(baseline), ``offline`` (soft-target cache) or ``online`` (teacher inside the step).

Validation reports loss / accuracy, BLEU and ROUGE on the validation split; the best
checkpoint by ``train.select_metric`` (BLEU unless configured) is kept. At the end the best
(or averaged) parameters translate the validation and test splits into
``WORKDIR/students/NAME/SPLIT.hyp.txt`` and their scores go to ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax

from distill_jax import runlock, runner, sharding, storage, train
from distill_jax import teacher as teacher_lib
from distill_jax.commands import common
from distill_jax.data.prepared import open_prepared
from distill_jax.errors import UserError
from distill_jax.experiment import SELECT_METRICS
from distill_jax.student import (SoftTargetBatches, abstract_init, build_model, checkpointer,
                                 default_name, final_parameters, make_optimizer,
                                 open_soft_targets, score_split, student_pipeline)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    parser.add_argument("--name", default=None,
                        help="run name under WORKDIR/students (default: baseline / distilled / "
                             "distilled-online from distill.kd)")
    parser.add_argument("--teacher-step", type=int, default=None, metavar="N",
                        help="distil from the teacher checkpoint of step N (it must be saved) "
                             "instead of the best one of the finished teacher run; with "
                             "distill.kd=offline the soft-target cache must come from it")


def run(args: argparse.Namespace) -> int:
    common.initialize_processes(args)
    config = common.load_experiment(args)
    workdir = common.workdir(args)
    name = args.name or default_name(config)
    out = workdir / "students" / name
    runlock.acquire(out, f"train-student --name {name}")  # one writer per run directory
    runner.check_or_save_config(config, out / "config.json", what="train-student")
    dataset = open_prepared(runner.prepared_dir(config, workdir))
    vocab = dataset.vocab
    dtype = runner.compute_dtype(config)
    mesh = sharding.make_mesh(config.mesh)
    rng = jax.random.PRNGKey(config.train.seed)
    model = build_model(config, vocab, dtype)
    optimizer = make_optimizer(config)
    init_params = abstract_init(model, jax.random.fold_in(rng, 1))
    state, shardings = sharding.create_sharded_state(
        lambda: train.TrainState.create(init_params(), optimizer), mesh)

    kd = config.distill.kd
    keys = ["src", "tgt_in", "tgt_out"]
    teacher_fn, cache, frozen, frozen_shardings = None, None, None, None
    provenance = {}  # the teacher checkpoint distilled from (results.json)
    if args.teacher_step is not None and kd == "none":
        raise UserError("--teacher-step applies to distill.kd=offline or online, not to a "
                        "baseline (distill.kd=none)")
    if kd == "offline":
        cache = open_soft_targets(config, workdir, dataset, config.data.train_split,
                                  args.teacher_step)
        provenance = {"checkpoint_step": cache.header.get("teacher_step"),
                      "checkpoint_digest": cache.header.get("teacher_digest")}
        keys += ["kd_logits", "kd_indices"]
    elif kd == "online":
        selected = teacher_lib.select_finetuned(config, workdir, args.teacher_step)
        teacher, frozen, frozen_shardings = teacher_lib.load_finetuned(
            config, workdir, vocab, mesh, dtype, selected)
        provenance = {"checkpoint_step": selected.step, "checkpoint_digest": selected.digest}

        def online_teacher(batch, teacher_params):
            return teacher_lib.stride_topk(teacher, teacher_params, batch["src"], batch["tgt_out"],
                                           stride=config.teacher.stride,
                                           top_k=config.distill.top_k)
        teacher_fn = online_teacher

    settings = train.StudentLossConfig(
        alpha=config.distill.alpha if kd != "none" else 0.0,
        label_smoothing=config.train.label_smoothing, kd_mode=config.distill.kd_mode,
        temperature=config.distill.temperature)
    loss_fn = train.student_loss_fn(model, settings, teacher_fn)
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in keys}
    train_step = train.make_train_step(
        loss_fn, optimizer, mesh, shardings, batch_shardings,
        accum_steps=config.train.accum_steps, compute_dtype=dtype,
        frozen_shardings=frozen_shardings)
    eval_keys = ["src", "tgt_in", "tgt_out"]
    eval_loss = train.student_loss_fn(model, dataclasses.replace(settings, alpha=0.0))
    eval_step = train.make_eval_step(eval_loss, mesh, shardings.params,
                                     {k: sharding.batch_sharding(mesh) for k in eval_keys},
                                     compute_dtype=dtype)

    shards = runner.data_shards(mesh)
    pipeline = student_pipeline(config, dataset, config.data.train_split, shards, training=True)
    valid = student_pipeline(config, dataset, config.data.valid_split, shards, training=False)
    batches = iter(pipeline)
    if cache is not None:  # soft targets read ahead of the step that needs them
        batches = SoftTargetBatches(batches, cache, config.distill.top_k)

    def to_device(batch):
        return sharding.shard_batch({k: batch[k] for k in keys}, mesh)

    manager = checkpointer(out / "checkpoints", config)
    log = runner.MetricsLog(out)
    state = runner.resume(manager, state, shardings, batches, log)
    if int(jax.device_get(state.step)) >= config.train.steps and (out / "results.json").exists():
        if runner.is_chief():  # a finished run: nothing to redo (delete results.json to rescore)
            print(f"[{name}] already finished: {out / 'results.json'}", flush=True)
        manager.close()
        return 0

    def evaluate(state, step):
        total = runner.evaluate_split(
            eval_step, state.params, valid,
            lambda batch: sharding.shard_batch({k: batch[k] for k in eval_keys}, mesh))
        scores, _ = score_split(model, state.params, vocab, dataset, config.data.valid_split,
                                config.decode, mesh, limit=config.train.bleu_sentences)
        return {"loss": total["loss"][0] / total["loss"][1],
                "nll": total["nll"][0] / total["nll"][1],
                "accuracy": total["accuracy"][0] / total["accuracy"][1],
                **{metric: scores[metric] for metric in SELECT_METRICS}}

    step_fn = train_step if frozen is None else (
        lambda state, batch, rng: train_step(state, batch, rng, frozen))
    state = runner.train_loop(
        state=state, train_step=step_fn, batches=batches, to_device=to_device,
        total_steps=config.train.steps, rng=jax.random.fold_in(rng, 2), checkpoints=manager,
        data_state=batches.get_state, log=log, evaluate=evaluate,
        eval_every=config.train.eval_every, save_every=config.train.save_every,
        desc=f"student {name}", no_progress=args.no_progress)
    if int(jax.device_get(state.step)) < config.train.steps:  # preempted; rerun resumes
        manager.close()
        return 0

    final_params, which = final_parameters(config, manager, state, shardings)
    results = {"name": name, "experiment": config.name, "kd": kd, "steps": config.train.steps,
               "seed": config.train.seed, "checkpoint": which,
               "teacher": None if kd == "none" else {
                   "checkpoint": config.teacher.checkpoint, "init": config.teacher.init,
                   "steps": config.teacher.steps, "top_k": config.distill.top_k,
                   "alpha": config.distill.alpha, **provenance},
               "splits": {}}
    for split in (config.data.valid_split, *config.data.test_splits):
        scores, hypotheses = score_split(model, final_params, vocab, dataset, split,
                                         config.decode, mesh, progress=not args.no_progress)
        results["splits"][split] = scores
        if runner.is_chief():
            storage.write_text_atomic(out / f"{split}.hyp.txt",
                                      "".join(h + "\n" for h in hypotheses))
            print(f"[{name}] {split}: BLEU {scores['bleu']:.2f}, ROUGE-1/2/L "
                  f"{scores['rouge1']:.2f}/{scores['rouge2']:.2f}/{scores['rougeL']:.2f} "
                  f"({which})", flush=True)
    if runner.is_chief():  # written last: a run with results.json is finished
        storage.write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    return 0


