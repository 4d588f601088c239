"""runner.TrainLoop and its resume, with a fake step and an in-memory checkpointer (fast):
a non-finite loss, gradient norm or state stops the run naming the step and saves nothing
of it (issue #34 item 4); the first training-log record after a resume equals an
uninterrupted run's (item 8); a run that never saved a step takes a new config (item 6)."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import runner, train
from distill_jax.errors import UserError

WALL_CLOCK = ("time", "target_tokens_per_s")  # the only fields allowed to differ


class Batches:
    """Batch ``i`` is ``{"x": value(i), "tgt_out": ...}``; its position is its state."""

    def __init__(self, value=lambda i: 1.0 + (i % 7) / 3):
        self.position, self.value = 0, value

    def __next__(self):
        i = self.position
        self.position += 1
        return {"x": np.float32(self.value(i)), "tgt_out": np.ones((2, 1 + i % 3), np.int32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


class Checkpoints:
    """In memory; ``extra`` goes through JSON as Orbax's JsonSave does."""

    def __init__(self):
        self.saved = {}

    def save(self, step, state, *, extra=None, metrics=None, force=False):
        self.saved[step] = (jax.device_get(state), json.loads(json.dumps(extra)))

    def latest_step(self):
        return max(self.saved) if self.saved else None

    def restore(self, step, abstract):
        state, extra = self.saved[step]
        return jax.tree.map(jnp.asarray, state), copy.deepcopy(extra)

    def wait(self):
        pass


def step_fn(state, batch, rng):
    """A toy update: w <- w * 0.9 + x; loss = x * w (summed over 3 tokens)."""
    x = jnp.asarray(batch["x"])
    w = state.params["w"] * 0.9 + x
    loss = x * w
    return (
        state.replace(step=state.step + 1, params={"w": w}),
        {"loss": (3 * loss, jnp.float32(3)), "grad_norm": (jnp.abs(w), jnp.float32(1))},
    )


def fresh_state():
    return train.TrainState(
        step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(())}, opt_state=()
    )


def run(
    directory,
    checkpoints,
    total,
    batches=None,
    stop_after=None,
    step=step_fn,
    callbacks=(),
    evaluate=None,
    eval_every=10**6,
    early_stopping=None,
    loops=None,
):
    """TrainLoop from the latest checkpoint; ``stop_after`` kills it (an exception)
    once that many batches were drawn. ``loops`` (a list) receives the loop."""
    log = runner.MetricsLog(directory)
    batches = batches or Batches()
    state = fresh_state()
    state = runner.resume(
        checkpoints,
        state,
        jax.tree.map(lambda x: x.sharding, state),
        batches,
        log,
        early_stopping,
    )

    class Killed(Exception):
        pass

    def draw():
        while True:
            if stop_after is not None and batches.position >= stop_after:
                raise Killed()
            yield next(batches)

    try:
        loop = runner.TrainLoop(
            train_step=step,
            batches=draw(),
            to_device=lambda b: b,
            data_state=batches.get_state,
            rng=jax.random.PRNGKey(0),
            checkpoints=checkpoints,
            log=log,
            schedule=runner.Schedule(total, eval_every=eval_every, save_every=4, log_every=10),
            evaluate=evaluate,
            desc="test",
            no_progress=True,
            callbacks=callbacks,
            early_stopping=early_stopping,
        )
        if loops is not None:
            loops.append(loop)
        return loop.run(state)
    except Killed:
        return None


def records(directory):
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines]


@pytest.mark.parametrize("killed_after", [13, 15, 19])
def test_first_record_after_a_resume_equals_an_uninterrupted_runs(tmp_path, killed_after):
    straight = tmp_path / "straight"
    run(straight, Checkpoints(), total=25)
    resumed, checkpoints = tmp_path / "resumed", Checkpoints()
    run(resumed, checkpoints, total=25, stop_after=killed_after)  # killed mid-window
    assert checkpoints.latest_step() % 10 != 0  # the resume point is inside a log window
    run(resumed, checkpoints, total=25)
    assert [r["step"] for r in records(straight)] == [10, 20, 25]
    assert records(resumed) == records(straight)  # byte-equal values, wall clock aside
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert set(json.loads(lines[0])) - set(records(straight)[0]) == set(WALL_CLOCK)


