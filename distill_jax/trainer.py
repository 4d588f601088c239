"""The training skeleton that the teacher's C-MLM fine-tuning and the student's training
share: sharded state, jitted train / eval steps, checkpoints, metrics log, resume and the
loop (``runner.TrainLoop``).

What differs between the two is a :class:`Task` (``teacher.training_task``,
``student.training_task``): the parameters' init function, optimizer, losses, batches,
validation summary, schedule and checkpoint policy. :class:`Trainer` turns a task into a
run in a directory::

    trainer = Trainer(task, mesh, directory, TrainerOptions(...))
    trainer.resume()        # the latest checkpoint, if any
    state = trainer.fit()   # up to task.schedule.total_steps
    trainer.close()

Hook into the loop with ``TrainerOptions.callbacks`` (``runner.Callback``: per step, per
training-log record, per validation, at the end). Every run also writes TensorBoard event
files (``observe.TensorBoardCallback``: the logged values, the learning rate, the task's
sample translations) when the ``tensorboard`` extra is installed, and traces the steps of
``TrainerOptions.profile_steps`` (``observe.ProfileCallback``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax import runner, sharding, storage, train


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """Which checkpoints a run keeps: the last ``keep_last`` plus the best by
    ``best_metric`` of the validation values (``best_mode`` "max" or "min")."""

    save_every: int
    keep_last: int
    best_metric: str
    best_mode: str


def checkpointer(directory: storage.PathLike, policy: CheckpointPolicy):
    """The ``checkpoint.Checkpointer`` of a run's ``checkpoints`` folder (local or gs://)."""
    from distill_jax import checkpoint

    return checkpoint.Checkpointer(
        checkpoint.CheckpointConfig(
            str(directory),
            save_every=policy.save_every,
            keep_last=policy.keep_last,
            best_metric=policy.best_metric,
            best_mode=policy.best_mode,
        )
    )


