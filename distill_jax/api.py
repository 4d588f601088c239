"""The Python API: what the ``distill-jax`` subcommands do, as functions (docs/api.md).

    import distill_jax as dj

    config = dj.load_config("configs/multi30k_de_en.py", ["teacher.steps=400"])
    teacher = dj.train_teacher(config, "runs/m30k")          # -> TeacherRun
    cache = dj.extract_soft_targets(config, "runs/m30k")     # -> SoftTargets
    run = dj.train_student(config, "runs/m30k")              # -> StudentRun
    student = dj.Student.load(config, "runs/m30k", run.name)
    student.translate(["ein hund läuft über die wiese ."])   # -> ["a dog runs ..."]
    student.score("test2016")                                # -> {"bleu": ..., ...}

A work directory is a local path or ``gs://BUCKET/PATH``; each run resumes from its last
checkpoint when called again with the same config and refuses another config, naming the
changed fields, exactly as the subcommands do (they call these functions). Bad input
raises ``distill_jax.errors.UserError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from distill_jax import _API, runlock, runner, runtime, storage
from distill_jax.errors import UserError
from distill_jax.experiment import ExperimentConfig, with_overrides
from distill_jax.extraction import SoftTargets

logger = logging.getLogger(__name__)

__all__ = list(_API)  # the names distill_jax re-exports (listed once, in __init__.py)


def load_config(path: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment config of a config file (``configs/NAME.py``, whose ``get_config()``
    returns an ``ExperimentConfig``) with ``"section.field=value"`` overrides applied (and,
    for a baseline, the config's ``baseline_overrides`` first), checked against every
    field's range."""
    from distill_jax import configlib

    config = configlib.load_config_file(path)
    if not isinstance(config, ExperimentConfig):
        raise UserError(
            f"{path}: get_config() must return an ExperimentConfig, got {type(config).__name__}"
        )
    config = with_overrides(config, overrides)
    try:
        config.check()
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return config


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """What :func:`train_teacher` produced."""

    directory: str  # WORKDIR/teacher: checkpoints/, metrics.jsonl, config.json
    final_step: int  # the last step trained (teacher.steps unless preempted)
    best_step: int | None  # the checkpoint with the highest validation stride top-1
    validation: dict  # the last validation record's values (loss, masked_accuracy, ...)


@dataclasses.dataclass(frozen=True)
class StudentRun:
    """What :func:`train_student` produced."""

    name: str  # the run's name under WORKDIR/students
    directory: str  # WORKDIR/students/NAME: checkpoints/, metrics.jsonl, *.hyp.txt, ...
    final_step: int  # the last step trained (train.steps unless preempted)
    finished: bool  # results.json written (False: preempted; call again to resume)
    validation: dict  # the last validation record's values (loss, accuracy, bleu, ...)
    results: dict | None  # results.json: the final parameters' scores per split


def _begin(config: ExperimentConfig, workdir: storage.PathLike):
    """The work directory as a path, once it is reachable, with ``config.runtime`` applied
    (before JAX's first use: the host-memory mode must precede the CPU client)."""
    storage.check_access(str(workdir))
    runtime.apply(config.runtime)
    return storage.path(workdir)


@contextlib.contextmanager
def _locked(
    directory: storage.PathLike, what: str, name: str = runlock.LOCK_NAME
) -> Iterator[None]:
    """Holds the run directory's lock (one writer, ``runlock``) for the block."""
    runlock.acquire(directory, what, name)
    try:
        yield
    finally:
        runlock.release_all()


def _last_record(directory: Any, split: str = "valid") -> dict:
    """The values of the last ``split`` record of a run's metrics.jsonl ({} when none)."""
    path = storage.path(directory) / "metrics.jsonl"
    if not path.exists():
        return {}
    for line in reversed(path.read_text().splitlines()):
        record = json.loads(line)
        if record.get("split") == split:
            return {k: v for k, v in record.items() if k not in ("step", "split", "time")}
    return {}


def _start(config: ExperimentConfig, workdir: storage.PathLike):
    """(prepared dataset, compute dtype, mesh) of a run."""
    from distill_jax import sharding
    from distill_jax.data.prepared import open_prepared

    dataset = open_prepared(runner.prepared_dir(config, workdir))
    return dataset, runner.compute_dtype(config), sharding.make_mesh(config.mesh)


