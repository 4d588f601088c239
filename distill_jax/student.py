"""The Transformer student of an experiment: building it, its optimizer and batches
(with soft targets from the cache attached), its checkpoints, scoring it on a split, and
loading a trained one (``WORKDIR/students/NAME``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import deque
from typing import Any

import jax
import numpy as np

from distill_jax import runner, storage
from distill_jax.data.pipeline import BatchPipeline, PipelineConfig
from distill_jax.data.prepared import PreparedDataset, open_prepared
from distill_jax.data.vocab import Vocabulary
from distill_jax.errors import UserError
from distill_jax.experiment import DecodeConfig, ExperimentConfig
from distill_jax.models.transformer import Transformer
from distill_jax.trainer import CheckpointPolicy, abstract_init, checkpointer
from distill_jax.translate import TrainedModel

logger = logging.getLogger(__name__)

DEFAULT_NAMES = {"none": "baseline", "offline": "distilled", "online": "distilled-online"}


def default_name(config: ExperimentConfig) -> str:
    return DEFAULT_NAMES[config.distill.kd]


def build_model(config: ExperimentConfig, vocab: Vocabulary, dtype: Any) -> Transformer:
    """The student with the dataset vocabulary's size and the run's compute dtype."""
    return Transformer(dataclasses.replace(config.student, vocab_size=len(vocab), dtype=dtype))


def _optimizer_config(config: ExperimentConfig):
    from distill_jax import optim

    return optim.OptimizerConfig.student(
        learning_rate=config.train.learning_rate,
        warmup_steps=config.train.warmup_steps,
        grad_clip_norm=config.train.grad_clip_norm,
        schedule=config.train.schedule,
        model_size=config.student.d_model,
        eps=config.train.adam_eps,
    )


def make_optimizer(config: ExperimentConfig):
    """Adam with ``train.schedule`` (noam: ``train.learning_rate`` is the factor and
    ``student.d_model`` the model size)."""
    from distill_jax import optim

    return optim.make_optimizer(_optimizer_config(config))


def learning_rate_schedule(config: ExperimentConfig):
    """The student optimizer's learning rate of each update (counted from 0)."""
    from distill_jax import optim

    return optim.make_schedule(_optimizer_config(config))


SAMPLES = 4  # validation translations shown at each validation (TensorBoard)


def student_pipeline(
    config: ExperimentConfig, dataset: PreparedDataset, split: str, shards: int, *, training: bool
) -> BatchPipeline:
    # Training drops pairs over the data limits; evaluation keeps every pair and truncates
    # what the student's position table cannot hold (ExperimentConfig checks that the
    # training limits fit in it).
    max_len = config.student.max_len
    pipeline_config = PipelineConfig(
        seed=config.data.seed,
        shuffle=training,
        num_epochs=None if training else 1,
        tokens_per_batch=config.data.tokens_per_batch,
        batch_multiple=shards,
        bucket_step=config.data.bucket_step,
        max_src_len=config.data.max_src_len if training else max_len,
        max_tgt_len=config.data.max_tgt_len if training else max_len,
        truncate=not training,
        max_padded_len=max_len,
    )
    return BatchPipeline(*dataset.records(split, config.data.example_limit(split)), pipeline_config)