def abstract_init(
    module: Any, rng: jax.Array, num_inputs: int = 1, method: Callable | None = None
) -> Callable[[], Any]:
    """``() -> boxed params`` of a Flax module (for sharded creation): ``module.init`` on
    ``num_inputs`` dummy ``[1, 8]`` int32 id arrays, through ``method`` when given."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    inputs = (dummy,) * num_inputs
    if method is None:
        return lambda: module.init(rng, *inputs)["params"]
    return lambda: module.init(rng, *inputs, method=method)["params"]


@dataclasses.dataclass
class Task:
    """What one training run computes: everything teacher and student training differ in."""

    name: str  # the progress bar's and messages' label ("teacher", "student NAME")
    init_params: Callable[[], Any]  # () -> boxed params (abstract_init)
    optimizer: Any  # optax.GradientTransformation
    loss_fn: Callable  # train.LossFn of the training step
    eval_loss_fn: Callable  # train.LossFn of validation (deterministic)
    train_keys: tuple[str, ...]  # batch keys the training step reads
    eval_keys: tuple[str, ...]  # batch keys validation reads
    batches: Iterator[dict]  # training batches, with get_state / set_state
    valid: Any  # the validation BatchPipeline
    # (validation (sum, count) totals, params) -> the values logged and used for keep-best
    summarize: Callable[[dict, Any], dict[str, float]]
    schedule: runner.Schedule
    checkpoints: CheckpointPolicy
    rng: jax.Array  # the loop's base dropout key
    pretrained_params: Any = None  # placed over the initialised params (a loaded BERT)
    frozen: tuple[Any, Any] | None = None  # (params, shardings) every step reads, never updates
    learning_rate: Callable[[int], Any] | None = None  # the optimizer's schedule (update -> lr)
    # (state, step) -> (sources, hypotheses, references): a few validation translations
    # logged at each validation (TensorBoard)
    samples: Callable[[Any, int], tuple[Sequence[str], Sequence[str], Sequence[str]]] | None = None


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """How a task runs (not what it computes)."""

    compute_dtype: Any = jnp.float32  # activations' dtype (parameters stay float32)
    accum_steps: int = 1  # gradient-accumulation micro-batches per update
    cpu_copy_region_analysis: bool = True  # the train step's XLA option on CPUs (train.py)
    no_progress: bool = False  # no progress bar
    callbacks: Sequence[runner.Callback] = ()  # loop hooks (runner.Callback)
    # (A, B): a jax.profiler trace of steps A to B-1 into RUN_DIR/profile (--profile-steps)
    profile_steps: tuple[int, int] | None = None

    @classmethod
    def of(
        cls,
        config: Any,
        *,
        no_progress: bool = False,
        callbacks: Sequence[runner.Callback] = (),
        profile_steps: tuple[int, int] | None = None,
    ) -> TrainerOptions:
        """The options an experiment config sets (``train.compute_dtype``,
        ``train.accum_steps``, ``runtime.cpu_copy_region_analysis``)."""
        return cls(
            compute_dtype=runner.compute_dtype(config),
            accum_steps=config.train.accum_steps,
            cpu_copy_region_analysis=config.runtime.cpu_copy_region_analysis,
            no_progress=no_progress,
            callbacks=tuple(callbacks),
            profile_steps=profile_steps,
        )


class Trainer:
    """One task's run in ``directory`` (``checkpoints/`` and ``metrics.jsonl``) on ``mesh``:
    the state is born sharded, the steps are jitted once, :meth:`resume` restores the
    latest checkpoint and :meth:`fit` trains up to the schedule's last step."""

    def __init__(
        self,
        task: Task,
        mesh: Any,
        directory: storage.PathLike,
        options: TrainerOptions = TrainerOptions(),
    ):
        self.task, self.mesh, self.options = task, mesh, options
        self.directory = storage.path(directory)
        self.state, self.shardings = sharding.create_sharded_state(
            lambda: train.TrainState.create(task.init_params(), task.optimizer), mesh
        )
        if task.pretrained_params is not None:
            self.state = self.state.replace(
                params=sharding.place_tree(task.pretrained_params, self.shardings.params)
            )
        frozen_shardings = task.frozen[1] if task.frozen is not None else None
        self._train_step = train.make_train_step(
            task.loss_fn,
            task.optimizer,
            mesh,
            self.shardings,
            self._batch_shardings(task.train_keys),
            options=train.StepOptions(
                accum_steps=options.accum_steps,
                compute_dtype=options.compute_dtype,
                compiler_options=train.donated_state_compiler_options(
                    mesh, options.cpu_copy_region_analysis
                ),
            ),
            frozen_shardings=frozen_shardings,
        )
        self._eval_step = train.make_eval_step(
            task.eval_loss_fn,
            mesh,
            self.shardings.params,
            self._batch_shardings(task.eval_keys),
            compute_dtype=options.compute_dtype,
        )
        self.checkpoints = checkpointer(self.directory / "checkpoints", task.checkpoints)
        self.log = runner.MetricsLog(self.directory)
        # schedule.patience > 0: stop once the keep-best metric has stopped improving
        self.early_stopping = (
            runner.EarlyStopping(
                task.checkpoints.best_metric, task.schedule.patience, task.checkpoints.best_mode
            )
            if task.schedule.patience > 0
            else None
        )

    def _batch_shardings(self, keys: Sequence[str]) -> dict:
        return {k: sharding.batch_sharding(self.mesh) for k in keys}

    def device_batch(self, batch: dict, keys: Sequence[str]) -> dict:
        """The ``keys`` of a host batch as global arrays split over the batch axes."""
        return sharding.shard_batch({k: batch[k] for k in keys}, self.mesh)

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def resume(self) -> int:
        """Restores the latest checkpoint (state, data position, metrics log); returns the
        step the run continues from (0 when there is none)."""
        self.state = runner.resume(
            self.checkpoints,
            self.state,
            self.shardings,
            self.task.batches,
            self.log,
            self.early_stopping,
        )
        return self.step

    @property
    def stopped_early(self) -> bool:
        """Whether validation has stopped improving for ``schedule.patience`` validations
        (the run ends before ``schedule.total_steps``)."""
        return self.early_stopping is not None and self.early_stopping.exhausted

    def evaluate(self, state: Any, step: int) -> dict[str, float]:
        """The task's validation values for ``state`` (step ``step``)."""
        totals = runner.evaluate_split(
            self._eval_step,
            state.params,
            self.task.valid,
            lambda batch: self.device_batch(batch, self.task.eval_keys),
        )
        return self.task.summarize(totals, state.params)

    def fit(self) -> Any:
        """Trains from the current state up to ``task.schedule.total_steps`` (fewer when
        preempted or stopped early); returns the state."""
        from distill_jax import observe

        task = self.task
        first = self.step
        profiler = observe.StepProfiler(self.options.profile_steps, self.directory)
        profiler.check(first, task.schedule.total_steps)
        callbacks = [
            *self.options.callbacks,
            observe.TensorBoardCallback(
                observe.TensorBoardWriter(
                    self.directory, enabled=runner.is_chief(), resume_step=first or None
                ),
                learning_rate=task.learning_rate,
                samples=task.samples,
            ),
        ]
        if self.options.profile_steps is not None:
            callbacks.append(observe.ProfileCallback(profiler))
        step_fn = self._train_step
        if task.frozen is not None:
            frozen = task.frozen[0]
            step_fn = lambda state, batch, rng: self._train_step(state, batch, rng, frozen)  # noqa: E731
        loop = runner.TrainLoop(
            train_step=step_fn,
            batches=task.batches,
            to_device=lambda batch: self.device_batch(batch, task.train_keys),
            data_state=task.batches.get_state,
            rng=task.rng,
            checkpoints=self.checkpoints,
            log=self.log,
            schedule=task.schedule,
            evaluate=self.evaluate,
            desc=task.name,
            no_progress=self.options.no_progress,
            callbacks=callbacks,
            early_stopping=self.early_stopping,
        )
        self.state = loop.run(self.state)
        return self.state

    def close(self) -> None:
        """Finishes pending saves and closes the checkpoints."""
        self.checkpoints.close()
