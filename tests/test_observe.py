"""distill_jax/observe.py: TensorBoard event files (tensorboardX, optional) and
jax.profiler traces of a window of training steps (--profile-steps A:B)."""

import argparse
import logging
import struct
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from distill_jax import observe
from distill_jax.errors import UserError

# ----------------------------------------------------------------------------- --profile-steps


def test_profile_steps_are_parsed():
    assert observe.parse_profile_steps("10:15") == (10, 15)
    assert observe.parse_profile_steps("0:1") == (0, 1)


@pytest.mark.parametrize(
    "value, message",
    [
        ("5:2", "the first step A must be below B"),
        ("3:3", "the first step A must be below B"),
        ("-1:4", "not negative"),
        ("2:-4", "not negative"),
        ("a:b", "is not A:B (two integers"),
        ("1.5:3", "is not A:B"),
        ("7", "is not A:B"),
        ("", "is not A:B"),
    ],
)
def test_a_bad_window_stops_the_command_with_exit_2(value, message, capsys):
    parser = argparse.ArgumentParser(prog="distill-jax train-student")
    observe.add_profile_argument(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([f"--profile-steps={value}"])  # (=: "-1:4" is not an option)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --profile-steps:" in err and message in err, err
    assert parser.parse_args([]).profile_steps is None


def _loop(profiler, first, last):
    """A tiny jitted training loop over steps [first, last), each named in the trace."""

    @jax.jit
    def step_fn(x):
        return jnp.tanh(x @ x.T) * 0.5

    x = jnp.ones((8, 8))
    for step in range(first, last):
        profiler.before_step(step)
        with jax.profiler.TraceAnnotation(f"distill_step_{step}_"):
            x = step_fn(x)
        profiler.after_step(step, x)
    profiler.close(x)


def _trace_bytes(directory) -> bytes:
    files = sorted(directory.rglob("*.xplane.pb"))
    assert len(files) == 1, sorted(directory.rglob("*"))
    return files[0].read_bytes()


def test_the_window_of_steps_is_traced_and_nothing_else(tmp_path):
    profiler = observe.StepProfiler((2, 4), tmp_path / "run")
    _loop(profiler, 0, 6)
    assert profiler.traced == [2, 3]
    trace = _trace_bytes(tmp_path / "run" / "profile")
    assert b"distill_step_2_" in trace and b"distill_step_3_" in trace
    for outside in (0, 1, 4, 5):
        assert f"distill_step_{outside}_".encode() not in trace


def test_a_run_resumed_inside_the_window_or_ending_in_it_is_traced_to_its_end(tmp_path):
    resumed = observe.StepProfiler((2, 5), tmp_path / "resumed")
    _loop(resumed, 3, 8)
    assert resumed.traced == [3, 4]
    ended = observe.StepProfiler((4, 100), tmp_path / "ended")
    _loop(ended, 0, 6)  # the loop stops at step 5: close() ends the trace
    assert ended.traced == [4, 5]
    assert b"distill_step_5_" in _trace_bytes(tmp_path / "ended" / "profile")


def test_no_window_traces_nothing_and_a_window_out_of_reach_is_refused(tmp_path):
    idle = observe.StepProfiler(None, tmp_path / "idle")
    _loop(idle, 0, 3)
    idle.check(0, 3)
    assert idle.traced == [] and not (tmp_path / "idle").exists()
    with pytest.raises(
        UserError,
        match=r"--profile-steps 8:10: the run's steps are 0 to 7, "
        "so nothing would be traced",
    ):
        observe.StepProfiler((8, 10), tmp_path).check(0, 8)
    with pytest.raises(UserError, match="steps are 6 to 7"):
        observe.StepProfiler((2, 5), tmp_path).check(6, 8)  # resumed past the window
    observe.StepProfiler((7, 10), tmp_path).check(0, 8)


# ----------------------------------------------------------------------------- TensorBoard


def test_without_tensorboardx_the_writer_does_nothing_and_says_so_once(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # an import of it fails
    monkeypatch.setattr(observe, "_notified", set())
    with caplog.at_level(logging.INFO, logger="distill_jax.observe"):
        for run in ("a", "b"):
            writer = observe.TensorBoardWriter(tmp_path / run)
            writer.scalars(1, "train", {"loss": 1.0})
            writer.samples(1, ["s"], ["h"], ["r"])
            writer.close()
            assert not writer.active
    notices = [r.getMessage() for r in caplog.records if "tensorboardX" in r.getMessage()]
    assert notices == [
        "tensorboardX is not installed: no TensorBoard event files "
        '(pip install -e ".[tensorboard]" adds them)'
    ]
    assert not (tmp_path / "a" / "tensorboard").exists()


def test_a_disabled_writer_is_silent(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="distill_jax.observe"):
        writer = observe.TensorBoardWriter(tmp_path, enabled=False)  # (not process 0)
        writer.scalars(1, "train", {"loss": 1.0})
    assert not writer.active and not caplog.records
    assert not (tmp_path / "tensorboard").exists()


def _events(directory):
    """Every event of the event files in ``directory`` (TFRecord framing: length, its
    CRC, the serialized Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_scalars_and_sample_translations_are_written(tmp_path):
    pytest.importorskip("tensorboardX")
    writer = observe.TensorBoardWriter(tmp_path / "run")
    assert writer.active
    writer.scalars(10, "train", {"loss": 2.5, "learning_rate": 1e-3})
    writer.scalars(20, "valid", {"bleu": 12.25})
    writer.samples(20, ["ein hund | läuft"], ["a dog runs"], ["a dog is running"])
    writer.close()
    events = _events(tmp_path / "run" / "tensorboard")
    scalars = {
        (e.step, v.tag): v.simple_value
        for e in events
        for v in e.summary.value
        if v.HasField("simple_value")
    }
    assert scalars == {
        (10, "train/loss"): 2.5,
        (10, "train/learning_rate"): pytest.approx(1e-3),
        (20, "valid/bleu"): 12.25,
    }
    texts = [
        (e.step, v.tag, v.tensor.string_val[0].decode())
        for e in events
        for v in e.summary.value
        if v.HasField("tensor")
    ]
    assert texts == [
        (
            20,
            "valid/samples/text_summary",
            "| source | hypothesis | reference |\n|---|---|---|\n"
            "| ein hund \\| läuft | a dog runs | a dog is running |",
        )
    ]


def test_a_resumed_run_hides_the_events_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboardX")
    observe.TensorBoardWriter(tmp_path, resume_step=4).close()
    starts = [e for e in _events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in starts] == [(5, 1)]  # START at step 5


def test_samples_table_needs_one_of_each_per_row():
    with pytest.raises(ValueError, match="2 sources, 1 hypotheses and 2 references"):
        observe.samples_table(["a", "b"], ["x"], ["r", "s"])


# ----------------------------------------------------------------------------- loop hooks


class _State(NamedTuple):
    step: jax.Array
    x: jax.Array


class _Checkpoints:
    """What TrainLoop needs of a checkpoint manager (nothing is written)."""

    def save(self, *args, **kwargs):
        pass

    def wait(self):
        pass

    def latest_step(self):
        return None


def _train_loop(tmp_path, total_steps, callbacks, *, eval_every=100):
    """distill_jax.runner.TrainLoop on a tiny jitted update, with ``callbacks``."""
    from distill_jax import runner

    @jax.jit
    def train_step(state, batch, rng):
        with jax.profiler.TraceAnnotation("update"):
            x = jnp.tanh(state.x @ state.x.T) * 0.5
        loss = jnp.sum(x)
        return _State(state.step + 1, x), {"loss": (loss, jnp.float32(1.0))}

    batches = iter(lambda: {"tgt_out": jnp.ones((2, 3))}, None)
    loop = runner.TrainLoop(
        train_step=train_step,
        batches=batches,
        to_device=lambda b: b,
        data_state=dict,
        rng=jax.random.key(0),
        checkpoints=_Checkpoints(),
        log=runner.MetricsLog(tmp_path),
        schedule=runner.Schedule(
            total_steps=total_steps, eval_every=eval_every, save_every=100, log_every=2
        ),
        evaluate=lambda state, step: {"bleu": float(step)},
        no_progress=True,
        callbacks=callbacks,
    )
    return loop.run(_State(jnp.int32(0), jnp.ones((8, 8))))


def test_the_profile_callback_traces_the_window_of_a_training_loop(tmp_path):
    profiler = observe.StepProfiler((1, 3), tmp_path / "run")
    _train_loop(tmp_path, 5, [observe.ProfileCallback(profiler)])
    assert profiler.traced == [1, 2]  # the updates from state step 1 to 3
    assert _trace_bytes(tmp_path / "run" / "profile").count(b"update") >= 1
    ended = observe.StepProfiler((3, 9), tmp_path / "ended")
    _train_loop(tmp_path / "e", 5, [observe.ProfileCallback(ended)])
    assert ended.traced == [3, 4]  # the loop's end closes the trace


class _Recorder:
    """A TensorBoardWriter stand-in that records the calls."""

    def __init__(self):
        self.calls = []

    def scalars(self, step, split, values):
        self.calls.append(("scalars", step, split, dict(values)))

    def samples(self, step, sources, hypotheses, references):
        self.calls.append(("samples", step, list(sources), list(hypotheses), list(references)))

    def flush(self):
        pass

    def close(self):
        self.calls.append(("close",))


def test_the_tensorboard_callback_logs_the_learning_rate_and_samples(tmp_path):
    writer = _Recorder()
    seen = []

    def samples(state, step):
        seen.append(int(state.step))
        return ["ein hund"], [f"a dog {step}"], ["a dog"]

    callback = observe.TensorBoardCallback(
        writer, learning_rate=lambda count: jnp.float32(0.5 * count), samples=samples
    )
    _train_loop(tmp_path, 4, [callback], eval_every=2)
    train = [
        (c[1], c[3]["learning_rate"])
        for c in writer.calls
        if c[:1] == ("scalars",) and c[2] == "train"
    ]
    assert train == [(2, 0.5), (4, 1.5)]  # update N used the schedule's value at count N-1
    assert [c[1:] for c in writer.calls if c[0] == "samples"] == [
        (2, ["ein hund"], ["a dog 2"], ["a dog"]),
        (4, ["ein hund"], ["a dog 4"], ["a dog"]),
    ]
    assert [c[1:] for c in writer.calls if c[:1] == ("scalars",) and c[2] == "valid"] == [
        (2, "valid", {"bleu": 2.0}),
        (4, "valid", {"bleu": 4.0}),
    ]
    assert seen == [2, 4] and writer.calls[-1] == ("close",)
    # An inactive writer (not process 0, no tensorboardX) still has the samples computed:
    # a translation is a computation of the whole job.
    seen.clear()
    quiet = observe.TensorBoardCallback(
        observe.TensorBoardWriter(tmp_path, enabled=False), samples=samples
    )
    _train_loop(tmp_path / "quiet", 2, [quiet], eval_every=2)
    assert seen == [2]