def attach_soft_targets(batch: dict, cache, top_k: int, pending=None) -> dict:
    """Adds ``kd_logits`` / ``kd_indices`` ``[rows, T, K]`` from the cache, by record index.

    The rows of the whole batch come in one read per array (``cache.read_async``; pass
    ``pending``, that read already started, to use it). Row t of an example's cached
    targets belongs to ``tgt_out[t]``; filler rows and positions past the target get zeros
    (their loss weight is 0)."""
    rows, tgt_len = batch["tgt_out"].shape
    logits = np.zeros((rows, tgt_len, top_k), np.float32)  # [rows, T, K]
    indices = np.zeros((rows, tgt_len, top_k), np.int32)  # [rows, T, K]
    real = [row for row, record in enumerate(batch["index"]) if record >= 0]
    pending = (
        pending
        if pending is not None
        else cache.read_async([int(batch["index"][row]) for row in real])
    )
    cached_logits, cached_ids = pending.result()  # per example [len(tgt_out), K_cache]
    for row, values, ids in zip(real, cached_logits, cached_ids):
        length = int(np.count_nonzero(batch["tgt_out"][row]))
        if len(values) != length:
            raise UserError(
                f"soft-target cache {cache.path}: record {int(batch['index'][row])} has "
                f"{len(values)} target rows, the batch has {length} target tokens (cache made "
                "for other data?)"
            )
        logits[row, :length] = values[:, :top_k]
        indices[row, :length] = ids[:, :top_k]
    return {**batch, "kd_logits": logits, "kd_indices": indices}


class SoftTargetBatches:
    """Wraps a batch iterator: each batch comes with its soft targets attached, read
    ``depth`` batches ahead of the step that consumes it (the reads run in tensorstore's
    threads while the step computes). ``get_state`` / ``set_state`` are the wrapped
    iterator's, at the position of the batches handed out, so a checkpoint resumes exactly."""

    def __init__(self, batches, cache, top_k: int, depth: int = 2):
        self._batches, self._cache, self._top_k, self._depth = batches, cache, top_k, depth
        self._ahead: deque = deque()  # (batch, pending read, state before the batch)

    def __iter__(self) -> SoftTargetBatches:
        return self

    def _fill(self) -> None:
        while len(self._ahead) < self._depth:
            state = self._batches.get_state()
            try:
                batch = next(self._batches)
            except StopIteration:
                return
            records = [int(r) for r in batch["index"] if r >= 0]
            self._ahead.append((batch, self._cache.read_async(records), state))

    def __next__(self) -> dict:
        self._fill()
        if not self._ahead:
            raise StopIteration
        batch, pending, _ = self._ahead.popleft()
        self._fill()  # the next reads start before this batch is used
        return attach_soft_targets(batch, self._cache, self._top_k, pending)

    def get_state(self) -> dict:
        """The wrapped iterator's state at the next batch this wrapper hands out."""
        return self._ahead[0][2] if self._ahead else self._batches.get_state()

    def set_state(self, state: dict) -> None:
        self._ahead.clear()
        self._batches.set_state(state)


def cache_identity(config: ExperimentConfig, dataset: PreparedDataset, split: str, top_k: int):
    """What a soft-target cache for this experiment must have been made from."""
    from distill_jax.soft_target_cache import CacheIdentity

    teacher = f"{config.teacher.checkpoint}|init={config.teacher.init}|steps={config.teacher.steps}"
    fingerprint = hashlib.sha256(json.dumps(dataset.meta, sort_keys=True).encode()).hexdigest()
    return CacheIdentity(
        teacher=teacher,
        vocabulary=dataset.vocab.sha256,
        dataset=f"{dataset.meta['tfds_name']}@{fingerprint[:16]}",
        split=split,
        top_k=top_k,
        stride=config.teacher.stride,
        vocab_size=len(dataset.vocab),
    )