def train_teacher(
    config: ExperimentConfig,
    workdir: storage.PathLike,
    *,
    no_progress: bool = False,
    callbacks: Sequence[runner.Callback] = (),
    profile_steps: tuple[int, int] | None = None,
) -> TeacherRun:
    """C-MLM fine-tuning of ``teacher.checkpoint`` (docs/method.md §1) in
    ``WORKDIR/teacher``; resumes a stopped run. ``callbacks`` hook into the training loop
    (``runner.Callback``); ``profile_steps=(A, B)`` traces steps A to B-1 with
    ``jax.profiler`` into ``WORKDIR/teacher/profile``."""
    from distill_jax import teacher, trainer

    out = _begin(config, workdir) / "teacher"
    with _locked(out, "train-teacher"):  # one writer per run directory
        runner.check_or_save_config(
            config.teacher, out / "config.json", what="train-teacher", runtime=config.runtime
        )
        dataset, dtype, mesh = _start(config, workdir)
        task = teacher.training_task(config, dataset, mesh, dtype)
        run = trainer.Trainer(
            task,
            mesh,
            out,
            trainer.TrainerOptions.of(
                config, no_progress=no_progress, callbacks=callbacks, profile_steps=profile_steps
            ),
        )
        run.resume()
        run.fit()
        best = run.checkpoints.best_step()
        run.close()
    return TeacherRun(str(out), run.step, best, _last_record(out))


def extract_soft_targets(
    config: ExperimentConfig,
    workdir: storage.PathLike,
    *,
    split: str | None = None,
    force: bool = False,
    teacher_step: int | None = None,
    chunk_rows: int | None = None,
    no_progress: bool = False,
) -> SoftTargets:
    """The fine-tuned teacher's stride-masked top-K soft targets of ``split`` (default
    ``data.train_split``) into ``WORKDIR/soft_targets/SPLIT`` (docs/method.md §2), from
    the best checkpoint of the finished teacher run or the saved step ``teacher_step``;
    a finished cache of the same teacher and data is reused unless ``force``."""
    from distill_jax import extraction
    from distill_jax.soft_target_cache import DEFAULT_CHUNK_ROWS

    workdir = _begin(config, workdir)
    split = split or config.data.train_split
    # One writer per cache; the lock sits beside the cache folder, which force replaces.
    with _locked(workdir / "soft_targets", f"soft-targets --split {split}", f".{split}.lock"):
        return extraction.extract(
            config,
            workdir,
            split,
            force=force,
            teacher_step=teacher_step,
            chunk_rows=DEFAULT_CHUNK_ROWS if chunk_rows is None else chunk_rows,
            no_progress=no_progress,
        )


def train_student(
    config: ExperimentConfig,
    workdir: storage.PathLike,
    *,
    name: str | None = None,
    teacher_step: int | None = None,
    no_progress: bool = False,
    callbacks: Sequence[runner.Callback] = (),
    profile_steps: tuple[int, int] | None = None,
) -> StudentRun:
    """The student (docs/method.md §3) in ``WORKDIR/students/NAME`` (``name`` defaults
    to baseline / distilled / distilled-online from ``distill.kd``); resumes a stopped
    run. At the end the best (or averaged) parameters translate the validation and test
    splits into ``SPLIT.hyp.txt`` and their scores go to ``results.json``. ``callbacks``
    and ``profile_steps`` as in :func:`train_teacher`."""
    from distill_jax import student, trainer

    name = name or student.default_name(config)
    out = _begin(config, workdir) / "students" / name
    with _locked(out, f"train-student --name {name}"):  # one writer per run directory
        saved = [int(n) for n in runner.saved_steps(out / "checkpoints") if n.isdigit()]
        if saved and max(saved) > config.train.steps:
            raise UserError(
                f"{out} has trained {max(saved)} steps, more than train.steps "
                f"{config.train.steps}: a run is continued, never cut back (ask for at least "
                f"{max(saved)} steps, or use another --name)"
            )
        # train.steps and train.patience may grow on resume: the student's schedules do not
        # depend on them, so the continued run is the one asked for that long from the start
        runner.check_or_save_config(
            config,
            out / "config.json",
            what="train-student",
            may_change=("train.steps", "train.patience"),
        )
        dataset, dtype, mesh = _start(config, workdir)
        setup = student.training_task(config, workdir, dataset, mesh, dtype, name, teacher_step)
        run = trainer.Trainer(
            setup.task,
            mesh,
            out,
            trainer.TrainerOptions.of(
                config, no_progress=no_progress, callbacks=callbacks, profile_steps=profile_steps
            ),
        )
        results_path = out / "results.json"
        run.resume()
        if run.step >= config.train.steps or run.stopped_early:
            if results_path.exists():
                if runner.is_chief():  # finished: nothing to redo (delete results.json to rescore)
                    logger.info("[%s] already finished: %s", name, results_path)
                run.close()
                return _student_run(name, out, run.step)
        elif results_path.exists():  # finished with fewer steps or less patience: goes on
            _set_aside_results(out, run.step)
        state = run.fit()
        if run.step < config.train.steps and not run.stopped_early:  # preempted: rerun resumes
            run.close()
            return _student_run(name, out, run.step)
        stopped = (run.step, run.early_stopping.reason()) if run.stopped_early else None
        final = student.final_parameters(config, run.checkpoints, state, run.shardings)
        student.write_results(
            config, dataset, setup, mesh, final, out, no_progress=no_progress, stopped=stopped
        )
    return _student_run(name, out, run.step)


