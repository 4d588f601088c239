"""What training and decoding runs share: the work directory, the config check on resume,
metrics logging, progress bars, and the resumable training loop.

Only process 0 writes logs, metrics and progress bars; every process takes part in the
jitted steps and in Orbax's (collective) checkpoint saves and restores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from distill_jax import configlib, runlock, storage
from distill_jax.errors import UserError
from distill_jax.experiment import ExperimentConfig

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_chief() -> bool:
    return jax.process_index() == 0


@functools.cache
def code_version() -> dict:
    """The code a run is made with, for its results: the package version and, when the
    package is imported from a git checkout (an editable install), its commit, with
    ``+dirty`` when tracked files differ from it (None elsewhere, or without git)."""
    from distill_jax import __version__

    root = pathlib.Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    commit = None
    if (root / ".git").exists():
        try:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            commit = git("rev-parse", "--short=12", "HEAD") + ("+dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {"version": __version__, "commit": commit}


def check_or_save_config(
    config: Any,
    path: storage.PathLike,
    *,
    what: str,
    checkpoints: storage.PathLike | None = None,
    runtime: Any = None,
    may_change: Sequence[str] = (),
) -> None:
    """Saves ``config`` at ``path`` (local or ``gs://``) on the first run; refuses to resume
    ``what`` with a different config (the differing fields are named). ``runtime`` (an
    ``experiment.RuntimeConfig``), for a ``config`` that is one section (the teacher's),
    is saved and compared with it under the key ``runtime``. A saved config that lacks a
    field or a whole section (written before it existed) resumes while the current value
    is the declared default.

    A run that never saved a step (no step folder in ``checkpoints``, by default the
    ``checkpoints`` folder beside ``path``: it failed or was stopped before its first
    checkpoint) has nothing to resume, so its config is replaced by the new one: a failed
    start does not bind the work directory to the config it failed with.

    ``may_change`` names dotted fields that a resumed run may change (e.g. the student's
    ``train.steps``: its schedules do not depend on it, so a run continued to more steps is
    the run asked for that many from the start); the saved config then takes their new
    values and the change is logged."""
    path = storage.path(path)
    current = configlib.to_dict(config)
    defaults = configlib.declared_defaults(config)
    if runtime is not None:
        current["runtime"] = configlib.to_dict(runtime)
        defaults["runtime"] = configlib.declared_defaults(runtime)
    if path.exists():
        saved = json.loads(path.read_text())
        changed = configlib.diff(saved, current, defaults=defaults)
        allowed = [c for c in changed if c.split(":", 1)[0] in may_change]
        changed = [c for c in changed if c not in allowed]
        if not changed:
            if allowed and is_chief():
                logger.info("%s: resuming %s with %s", path.parent, what, "; ".join(allowed))
            if saved != current and is_chief():
                # saved before fields (or the runtime section) existed, or a field that may
                # change did: record the values this run goes on with
                storage.write_text_atomic(path, json.dumps(current, indent=2, sort_keys=True))
            return
        if saved_steps(checkpoints if checkpoints is not None else path.parent / "checkpoints"):
            raise UserError(
                f"{path.parent} holds a {what} run with another config; changed fields: "
                + "; ".join(changed)
                + ". Use another --workdir (or name) or remove it."
            )
        if is_chief():
            logger.warning(
                "%s: no step of the earlier %s run was saved; starting over with "
                "the new config (changed fields: %s)",
                path.parent,
                what,
                "; ".join(changed),
            )
    if is_chief():
        storage.write_text_atomic(path, json.dumps(current, indent=2, sort_keys=True))


def saved_steps(directory: storage.PathLike) -> list[str]:
    """Names of the step folders in a checkpoint directory, finished or not (Orbax writes a
    step into ``STEP.orbax-checkpoint-tmp-*`` on local disk and renames it when done)."""
    directory = storage.path(directory)
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.split(".")[0].isdigit())


def prepared_dir(config: ExperimentConfig, workdir: storage.PathLike):
    """The prepared dataset of a run: ``data.prepared``, else ``WORKDIR/data``. It must be
    local: its array_record files are read through grain / ``tfds.data_source``, which
    open local files only."""
    where = config.data.prepared if config.data.prepared else storage.path(workdir) / "data"
    return storage.require_local(
        where,
        "the prepared dataset",
        "copy it to local disk on every host (e.g. `gcloud storage cp -r "
        f"{where} ~/data/`, or run `distill-jax prepare` on every host: it is deterministic) "
        "and point data.prepared at the copy (--set data.prepared=PATH)",
    )


def compute_dtype(config: ExperimentConfig):
    try:
        return COMPUTE_DTYPES[config.train.compute_dtype]
    except KeyError:
        raise UserError(
            f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got "
            f"{config.train.compute_dtype!r}"
        ) from None


def data_shards(mesh) -> int:
    """How many ways the batch dimension is split (data * fsdp)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """Appends metrics records to ``metrics.jsonl``; only process 0 writes (TensorBoard
    event files: ``observe.TensorBoardCallback``)."""

    def __init__(self, directory: storage.PathLike):
        directory = storage.path(directory)
        self.path = directory / "metrics.jsonl"
        self._lines = storage.LineLog(self.path)
        self.enabled = is_chief()
        # (sums, target tokens) of the log window a resumed checkpoint was saved in
        self.resumed_window: tuple[dict, float] | None = None
        if self.enabled and not storage.is_remote(directory):
            storage.makedirs(directory)

    def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {
            "step": int(step),
            "split": split,
            "time": time.time(),
            **{k: float(v) for k, v in values.items()},
        }
        self._lines.append(json.dumps(record))

    def records(self, split: str) -> list[dict]:
        """The records of ``split`` in the log, in order ([] when it cannot be read here)."""
        if not self.path.exists():
            return []
        records = (json.loads(line) for line in self._lines.lines())
        return [r for r in records if r["split"] == split]

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (left by a run killed after its last checkpoint), so a
        resumed run's log reads as one run."""
        if not self.enabled or not self.path.exists():
            return
        self._lines.replace(
            [line for line in self._lines.lines() if json.loads(line)["step"] <= step]
        )


def add_metrics(total: dict | None, metrics: Mapping[str, Any]) -> dict:
    """Accumulates (sum, count) pairs on the host."""
    metrics = jax.device_get(dict(metrics))
    if total is None:
        return {k: (float(s), float(c)) for k, (s, c) in metrics.items()}
    return {k: (total[k][0] + float(s), total[k][1] + float(c)) for k, (s, c) in metrics.items()}


def progress(total: int, initial: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        dynamic_ncols=True,
        disable=disable or not is_chief(),
        file=sys.stderr,
        smoothing=0.1,
    )


# ----------------------------------------------------------------------------- the loop


def resume(
    checkpoints: Any,
    state: Any,
    shardings: Any,
    batches: Any,
    log: MetricsLog,
    early_stopping: EarlyStopping | None = None,
) -> Any:
    """Restores the latest checkpoint, if any, onto ``shardings`` (any mesh): the state,
    the data iterator's position, a metrics log without the steps after it and the
    ``early_stopping`` count (rebuilt from the log's validations for a checkpoint saved
    without one)."""
    from distill_jax import sharding

    latest = checkpoints.latest_step()
    if latest is None:
        log.truncate_after(0)  # records of a run stopped before its first checkpoint
        return state
    state, extra = checkpoints.restore(latest, sharding.abstract_with_shardings(state, shardings))
    batches.set_state(extra["data"])
    log.truncate_after(latest)
    if early_stopping is not None:
        if extra.get("early_stop") is not None:
            early_stopping.load(extra["early_stop"])
        else:  # saved without early stopping: count its validations from the log
            early_stopping.replay(log.records("valid"))
    # The training-log window open at the checkpoint (sums of the steps since the last
    # record): the first record after the resume then averages the same steps as an
    # uninterrupted run's. (Checkpoints written before it was saved start a new window.)
    window = extra.get("log_window")
    log.resumed_window = (
        None
        if window is None
        else (
            {k: (float(s), float(c)) for k, (s, c) in window["sums"].items()},
            float(window["tokens"]),
        )
    )
    return state


def evaluate_split(
    eval_step: Callable, params: Any, pipeline: Any, to_device: Callable[[dict], dict]
) -> dict:
    """(sum, count) metrics of ``eval_step`` over one pass of ``pipeline``, on the host."""
    total = None
    for i in range(pipeline.batches_per_epoch):
        total = add_metrics(total, eval_step(params, to_device(pipeline.load_batch(i))))
    return total


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a training loop stops, logs, validates and saves (in steps)."""

    total_steps: int  # train up to this step
    eval_every: int  # validate every N steps (and at the end)
    save_every: int  # checkpoint every N steps (and at the end, and on preemption)
    log_every: int = 10  # one training-log record per N steps
    # stop before total_steps once this many validations in a row have not improved the
    # checkpoints' keep-best metric (EarlyStopping); 0 = always train to total_steps
    patience: int = 0


@dataclasses.dataclass
class EarlyStopping:
    """Stops a loop once ``patience`` validations in a row have not improved ``metric``
    ("max": higher is better; a tie is no improvement). Its state travels in every
    checkpoint, so a resumed run counts what the uninterrupted one would, and a run that
    stopped stays stopped until it is given more patience."""

    metric: str
    patience: int
    mode: str = "max"
    best: float | None = None  # the best value so far ...
    best_step: int | None = None  # ... and the step that reached it
    stale: int = 0  # validations since the best one

    def update(self, step: int, values: Mapping[str, float]) -> bool:
        """Counts the validation of ``step``; returns whether the run should stop."""
        value = float(values[self.metric])
        better = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        if better:
            self.best, self.best_step, self.stale = value, int(step), 0
        else:
            self.stale += 1
        return self.exhausted

    @property
    def exhausted(self) -> bool:
        """Whether ``patience`` validations in a row have not improved the best."""
        return self.patience > 0 and self.stale >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "stale": self.stale}

    def load(self, state: Mapping[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        self.stale = int(state["stale"])

    def replay(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Rebuilds the state from the validation records of a run whose checkpoints
        predate early stopping (``metrics.jsonl``'s "valid" records, in step order)."""
        self.best, self.best_step, self.stale = None, None, 0
        for record in records:
            if self.metric in record:
                self.update(int(record["step"]), record)

    def reason(self) -> str:
        """Why the run stopped, in words."""
        return (
            f"no better validation {self.metric} in {self.stale} validations after step "
            f"{self.best_step} ({self.best:.4g}; patience {self.patience})"
        )


class Callback:
    """Hooks into :class:`TrainLoop` (every method is a no-op here: override the ones you
    need). ``step`` is the number of updates done, 1 after the first; the loop calls, in
    order: ``on_step_begin`` before an update, ``on_step_end`` after it, ``on_train_log``
    with each training-log record, ``on_eval`` with each validation's values (before the
    checkpoint of that step), ``on_end`` once the loop stops (finished or preempted)."""

    def on_step_begin(self, step: int) -> None:
        """Before update ``step + 1`` is computed (e.g. start a profiler trace)."""

    def on_step_end(self, step: int, state: Any, metrics: Mapping[str, Any]) -> None:
        """After update ``step``: its (sum, count) metrics, on the host."""

    def on_train_log(self, step: int, values: Mapping[str, float]) -> None:
        """The training-log record written at ``step`` (means over the log window)."""

    def on_eval(self, step: int, values: Mapping[str, float], state: Any) -> None:
        """The validation values logged at ``step``."""

    def on_end(self, step: int, state: Any) -> None:
        """The loop stopped at ``step``."""


@dataclasses.dataclass
class TrainLoop:
    """The resumable training loop: runs ``train_step`` from ``state.step`` up to
    ``schedule.total_steps`` (see :meth:`run`).

    ``train_step(state, device_batch, rng) -> (state, metrics)``; ``batches`` yields host
    batches (with ``tgt_out``), ``to_device`` makes their device arrays and ``data_state()``
    is the iterator position checkpointed with the state. ``evaluate(state, step)`` gives
    the validation values (None: no validation)."""

    train_step: Callable[[Any, dict, jax.Array], tuple[Any, dict]]
    batches: Iterator[dict]
    to_device: Callable[[dict], dict]
    data_state: Callable[[], dict]
    rng: jax.Array  # the base dropout key (train.make_train_step folds the step in)
    checkpoints: Any  # checkpoint.Checkpointer (or anything with its methods)
    log: MetricsLog
    schedule: Schedule
    evaluate: Callable[[Any, int], dict[str, float]] | None = None
    desc: str = "train"  # progress bar and message label
    no_progress: bool = False
    callbacks: Sequence[Callback] = ()
    # stops the loop before schedule.total_steps (its state is checkpointed with the run's)
    early_stopping: EarlyStopping | None = None

    @property
    def stopped_early(self) -> bool:
        """Whether ``early_stopping``'s patience is spent (the loop ends, or ended, there)."""
        return self.early_stopping is not None and self.early_stopping.exhausted

    def run(self, state: Any) -> Any:
        """Runs the loop; returns the last state.

        Every ``save_every`` steps (and at the end) the state and ``data_state()`` are
        checkpointed; every ``eval_every`` steps ``evaluate(state, step)`` is logged and,
        when it falls on a checkpoint step, handed to the checkpoint manager, which keeps
        the best checkpoint by its configured metric. Training metrics are logged every
        ``log_every`` steps; the open log window is checkpointed too, so that a resumed run
        logs what an uninterrupted one does.

        With ``early_stopping`` the loop ends at the validation that exhausts its patience
        (checkpointing that step, so a rerun finds it stopped), and at once when it was
        resumed already stopped; ``stopped_early`` then says so.

        A step whose loss or gradient norm is not finite stops the run with a
        ``UserError`` naming the step (checked every step: its metrics come to the host
        for the log window anyway); before each save the whole state is checked to be
        finite, so a checkpoint never holds a non-finite state. Pending saves are finished
        first, so the last good checkpoint is what a rerun resumes from.
        """
        schedule, log, checkpoints, desc = self.schedule, self.log, self.checkpoints, self.desc
        total_steps, log_every = schedule.total_steps, schedule.log_every
        start = int(jax.device_get(state.step))
        bar = progress(total_steps, start, desc, self.no_progress)
        window: dict | None = None
        tokens_since, time_since = 0.0, time.perf_counter()
        partial = False
        if log.resumed_window is not None:
            window, tokens_since = log.resumed_window
        elif start % log_every:
            partial = True  # resumed from a checkpoint that does not hold its log window
        step = start
        early = self.early_stopping
        while step < total_steps and not self.stopped_early:
            batch = next(self.batches)
            for callback in self.callbacks:
                callback.on_step_begin(step)
            state, metrics = self.train_step(state, self.to_device(batch), self.rng)
            step += 1
            metrics = jax.device_get(dict(metrics))
            _stop_if_not_finite(metrics, step, desc, checkpoints)
            for callback in self.callbacks:
                callback.on_step_end(step, state, metrics)
            window = add_metrics(window, metrics)
            tokens_since += float(np.count_nonzero(batch["tgt_out"]))
            if step % log_every == 0 or step == total_steps:
                values = {k: s / max(c, 1e-9) for k, (s, c) in window.items()}
                elapsed = time.perf_counter() - time_since
                values["target_tokens_per_s"] = (
                    tokens_since * jax.process_count() / max(elapsed, 1e-9)
                )
                if partial:  # averages only the steps since the resume
                    values["partial"] = 1.0
                    partial = False
                log.write(step, "train", values)
                for callback in self.callbacks:
                    callback.on_train_log(step, values)
                bar.set_postfix(
                    loss=f"{values['loss']:.3f}", tok_s=f"{values['target_tokens_per_s']:.0f}"
                )
                window, tokens_since, time_since = None, 0.0, time.perf_counter()
            bar.update(1)
            crash_point(f"step:{step}", settle=checkpoints.wait)
            eval_values = None
            if self.evaluate is not None and (
                step % schedule.eval_every == 0 or step == total_steps
            ):
                eval_values = self.evaluate(state, step)
                log.write(step, "valid", eval_values)
                if early is not None:
                    early.update(step, eval_values)
                for callback in self.callbacks:
                    callback.on_eval(step, eval_values, state)
                if is_chief():
                    bar.write(
                        f"[{desc}] step {step}: "
                        + ", ".join(f"{k} {v:.4g}" for k, v in eval_values.items())
                    )
            preempted = jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(
                step
            )
            if (
                step % schedule.save_every == 0
                or step == total_steps
                or preempted
                or self.stopped_early
            ):
                if not _state_is_finite(state):
                    _stop(
                        f"step {step}: the parameters or optimizer state hold values that "
                        "are not finite after this update",
                        desc,
                        checkpoints,
                    )
                runlock.check_held()  # (a gs:// lease lost to another run: stop, write nothing)
                # Validation metrics (when this step has them) feed the keep-best policy.
                log_window = (
                    None
                    if window is None
                    else {
                        "sums": {k: [s, c] for k, (s, c) in window.items()},
                        "tokens": tokens_since,
                    }
                )
                checkpoints.save(
                    step,
                    state,
                    extra={
                        "data": self.data_state(),
                        "log_window": log_window,
                        "early_stop": None if early is None else early.state(),
                    },
                    metrics=eval_values,
                    force=True,
                )
                crash_point(f"save:{step}")
            if self.stopped_early:
                logger.info("[%s] stopping at step %d: %s", desc, step, early.reason())
                break
            if preempted:
                # SIGTERM (TPU maintenance, scancel) reached every process at this step: the
                # checkpoint above lets the rerun resume exactly here.
                logger.warning("preemption notice at step %d: checkpointed, stopping", step)
                break
        bar.close()
        checkpoints.wait()
        for callback in self.callbacks:
            callback.on_end(step, state)
        return state


def _stop_if_not_finite(metrics: Mapping[str, Any], step: int, desc: str, checkpoints: Any) -> None:
    """Stops the run when step ``step``'s loss or gradient norm is not finite."""
    loss = float(metrics["loss"][0]) / max(float(metrics["loss"][1]), 1e-9)
    grad_norm = float(metrics["grad_norm"][0]) if "grad_norm" in metrics else 0.0
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        _stop(
            f"step {step}: the training loss is {loss:g} and the gradient norm {grad_norm:g}",
            desc,
            checkpoints,
        )


def _stop(what: str, desc: str, checkpoints: Any) -> None:
    checkpoints.wait()  # the saves started before this step are good: finish them
    latest = checkpoints.latest_step()
    kept = (
        f"the last good checkpoint, step {latest}, is kept (a rerun resumes from it)"
        if latest is not None
        else "no checkpoint was saved"
    )
    raise UserError(
        f"[{desc}] {what}: not finite. Training stopped without saving this state; {kept}. "
        "Lower the learning rate, clip gradients, or check the inputs (e.g. the soft-target "
        "cache)."
    )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _state_is_finite(state: Any) -> bool:
    """Whether every float of ``state`` is finite (one reduction on the devices)."""
    return bool(jax.device_get(_all_finite(state)))


CRASH_ENV = "DISTILL_JAX_CRASH_AT"


def crash_point(name: str, settle: Callable[[], None] | None = None) -> None:
    """For crash tests (tests/crash_matrix.py): kills this process with SIGKILL, like
    ``kill -9``, when ``name`` is in the comma-separated ``DISTILL_JAX_CRASH_AT`` (after
    ``settle()``, which finishes the writes in flight: a kill *between* writes). Names:
    ``step:N`` (after update N, the earlier saves finished, nothing of step N saved),
    ``save:N`` (right after the asynchronous checkpoint save of step N started: its files
    are being written), ``chunk:N`` (``soft-targets``: right after the N-th chunk write
    of the run started), ``chunk-start:N`` (``soft-targets``: the earlier chunks stored,
    before the N-th chunk of the run is computed)."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted and name in wanted.split(","):
        if settle is not None:
            settle()
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