def open_soft_targets(
    config: ExperimentConfig, workdir, dataset: PreparedDataset, split: str, teacher_step=None
):
    """The soft-target cache a run with ``distill.kd=offline`` trains on, refused (a
    ``UserError`` naming why) unless it was made for this experiment's teacher and data
    *and* from the teacher checkpoint selected now (``teacher.select_finetuned``: the best
    of the finished run, or ``teacher_step``). When the teacher's checkpoints have been
    removed since the extraction there is nothing to select: the cache is used as it is,
    with a note naming the checkpoint it was made from."""

    from distill_jax import teacher as teacher_lib
    from distill_jax.soft_target_cache import CacheError, describe_teacher, open_cache, read_header

    path = storage.path(workdir) / "soft_targets" / split
    identity = cache_identity(config, dataset, split, config.distill.top_k)
    count = len(dataset.records(split, config.data.example_limit(split))[0])
    try:
        header = read_header(path, identity, num_examples=count)
    except CacheError as err:
        raise UserError(f"{err} (run `distill-jax soft-targets` first)") from None
    made_from = (header.get("teacher_step"), header.get("teacher_digest"))
    checkpoints = storage.path(workdir) / "teacher" / "checkpoints"
    if teacher_step is None and not checkpoints.is_dir():
        if runner.is_chief():
            logger.warning(
                "%s is gone, so the soft targets in %s cannot be checked against "
                "it; they were made from %s",
                checkpoints,
                path,
                describe_teacher(*made_from),
            )
    else:
        selected = teacher_lib.select_finetuned(config, workdir, teacher_step)
        if made_from != (selected.step, selected.digest):
            redo = (
                f"{path} was made from {describe_teacher(*made_from)}, but the one "
                f"selected now is {describe_teacher(selected.step, selected.digest)} of "
                f"{selected.directory}. Remake it from the selected checkpoint with "
                "`distill-jax soft-targets --force"
                f"{f' --teacher-step {selected.step}' if selected.explicit else ''}` "
                "(same --config and --set)"
            )
            if made_from[0] in selected.saved_steps and made_from[0] != selected.step:
                redo += f", or train on it as it is with --teacher-step {made_from[0]}"
            raise UserError(redo)
        identity = dataclasses.replace(
            identity, teacher_step=selected.step, teacher_digest=selected.digest
        )
    return open_cache(path, identity, num_examples=count)


# ----------------------------------------------------------------------------- evaluation


def reference_texts(dataset: PreparedDataset, split: str, limit: int = 0):
    """(source id arrays, reference target texts) of a split, in record order."""
    source = dataset.source(split)
    count = len(source) if not limit else min(limit, len(source))
    records = source.__getitems__(list(range(count)))
    return (
        [np.asarray(r["src"], np.int32) for r in records],
        [
            r["tgt_text"].decode() if isinstance(r["tgt_text"], bytes) else str(r["tgt_text"])
            for r in records
        ],
    )


def score_split(
    trained: TrainedModel,
    dataset: PreparedDataset,
    split: str,
    decode_config: DecodeConfig,
    *,
    limit: int = 0,
    progress: bool = False,
) -> tuple[dict, list[str]]:
    """Detokenized sacreBLEU (case-insensitive: the uncased teacher's pieces lowercase the
    output) and ROUGE-1/2/L F-measures of the outputs of the student ``trained`` for the
    first ``limit`` pairs (0: all) of ``split`` (translation reports BLEU, summarisation
    ROUGE; both are cheap); returns (scores, hypotheses).

    On a corpus stored Moses-tokenized (``dataset.json`` ``"text"``, e.g. iwslt14_de_en),
    ``bleu`` is sacreBLEU on Moses-detokenized hypotheses and references, and ``bleu_tok``
    is tokenized BLEU (``metrics.tokenized_bleu``), the paper's score: lowercased on a
    lowercased corpus (IWSLT14), cased on a cased one (IWSLT15 En-Vi), as the reference's
    ``multi-bleu.perl`` scores them."""
    from distill_jax import metrics, translate

    sources, references = reference_texts(dataset, split, limit)
    outputs = translate.translate_ids(trained, sources, decode_config, progress=progress)
    hypotheses = [trained.vocab.decode(ids.tolist()) for ids in outputs]
    text = dataset.meta.get("text") or {}
    tokenized = text.get("tokenizer") == "moses"
    if tokenized:
        lang = text.get("tgt_lang", "en")
        scores = metrics.bleu(
            [
                metrics.moses_detokenize(metrics.moses_tokens(h, lang, rejoin=True), lang)
                for h in hypotheses
            ],
            [metrics.moses_detokenize(r, lang) for r in references],
            lowercase=True,
        )
    else:
        scores = metrics.bleu(hypotheses, references, lowercase=True)
    result = {
        "bleu": scores["bleu"],
        "bleu_signature": scores["signature"],
        **metrics.rouge(hypotheses, references),
    }
    if tokenized:
        tok = metrics.tokenized_bleu(
            hypotheses,
            references,
            lang=lang,
            references_tokenized=True,
            lowercase=text.get("lowercase", True),
        )
        result.update(bleu_tok=tok["bleu"], bleu_tok_signature=tok["signature"])
    return result, hypotheses