def _set_aside_results(out: Any, step: int) -> None:
    """Moves a finished student's results.json and hypotheses into ``OUT/at_step_STEP/``
    before the run trains on (more steps or more patience were asked for): they stay what
    they were, and the run no longer reads as finished. Copies first, then removes, so an
    interruption loses nothing."""
    if not runner.is_chief():
        return
    aside = out / f"at_step_{step}"
    files = [out / "results.json", *sorted(out.glob("*.hyp.txt"))]
    storage.makedirs(aside)
    for f in files:
        storage.write_text_atomic(aside / f.name, f.read_text())
    for f in files:  # results.json first: from here on the run is not finished
        f.unlink()
    logger.info(
        "[%s] trains on from step %d; its results at that step are kept in %s",
        out.name,
        step,
        aside,
    )


def _student_run(name: str, out: Any, step: int) -> StudentRun:
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    return StudentRun(name, str(out), step, results is not None, _last_record(out), results)


def score(
    hypotheses: Sequence[str],
    references: Sequence[str],
    *,
    metric: str = "bleu",
    lowercase: bool = False,
    tok_cased: bool = False,
    lang: str = "en",
    references_tokenized: bool = False,
) -> dict:
    """Scores of line-aligned hypotheses against references, as ``distill-jax evaluate``:
    ``metric`` "bleu" (detokenized sacreBLEU: ``bleu``, ``signature``), "bleu_tok"
    (Moses-tokenized BLEU, lowercased unless ``tok_cased``: ``bleu_tok``,
    ``bleu_tok_signature``), "rouge" (``rouge1``, ``rouge2``, ``rougeL``) or "all"."""
    from distill_jax import metrics

    if metric not in ("bleu", "bleu_tok", "rouge", "all"):
        raise UserError(f"metric must be bleu, bleu_tok, rouge or all, got {metric!r}")
    if len(hypotheses) != len(references):
        raise UserError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise UserError("no sentence to score")
    result: dict = {}
    if metric in ("bleu", "all"):
        result.update(metrics.bleu(hypotheses, references, lowercase=lowercase))
    if metric in ("bleu_tok", "all"):
        try:
            tok = metrics.tokenized_bleu(
                hypotheses,
                references,
                lang=lang,
                references_tokenized=references_tokenized,
                lowercase=not tok_cased,
            )
        except ImportError as err:
            raise UserError(str(err)) from None
        result.update({"bleu_tok": tok["bleu"], "bleu_tok_signature": tok["signature"]})
    if metric in ("rouge", "all"):
        result.update(metrics.rouge(hypotheses, references))
    return result