def test_resume_from_a_checkpoint_without_its_log_window_marks_the_record_partial(tmp_path):
    checkpoints = Checkpoints()
    run(tmp_path, checkpoints, total=25, stop_after=14)
    for _state, extra in checkpoints.saved.values():  # as written before #34
        extra.pop("log_window")
    run(tmp_path, checkpoints, total=25)
    marked = [r for r in records(tmp_path) if r.get("partial")]
    assert [r["step"] for r in marked] == [20]


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    checkpoints = Checkpoints()
    run(tmp_path, checkpoints, total=25, stop_after=3)
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "split": "train", "loss": 1}\n')
    run(tmp_path, checkpoints, total=25)
    assert [r["step"] for r in records(tmp_path)] == [10, 20, 25]


def poisoned(at, *, loss=True):
    """``step_fn`` whose step ``at`` has a NaN loss (or, with ``loss=False``, a finite loss
    and gradient norm but a NaN parameter)."""

    def step(state, batch, rng):
        new, metrics = step_fn(state, batch, rng)
        bad = int(new.step) == at
        if bad and loss:
            metrics["loss"] = (jnp.float32(np.nan), metrics["loss"][1])
        elif bad:
            new = new.replace(params={"w": jnp.float32(np.nan)})
        return new, metrics

    return step


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    checkpoints = Checkpoints()
    with pytest.raises(UserError) as info:
        run(tmp_path, checkpoints, total=25, step=poisoned(7))
    message = str(info.value)
    assert "step 7: the training loss is nan" in message and "not finite" in message
    assert "the last good checkpoint, step 4, is kept" in message
    assert sorted(checkpoints.saved) == [4]
    assert np.isfinite(checkpoints.saved[4][0].params["w"])


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    checkpoints = Checkpoints()
    with pytest.raises(UserError, match="step 8: the parameters or optimizer state hold"):
        run(tmp_path, checkpoints, total=25, step=poisoned(8, loss=False))
    assert sorted(checkpoints.saved) == [4]