def checkpoint_policy(config: ExperimentConfig) -> CheckpointPolicy:
    """The student's checkpoints: the last ones (enough to average) plus the best by
    ``train.select_metric`` on the validation split (BLEU unless configured)."""
    return CheckpointPolicy(
        save_every=config.train.save_every,
        keep_last=max(config.train.keep_last, config.train.average_last),
        best_metric=config.train.select_metric,
        best_mode="max",
    )


EVAL_KEYS = ("src", "tgt_in", "tgt_out")  # what the student's steps read


@dataclasses.dataclass
class StudentTask:
    """A student's training (``trainer.Task``) and what its results name."""

    task: Any  # trainer.Task
    model: Transformer
    vocab: Vocabulary
    provenance: dict  # the teacher checkpoint distilled from: checkpoint_step, _digest


def training_task(
    config: ExperimentConfig,
    workdir: storage.PathLike,
    dataset: PreparedDataset,
    mesh,
    dtype: Any,
    name: str,
    teacher_step: int | None = None,
) -> StudentTask:
    """The student's training as a ``trainer.Task`` (docs/method.md §3): the baseline
    (``distill.kd=none``), offline (soft targets from the cache, read ahead of the step)
    or online (the fine-tuned teacher inside the step, its parameters a frozen input).
    Validation reports loss, nll, accuracy and the ``SELECT_METRICS`` of decoded output."""
    from distill_jax import runner, train
    from distill_jax import teacher as teacher_lib
    from distill_jax.experiment import SELECT_METRICS
    from distill_jax.trainer import Task

    vocab = dataset.vocab
    rng = jax.random.PRNGKey(config.train.seed)
    model = build_model(config, vocab, dtype)
    kd = config.distill.kd
    keys = list(EVAL_KEYS)
    teacher_fn, cache, frozen = None, None, None
    provenance: dict = {}  # the teacher checkpoint distilled from (results.json)
    if teacher_step is not None and kd == "none":
        raise UserError(
            "--teacher-step applies to distill.kd=offline or online, not to a "
            "baseline (distill.kd=none)"
        )
    if kd == "offline":
        cache = open_soft_targets(config, workdir, dataset, config.data.train_split, teacher_step)
        provenance = {
            "checkpoint_step": cache.header.get("teacher_step"),
            "checkpoint_digest": cache.header.get("teacher_digest"),
        }
        keys += ["kd_logits", "kd_indices"]
    elif kd == "online":
        selected = teacher_lib.select_finetuned(config, workdir, teacher_step)
        teacher, teacher_params, teacher_shardings = teacher_lib.load_finetuned(
            config, workdir, vocab, mesh, dtype, selected
        )
        frozen = (teacher_params, teacher_shardings)
        provenance = {"checkpoint_step": selected.step, "checkpoint_digest": selected.digest}

        def online_teacher(batch, params):
            return teacher_lib.stride_topk(
                teacher,
                params,
                batch["src"],
                batch["tgt_out"],
                stride=config.teacher.stride,
                top_k=config.distill.top_k,
            )

        teacher_fn = online_teacher

    settings = train.StudentLossConfig(
        alpha=config.distill.alpha if kd != "none" else 0.0,
        label_smoothing=config.train.label_smoothing,
        kd_mode=config.distill.kd_mode,
        temperature=config.distill.temperature,
    )
    shards = runner.data_shards(mesh)
    pipeline = student_pipeline(config, dataset, config.data.train_split, shards, training=True)
    valid = student_pipeline(config, dataset, config.data.valid_split, shards, training=False)
    batches = iter(pipeline)
    if cache is not None:  # soft targets read ahead of the step that needs them
        batches = SoftTargetBatches(batches, cache, config.distill.top_k)

    last: dict = {}  # the latest validation's hypotheses, for samples()

    def summarize(total: dict, params: Any) -> dict[str, float]:
        scores, last["hypotheses"] = score_split(
            TrainedModel(model, params, vocab, mesh),
            dataset,
            config.data.valid_split,
            config.decode,
            limit=config.train.bleu_sentences,
        )
        return {
            "loss": total["loss"][0] / total["loss"][1],
            "nll": total["nll"][0] / total["nll"][1],
            "accuracy": total["accuracy"][0] / total["accuracy"][1],
            **{metric: scores[metric] for metric in SELECT_METRICS},
        }

    def samples(state: Any, step: int) -> tuple[list[str], list[str], list[str]]:
        """The first validation sources, the validation's outputs for them (beam search with
        ``config.decode``, as BLEU scored them) and their references."""
        hypotheses = last.get("hypotheses", [])[:SAMPLES]
        sources, references = reference_texts(dataset, config.data.valid_split, len(hypotheses))
        return [vocab.decode(ids.tolist()) for ids in sources], hypotheses, references

    task = Task(
        name=f"student {name}",
        init_params=abstract_init(model, jax.random.fold_in(rng, 1), num_inputs=2),
        optimizer=make_optimizer(config),
        loss_fn=train.student_loss_fn(model, settings, teacher_fn),
        eval_loss_fn=train.student_loss_fn(model, dataclasses.replace(settings, alpha=0.0)),
        train_keys=tuple(keys),
        eval_keys=EVAL_KEYS,
        batches=batches,
        valid=valid,
        summarize=summarize,
        schedule=runner.Schedule(
            config.train.steps,
            eval_every=config.train.eval_every,
            save_every=config.train.save_every,
            patience=config.train.patience,
        ),
        checkpoints=checkpoint_policy(config),
        rng=jax.random.fold_in(rng, 2),
        frozen=frozen,
        learning_rate=learning_rate_schedule(config),
        samples=samples,
    )
    return StudentTask(task, model, vocab, provenance)