class Student:
    """A trained student, ready to translate: ``Student.load(config, workdir, name)``."""

    def __init__(
        self,
        config: ExperimentConfig,
        workdir: storage.PathLike,
        model: Any,
        params: Any,
        vocab: Any,
        mesh: Any,
    ):
        self.config, self.workdir = config, storage.path(workdir)
        self.model, self.params, self.vocab, self.mesh = model, params, vocab, mesh

    @classmethod
    def load(
        cls,
        config: ExperimentConfig,
        workdir: storage.PathLike,
        name: str | None = None,
        checkpoint: str = "best",
    ) -> Student:
        """The student run ``WORKDIR/students/NAME`` (default: from ``distill.kd``) at
        ``checkpoint``: "best" (validation ``train.select_metric``), "latest", "averaged"
        or a saved step number (as text or int)."""
        from distill_jax import sharding, student

        workdir = _begin(config, workdir)
        mesh = sharding.make_mesh(config.mesh)
        model, params, vocab = student.load_trained(
            config, workdir, name or student.default_name(config), str(checkpoint), mesh
        )
        return cls(config, workdir, model, params, vocab, mesh)

    def _trained(self):
        """The model, parameters, vocabulary and mesh as ``translate.TrainedModel``."""
        from distill_jax import translate

        return translate.TrainedModel(self.model, self.params, self.vocab, self.mesh)

    def decode_config(self, method: str | None = None, **fields: Any):
        """``config.decode`` with ``method`` ("beam", "greedy", "sample") and any other
        ``DecodeConfig`` fields replaced (``beam_size``, ``length_penalty``,
        ``temperature``, ``top_k``, ...)."""
        from distill_jax.experiment import check_ranges

        if method is not None:
            fields["method"] = method
        try:
            decode = dataclasses.replace(self.config.decode, **fields)
            check_ranges(dataclasses.replace(self.config, decode=decode))
        except (TypeError, ValueError) as err:
            raise UserError(f"decode options: {err}") from None
        return decode

    def translate(
        self,
        texts: Sequence[str],
        *,
        method: str | None = None,
        nbest: int | None = None,
        top_p: float = 1.0,
        seed: int = 0,
        progress: bool = False,
        **decode_fields: Any,
    ) -> list:
        """Detokenized outputs of ``texts``, one per source (what ``distill-jax generate``
        writes); with ``nbest`` N, a list of N ``translate.Translation(text, score)`` per
        source, best first. ``method`` "beam" (default from the config), "greedy" or
        "sample" (``top_p`` < 1: nucleus sampling; source i samples with ``seed`` folded
        with i); other keywords replace ``DecodeConfig`` fields (``beam_size=4``)."""
        from distill_jax import translate

        decode = self.decode_config(method, **decode_fields)
        try:
            translate.check_options(decode, nbest, top_p)
        except ValueError as err:
            raise UserError(str(err)) from None
        return translate.translate_texts(
            self._trained(),
            list(texts),
            decode,
            seed=seed,
            nbest=nbest,
            top_p=top_p,
            progress=progress,
        )

    def translate_stream(
        self,
        lines: Iterable[str],
        *,
        nbest: int | None = None,
        top_p: float = 1.0,
        seed: int = 0,
        wait: float | None = None,
    ) -> Iterator[list]:
        """:meth:`translate` of lines as they arrive (one process only): yields the outputs
        of each micro-batch, in order, once it is decoded (``translate.translate_stream``:
        the lines that arrived are decoded once none came for ``wait`` seconds)."""
        from distill_jax import translate

        try:
            translate.check_options(self.config.decode, nbest, top_p)
        except ValueError as err:
            raise UserError(str(err)) from None
        return translate.translate_stream(
            self._trained(),
            lines,
            self.config.decode,
            seed=seed,
            nbest=nbest,
            top_p=top_p,
            wait=translate.STREAM_WAIT if wait is None else wait,
        )

    def score(
        self, split: str, *, limit: int = 0, progress: bool = False, **decode_fields: Any
    ) -> dict:
        """BLEU (detokenized sacreBLEU and its signature), ROUGE-1/2/L and, on a
        Moses-tokenized corpus, tokenized BLEU of the student's outputs on a prepared
        ``split`` (its first ``limit`` pairs; 0 = all), as ``train-student`` scores its
        final parameters; ``decode_fields`` as in :meth:`translate`. The hypotheses are
        under the key ``hypotheses``."""
        from distill_jax import student
        from distill_jax.data.prepared import open_prepared

        dataset = open_prepared(runner.prepared_dir(self.config, self.workdir))
        scores, hypotheses = student.score_split(
            self._trained(),
            dataset,
            split,
            self.decode_config(**decode_fields),
            limit=limit,
            progress=progress,
        )
        return {**scores, "hypotheses": hypotheses}