def test_a_failed_start_does_not_bind_the_run_to_its_config(tmp_path):
    """check_or_save_config: a run with no saved step takes the new config; one with a
    saved step refuses it (item 6)."""
    from distill_jax.experiment import TeacherConfig

    path = tmp_path / "teacher" / "config.json"
    runner.check_or_save_config(TeacherConfig(checkpoint="/missing"), path, what="train-teacher")
    runner.check_or_save_config(TeacherConfig(checkpoint="/right"), path, what="train-teacher")
    assert json.loads(path.read_text())["checkpoint"] == "/right"
    (tmp_path / "teacher" / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
    with pytest.raises(UserError, match="changed fields: checkpoint: '/right' -> '/other'"):
        runner.check_or_save_config(TeacherConfig(checkpoint="/other"), path, what="train-teacher")


def test_callbacks_see_every_step_log_record_and_the_end(tmp_path):
    """The hook points (runner.Callback): one begin/end pair per update, the training-log
    records as written to metrics.jsonl, and the end."""

    class Recorder(runner.Callback):
        def __init__(self):
            self.begun, self.ended, self.logged, self.finished = [], [], [], []

        def on_step_begin(self, step):
            self.begun.append(step)

        def on_step_end(self, step, state, metrics):
            self.ended.append((step, int(state.step), sorted(metrics)))

        def on_train_log(self, step, values):
            self.logged.append((step, values["loss"]))

        def on_end(self, step, state):
            self.finished.append(step)

    recorder = Recorder()
    run(tmp_path, Checkpoints(), total=12, callbacks=[recorder])
    assert recorder.begun == list(range(12))
    assert recorder.ended == [(s, s, ["grad_norm", "loss"]) for s in range(1, 13)]
    assert [(r["step"], r["loss"]) for r in records(tmp_path)] == recorder.logged
    assert [s for s, _ in recorder.logged] == [10, 12] and recorder.finished == [12]


def test_validations_reach_the_log_the_callbacks_and_the_keep_best_policy(tmp_path):
    class Evals(runner.Callback):
        def __init__(self):
            self.seen = []

        def on_eval(self, step, values, state):
            self.seen.append((step, dict(values), int(state.step)))

    saved_metrics = {}

    class Recording(Checkpoints):
        def save(self, step, state, *, extra=None, metrics=None, force=False):
            saved_metrics[step] = metrics
            super().save(step, state, extra=extra, metrics=metrics, force=force)

    evals = Evals()
    run(
        tmp_path,
        Recording(),
        total=10,
        callbacks=[evals],
        eval_every=4,
        evaluate=lambda state, step: {"score": float(step) / 2},
    )
    assert evals.seen == [(4, {"score": 2.0}, 4), (8, {"score": 4.0}, 8), (10, {"score": 5.0}, 10)]
    valid = [r for r in records(tmp_path) if r["split"] == "valid"]
    assert [(r["step"], r["score"]) for r in valid] == [(4, 2.0), (8, 4.0), (10, 5.0)]
    # (saves every 4 steps and at the end: each with that step's validation values)
    assert saved_metrics == {4: {"score": 2.0}, 8: {"score": 4.0}, 10: {"score": 5.0}}


# ------------------------------------------------------------- early stopping (#35)

SCORES = {4: 1.0, 8: 3.0, 12: 2.0, 16: 3.0, 20: 4.0, 24: 2.0, 28: 1.0, 32: 1.0, 36: 0.5, 40: 0.5}


def scored(state, step):
    return {"score": SCORES[step]}


def test_early_stopping_counts_validations_without_a_strict_gain():
    early = runner.EarlyStopping("score", patience=2)
    assert not early.update(4, {"score": 1.0})
    assert not early.update(8, {"score": 3.0})
    assert not early.update(12, {"score": 2.0})  # 1 stale
    assert early.update(16, {"score": 3.0})  # a tie is no gain: 2 stale, stop
    assert (early.best, early.best_step, early.stale) == (3.0, 8, 2)
    assert "after step 8" in early.reason() and "patience 2" in early.reason()
    low = runner.EarlyStopping("loss", patience=1, mode="min")
    assert not low.update(1, {"loss": 2.0}) and not low.update(2, {"loss": 1.5})
    assert low.update(3, {"loss": 1.7})
    assert not runner.EarlyStopping("score", patience=0).update(1, {"score": 0.0})


def patient(directory, checkpoints, patience, **kw):
    """``run`` to 40 steps with validations every 4 (SCORES) and early stopping of
    ``patience``; returns (final state or None when killed, the EarlyStopping, the loop)."""
    early, loops = runner.EarlyStopping("score", patience=patience), []
    state = run(
        directory,
        checkpoints,
        total=40,
        eval_every=4,
        evaluate=scored,
        early_stopping=early,
        loops=loops,
        **kw,
    )
    return state, early, loops[0]


def test_the_loop_stops_when_validation_stops_improving_and_checkpoints_that_step(tmp_path):
    checkpoints = Checkpoints()
    state, _, loop = patient(tmp_path, checkpoints, 2)
    assert loop.stopped_early and int(state.step) == 16
    assert checkpoints.latest_step() == 16  # the stop is saved (save_every 4)
    assert checkpoints.saved[16][1]["early_stop"] == {"best": 3.0, "best_step": 8, "stale": 2}
    valid = [r["step"] for r in records(tmp_path) if r["split"] == "valid"]
    assert valid == [4, 8, 12, 16]
    # A rerun with the same patience finds it stopped and trains nothing ...
    state, _, loop = patient(tmp_path, checkpoints, 2)
    assert loop.stopped_early and int(state.step) == 16
    # ... one with more patience goes on from there, as if it had had it from the start
    state, more, _ = patient(tmp_path, checkpoints, 3)
    reference, once, _ = patient(tmp_path / "straight", Checkpoints(), 3)
    assert int(state.step) == int(reference.step) == 32  # 20 improved; 24, 28, 32 did not
    assert more.state() == once.state() == {"best": 4.0, "best_step": 20, "stale": 3}
    assert records(tmp_path) == records(tmp_path / "straight")


@pytest.mark.parametrize("killed_after", [6, 13, 15])
def test_a_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path, killed_after):
    reference, once, _ = patient(tmp_path / "straight", Checkpoints(), 2)
    checkpoints = Checkpoints()
    assert patient(tmp_path / "resumed", checkpoints, 2, stop_after=killed_after)[0] is None
    state, again, _ = patient(tmp_path / "resumed", checkpoints, 2)
    assert int(state.step) == int(reference.step) == 16
    assert again.state() == once.state()
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")


def test_checkpoints_saved_without_early_stopping_replay_the_logged_validations(tmp_path):
    checkpoints = Checkpoints()
    run(tmp_path, checkpoints, total=12, eval_every=4, evaluate=scored)  # no early stopping
    for _state, extra in checkpoints.saved.values():  # as written before train.patience
        extra.pop("early_stop", None)
    state, early, _ = patient(tmp_path, checkpoints, 2)
    assert int(state.step) == 16 and (early.best_step, early.stale) == (8, 2)