def final_parameters(config: ExperimentConfig, manager, state, shardings) -> tuple[Any, str]:
    """The parameters to report: the average of the last N checkpoints when requested,
    else, with ``train.final_checkpoint == "last"`` (the reference's choice), the final
    state, else the best checkpoint by the validation ``train.select_metric`` (else the
    final state). Closes ``manager``."""
    from distill_jax import checkpoint, sharding

    abstract = sharding.abstract_with_shardings(state, shardings)
    best = manager.best_step()
    directory = manager.cfg.directory
    manager.close()
    if config.train.average_last > 1:
        params = checkpoint.average_checkpoints(directory, config.train.average_last, abstract)
        return params, f"average of the last {config.train.average_last} checkpoints"
    if config.train.final_checkpoint == "last":
        return state.params, f"last step {int(jax.device_get(state.step))}"
    if best is not None and best != int(jax.device_get(state.step)):
        with checkpointer(directory, checkpoint_policy(config)) as reader:
            restored, _ = reader.restore(best, abstract)
        metric = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}[
            config.train.select_metric
        ]
        return restored.params, f"best validation {metric}, step {best}"
    return state.params, f"step {int(jax.device_get(state.step))}"


def write_results(
    config: ExperimentConfig,
    dataset: PreparedDataset,
    setup: StudentTask,
    mesh,
    final: tuple[Any, str],
    out: storage.PathLike,
    *,
    no_progress: bool = False,
    stopped: tuple[int, str] | None = None,
) -> dict:
    """Scores ``final``, ``(params, which)`` as :func:`final_parameters` gives them, on the
    validation and test splits: each split's hypotheses into ``OUT/SPLIT.hyp.txt``, a line
    per split on stdout, and last ``OUT/results.json`` (a run with it is finished).
    ``stopped`` is ``(step, why)`` when ``train.patience`` ended the run before
    ``train.steps``. Returns the results."""
    params, which = final
    out = storage.path(out)
    name = out.name
    kd = config.distill.kd
    results = {
        "name": name,
        "experiment": config.name,
        "kd": kd,
        "steps": config.train.steps,
        "trained_steps": config.train.steps if stopped is None else int(stopped[0]),
        "patience": config.train.patience,
        "stopped_early": None if stopped is None else stopped[1],
        "seed": config.train.seed,
        "checkpoint": which,
        "code": runner.code_version(),
        "teacher": None
        if kd == "none"
        else {
            "checkpoint": config.teacher.checkpoint,
            "init": config.teacher.init,
            "steps": config.teacher.steps,
            "top_k": config.distill.top_k,
            "alpha": config.distill.alpha,
            "temperature": config.distill.temperature,
            **setup.provenance,
        },
        "splits": {},
    }
    for split in (config.data.valid_split, *config.data.test_splits):
        scores, hypotheses = score_split(
            TrainedModel(setup.model, params, setup.vocab, mesh),
            dataset,
            split,
            config.decode,
            progress=not no_progress,
        )
        results["splits"][split] = scores
        if runner.is_chief():
            storage.write_text_atomic(
                out / f"{split}.hyp.txt", "".join(h + "\n" for h in hypotheses)
            )
            print(
                f"[{name}] {split}: BLEU {scores['bleu']:.2f}, ROUGE-1/2/L "
                f"{scores['rouge1']:.2f}/{scores['rouge2']:.2f}/{scores['rougeL']:.2f} "
                f"({which})",
                flush=True,
            )
    if runner.is_chief():  # written last: a run with results.json is finished
        storage.write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    return results


