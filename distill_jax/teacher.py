"""The C-MLM teacher: building it from a BERT checkpoint, its batches, optimizer and
checkpoints for fine-tuning (``distill-jax train-teacher``), and computing its top-K soft targets with stride
masking (used by ``soft-targets`` and by online distillation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data.cmlm import build_cmlm_inputs
from distill_jax.data.pipeline import BatchPipeline, PipelineConfig
from distill_jax.data.prepared import PreparedDataset
from distill_jax.data.vocab import TeacherTokenizer, Vocabulary
from distill_jax.errors import UserError
from distill_jax.experiment import ExperimentConfig
from distill_jax.models.bert import BertConfig, BertModel, init_cmlm_head
from distill_jax.trainer import CheckpointPolicy, abstract_init, checkpointer


@dataclasses.dataclass
class Teacher:
    """A C-MLM teacher over a student vocabulary."""

    model: BertModel
    config: BertConfig
    teacher_ids: np.ndarray  # [student vocab] student id -> BERT id
    cls_id: int  # BERT's [CLS]
    mask_id: int  # BERT's [MASK]
    pretrained_params: dict | None  # loaded BERT + initialised head, None for random init


def check_tokenizer(config: ExperimentConfig, vocab: Vocabulary) -> None:
    """Refuses a teacher checkpoint whose WordPiece vocabulary is not the one the dataset
    was prepared with (the student ids map to that vocabulary's ids)."""
    tokenizer = TeacherTokenizer.load(config.teacher.checkpoint)
    if tokenizer.vocab_sha256 != vocab.teacher_vocab_sha256:
        raise UserError(
            f"teacher.checkpoint {config.teacher.checkpoint!r} has another WordPiece vocabulary "
            f"(sha256 {tokenizer.vocab_sha256[:16]}) than the one the dataset was prepared with "
            f"({vocab.teacher!r}, sha256 {vocab.teacher_vocab_sha256[:16]})"
        )


def build_teacher(
    config: ExperimentConfig, vocab: Vocabulary, dtype: Any, rng: jax.Array
) -> Teacher:
    """Loads BERT (or only its config, for ``teacher.init = "random"``) with a C-MLM head
    over the student vocabulary whose rows start from BERT's embeddings of the same pieces."""
    from distill_jax.hf import load_bert

    check_tokenizer(config, vocab)
    _, params, bert_config = load_bert(
        config.teacher.checkpoint, cmlm_vocab_size=len(vocab), dtype=dtype
    )
    bert_config = dataclasses.replace(
        bert_config,
        hidden_dropout_prob=config.teacher.dropout,
        attention_probs_dropout_prob=config.teacher.dropout,
    )
    if config.teacher.init == "pretrained":
        params = init_cmlm_head(bert_config, params, vocab.teacher_ids, rng)
    else:
        params = None  # same architecture, random weights (the "does pretraining matter" ablation)
    special = vocab.teacher_special_ids
    return Teacher(
        BertModel(bert_config),
        bert_config,
        np.asarray(vocab.teacher_ids, np.int32),
        int(special["cls"]),
        int(special["mask"]),
        params,
    )


def target_hidden(
    module: BertModel, inputs: dict, src_len: int, deterministic: bool = True
) -> jax.Array:
    """Final hidden states of the target part of ``build_cmlm_inputs`` -> [batch, T, hidden]."""
    hidden = module(
        inputs["input_ids"],
        inputs["token_type_ids"],
        inputs["attention_mask"],
        inputs["position_ids"],
        deterministic=deterministic,
    )  # [b, 1+S+T, hidden]
    return hidden[:, 1 + src_len :]


def target_logits(
    module: BertModel, inputs: dict, src_len: int, deterministic: bool = True
) -> jax.Array:
    """C-MLM logits of the target part of ``build_cmlm_inputs`` -> [batch, T, student vocab]."""
    return module.cmlm_head(target_hidden(module, inputs, src_len, deterministic))


def stride_topk(
    teacher: Teacher, params: Any, src: jax.Array, tgt_out: jax.Array, *, stride: int, top_k: int
) -> tuple[jax.Array, jax.Array]:
    """The teacher's top-K soft targets for every target position (docs/method.md §2).

    Copy ``i`` of the batch masks target positions ``i, i+S, i+2S, ...``; position ``t``
    takes its prediction from copy ``t % S``, where it (and only the other positions of
    that copy) is masked. Each copy runs the output layer and top-K only on its own masked
    positions (a strided slice), so the vocabulary projection costs one pass over the target
    in all instead of ``S``. Jittable.

    Returns (raw logits [batch, T, K] sorted decreasing, student ids [batch, T, K]); padding
    positions hold zeros.
    """
    batch, tgt_len = tgt_out.shape
    copies = min(stride, tgt_len)
    groups = -(-tgt_len // stride)  # positions per copy, rounded up
    positions = jnp.arange(tgt_len)  # [T]
    teacher_ids = jnp.asarray(teacher.teacher_ids)
    head = lambda module, hidden: module.cmlm_head(hidden)  # noqa: E731
    per_copy_logits, per_copy_ids = [], []
    for copy in range(copies):
        masked = (positions % stride == copy)[None, :] & (tgt_out != 0)  # [b, T]
        inputs = build_cmlm_inputs(
            src, tgt_out, teacher_ids, masked, cls_id=teacher.cls_id, mask_id=teacher.mask_id
        )
        hidden = teacher.model.apply(
            {"params": params}, inputs, src.shape[1], method=target_hidden
        )  # [b, T, H]
        hidden = jnp.pad(hidden, ((0, 0), (0, groups * stride - tgt_len), (0, 0)))
        mine = hidden.reshape(batch, groups, stride, -1)[:, :, copy]  # [b, groups, H]
        logits = teacher.model.apply({"params": params}, mine, method=head)  # [b, groups, V]
        values, ids = jax.lax.top_k(logits.astype(jnp.float32), top_k)  # [b, groups, K]
        per_copy_logits.append(values)
        per_copy_ids.append(ids.astype(jnp.int32))
    # Interleave: [b, groups, copies, K] -> position groups * copy-index order -> [b, T, K].
    # (When T < S there is one group and ``copies == T``.)
    values = jnp.stack(per_copy_logits, axis=2).reshape(batch, groups * copies, top_k)
    ids = jnp.stack(per_copy_ids, axis=2).reshape(batch, groups * copies, top_k)
    real = (tgt_out != 0)[:, :, None]  # [b, T, 1]
    return (jnp.where(real, values[:, :tgt_len], 0.0), jnp.where(real, ids[:, :tgt_len], 0))


# ----------------------------------------------------------------------------- training


def teacher_pipeline(
    config: ExperimentConfig, dataset: PreparedDataset, split: str, shards: int, *, training: bool
) -> BatchPipeline:
    """Student batches with C-MLM masks (random, rate ``teacher.mask_rate``)."""
    pipeline_config = PipelineConfig(
        seed=config.data.seed,
        shuffle=training,
        num_epochs=None if training else 1,
        tokens_per_batch=config.teacher.tokens_per_batch,
        batch_multiple=shards,
        bucket_step=config.data.bucket_step,
        max_src_len=config.data.max_src_len if training else None,
        max_tgt_len=config.data.max_tgt_len if training else None,
        mlm_mask_rate=config.teacher.mask_rate,
    )
    return BatchPipeline(*dataset.records(split, config.data.example_limit(split)), pipeline_config)


def _optimizer_config(config: ExperimentConfig):
    from distill_jax import optim

    return optim.OptimizerConfig.teacher(
        config.teacher.steps,
        learning_rate=config.teacher.learning_rate,
        warmup_fraction=config.teacher.warmup_fraction,
        weight_decay=config.teacher.weight_decay,
        grad_clip_norm=config.teacher.grad_clip_norm,
    )


def teacher_optimizer(config: ExperimentConfig):
    """AdamW with warm-up and linear decay (docs/method.md §1)."""
    from distill_jax import optim

    return optim.make_optimizer(_optimizer_config(config))


def teacher_schedule(config: ExperimentConfig):
    """The teacher optimizer's learning rate of each update (counted from 0)."""
    from distill_jax import optim

    return optim.make_schedule(_optimizer_config(config))


def checkpoint_policy(config: ExperimentConfig) -> CheckpointPolicy:
    """The teacher's checkpoints: the last two plus the best by validation stride top-1,
    the accuracy of what the soft targets will hold (``teacher_quality``; every teacher
    validation measures it). The masked-token loss can disagree with it late in a long run
    (the lowest loss is not the best stride top-1), and would then keep and pick another
    checkpoint than the one whose soft targets are most accurate.
    A tie goes to the later step (``Checkpointer.best_step``)."""
    return CheckpointPolicy(
        save_every=config.teacher.save_every,
        keep_last=2,
        best_metric="stride_top1",
        best_mode="max",
    )


TRAIN_KEYS = ("src", "tgt_out", "mlm_mask", "mlm_positions")  # what the C-MLM step reads


def training_task(config: ExperimentConfig, dataset: PreparedDataset, mesh, dtype: Any):
    """C-MLM fine-tuning (docs/method.md §1) as a ``trainer.Task``: the teacher from
    ``teacher.checkpoint``, AdamW, masked batches; validation reports the masked-token loss
    and accuracy and the soft targets' quality (``quality_evaluator``)."""
    from distill_jax import runner, train
    from distill_jax.trainer import Task

    rng = jax.random.PRNGKey(config.train.seed)
    teacher = build_teacher(config, dataset.vocab, dtype, jax.random.fold_in(rng, 1))
    init_params = abstract_init(
        teacher.model, jax.random.fold_in(rng, 2), method=teacher.model.cmlm_logits
    )
    loss_fn = train.cmlm_loss_fn(
        teacher.model, teacher.teacher_ids, cls_id=teacher.cls_id, mask_id=teacher.mask_id
    )
    shards = runner.data_shards(mesh)
    pipeline = teacher_pipeline(config, dataset, config.data.train_split, shards, training=True)
    valid = teacher_pipeline(config, dataset, config.data.valid_split, shards, training=False)
    # The quality scorer is made at the first validation: it is jitted for the shardings
    # of the trainer's state, which exists only then.
    scorers: list = []

    def summarize(total: dict, params: Any) -> dict[str, float]:
        if not scorers:
            scorers.append(
                quality_evaluator(
                    config,
                    dataset,
                    teacher,
                    jax.tree.map(lambda x: x.sharding, params),
                    mesh,
                    shards,
                )
            )
        return {
            "loss": total["loss"][0] / total["loss"][1],
            "masked_accuracy": total["accuracy"][0] / total["accuracy"][1],
            **scorers[0](params),
        }

    return Task(
        name="teacher",
        init_params=init_params,
        optimizer=teacher_optimizer(config),
        loss_fn=loss_fn,
        eval_loss_fn=loss_fn,
        train_keys=TRAIN_KEYS,
        eval_keys=TRAIN_KEYS,
        batches=iter(pipeline),
        valid=valid,
        summarize=summarize,
        schedule=runner.Schedule(
            config.teacher.steps,
            eval_every=config.teacher.eval_every,
            save_every=config.teacher.save_every,
        ),
        checkpoints=checkpoint_policy(config),
        rng=jax.random.fold_in(rng, 3),
        pretrained_params=teacher.pretrained_params,
        learning_rate=teacher_schedule(config),
    )


def quality_evaluator(
    config: ExperimentConfig,
    dataset: PreparedDataset,
    teacher: Teacher,
    param_shardings: Any,
    mesh,
    shards: int,
):
    """``quality(params) -> {stride_top1, stride_topk, stride_p_ref}`` on the first
    ``teacher.quality_examples`` validation pairs (``teacher_quality``)."""
    from distill_jax import sharding, teacher_quality

    split = config.data.valid_split
    pipeline = BatchPipeline(
        *dataset.records(split, config.teacher.quality_examples),
        PipelineConfig(
            seed=config.data.seed,
            shuffle=False,
            num_epochs=1,
            tokens_per_batch=config.teacher.tokens_per_batch,
            batch_multiple=shards,
            bucket_step=config.data.bucket_step,
        ),
    )
    score = teacher_quality.make_scorer(
        teacher,
        param_shardings,
        mesh,
        stride=config.teacher.stride,
        top_k=config.teacher.top_k,
        temperature=config.distill.temperature,
    )

    def quality(params):
        total = None
        for number in range(pipeline.batches_per_epoch):
            batch = pipeline.load_batch(number)
            arrays = sharding.shard_batch({"src": batch["src"], "tgt_out": batch["tgt_out"]}, mesh)
            total = teacher_quality.add_sums(total, score(params, arrays["src"], arrays["tgt_out"]))
        return teacher_quality.rates(total)

    return quality


@dataclasses.dataclass(frozen=True)
class TeacherCheckpoint:
    """The fine-tuned teacher checkpoint a command uses (see :func:`select_finetuned`)."""

    directory: str  # WORKDIR/teacher/checkpoints
    step: int  # the checkpoint's step
    digest: str  # checkpoint.Checkpointer.fingerprint of that step (sha256 hex)
    saved_steps: tuple[int, ...]  # every step the teacher run has saved, ascending
    explicit: bool  # chosen with --teacher-step (else: best of a finished run)

    def describe(self) -> str:
        return f"step {self.step} (digest {self.digest[:12]}) of {self.directory}"


def select_finetuned(
    config: ExperimentConfig, workdir: Path, step: int | None = None
) -> TeacherCheckpoint:
    """The teacher checkpoint to take soft targets from: ``step`` when given (it must be
    saved), else the best by validation stride top-1 of a *finished* run (one that saved
    step ``teacher.steps``; the last step when no checkpoint recorded a stride top-1). An
    unfinished run (killed, preempted, still training) is refused: its soft targets would
    silently differ from the finished teacher's."""
    import json

    from distill_jax import storage

    teacher_dir = storage.path(workdir) / "teacher"
    directory = teacher_dir / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"no teacher checkpoint in {directory}; run `distill-jax train-teacher`")
    saved_config = teacher_dir / "config.json"
    if saved_config.exists():
        try:
            trained_steps = json.loads(saved_config.read_text()).get("steps")
        except (ValueError, AttributeError):
            trained_steps = None
        if trained_steps is not None and trained_steps != config.teacher.steps:
            raise UserError(
                f"the teacher run in {teacher_dir} was made with teacher.steps={trained_steps} "
                f"({saved_config}); this command has teacher.steps={config.teacher.steps}"
            )
    with checkpointer(directory, checkpoint_policy(config)) as manager:
        saved = tuple(manager.all_steps())
        if not saved:
            raise UserError(
                f"no teacher checkpoint in {directory}; run `distill-jax train-teacher`"
            )
        if step is not None:
            if step not in saved:
                raise UserError(
                    f"--teacher-step {step}: {directory} has no checkpoint of that "
                    f"step (saved: {', '.join(map(str, saved))})"
                )
            chosen = step
        else:
            if saved[-1] < config.teacher.steps:
                raise UserError(
                    f"the teacher run in {teacher_dir} has not finished: its last checkpoint "
                    f"is step {saved[-1]} of teacher.steps={config.teacher.steps}. Finish it "
                    "(rerun `distill-jax train-teacher` with the same --config and --set; it "
                    f"resumes), or pass --teacher-step {saved[-1]} to use that checkpoint as "
                    f"it is (saved: {', '.join(map(str, saved))})"
                )
            chosen = manager.best_step() or saved[-1]
        digest = manager.fingerprint(chosen)
    return TeacherCheckpoint(str(directory), int(chosen), digest, saved, step is not None)


def load_finetuned(
    config: ExperimentConfig,
    workdir: Path,
    vocab: Vocabulary,
    mesh,
    dtype: Any,
    checkpoint: TeacherCheckpoint | None = None,
) -> tuple[Teacher, Any, Any]:
    """The fine-tuned teacher's parameters, sharded on ``mesh``: of ``checkpoint``, by
    default :func:`select_finetuned`'s (a finished run's best validation checkpoint).

    Returns (teacher, params, param shardings)."""
    from distill_jax import sharding, train

    if checkpoint is None:
        checkpoint = select_finetuned(config, workdir)
    with checkpointer(checkpoint.directory, checkpoint_policy(config)) as manager:
        step = checkpoint.step
        teacher = dataclasses.replace(
            build_teacher(config, vocab, dtype, jax.random.PRNGKey(0)), pretrained_params=None
        )
        init_params = abstract_init(
            teacher.model, jax.random.PRNGKey(0), method=teacher.model.cmlm_logits
        )
        # Forward passes only from here on: the configured attention kernel.
        bert_config = dataclasses.replace(
            teacher.config, attention_impl=config.teacher.inference_attention
        )
        teacher = dataclasses.replace(teacher, model=BertModel(bert_config), config=bert_config)
        optimizer = teacher_optimizer(config)
        abstract = jax.eval_shape(lambda: train.TrainState.create(init_params(), optimizer))
        shardings = sharding.tree_shardings(abstract, mesh)
        state, _ = manager.restore(step, sharding.abstract_with_shardings(abstract, shardings))
    return teacher, state.params, shardings.params