def load_trained(config: ExperimentConfig, workdir: storage.PathLike, name: str, which: str, mesh):
    """(model, params, vocab) of a trained student (``workdir`` local or ``gs://``);
    ``which`` is best, latest, averaged or a step number."""
    from distill_jax import checkpoint, sharding, train

    workdir = storage.path(workdir)
    out = workdir / "students" / name
    directory = out / "checkpoints"
    if not directory.is_dir():
        raise UserError(
            f"no student checkpoints in {directory}; run `distill-jax train-student`"
            f" (runs: {sorted(p.name for p in (workdir / 'students').glob('*'))})"
            if (workdir / "students").is_dir()
            else f"no student checkpoints in {directory}; run `distill-jax train-student`"
        )
    dataset = open_prepared(runner.prepared_dir(config, workdir))
    vocab = dataset.vocab
    model = build_model(config, vocab, runner.compute_dtype(config))
    optimizer = make_optimizer(config)
    init_params = abstract_init(model, jax.random.PRNGKey(0), num_inputs=2)
    abstract_state = jax.eval_shape(lambda: train.TrainState.create(init_params(), optimizer))
    shardings = sharding.tree_shardings(abstract_state, mesh)
    abstract = sharding.abstract_with_shardings(abstract_state, shardings)
    if which == "averaged":
        params = checkpoint.average_checkpoints(
            str(directory), max(config.train.average_last, 2), abstract
        )
        return model, params, vocab
    with checkpointer(directory, checkpoint_policy(config)) as manager:
        if which in ("best", "latest"):
            step = manager.best_step() if which == "best" else None
            step = step if step is not None else manager.latest_step()
        elif which.isdigit() and int(which) in manager.all_steps():
            step = int(which)
        else:
            raise UserError(
                f"--checkpoint {which!r}: expected best, latest, averaged or one of "
                f"the saved steps {manager.all_steps()} in {directory}"
            )
        if step is None:
            raise UserError(f"{directory} has no checkpoint")
        params = manager.restore(step, abstract)[0].params
    return model, params, vocab
