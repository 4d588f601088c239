"""The Python API (distill_jax.api, docs/api.md): the runtime section of the config (fast),
and the whole method end to end in this process on the tiny config (slow): load a config
with overrides, train the teacher, extract its soft targets, train the student, load it by
name, translate (beam, greedy, sampling, n-best) and score a split."""

import dataclasses
import json
import os
import shutil
import struct

import jax
import pytest

import distill_jax as dj
from distill_jax import experiment, runner, runtime, train
from distill_jax import student as student_lib
from distill_jax.errors import UserError
from distill_jax.models import fast_paths

CONFIG = "configs/tiny.py"


# ----------------------------------------------------------------------------- runtime


def test_runtime_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("DISTILL_JAX_FAST_PATHS", raising=False)
    monkeypatch.delenv("DISTILL_JAX_HOST_MEMORY", raising=False)
    assert experiment.ExperimentConfig().runtime == experiment.RuntimeConfig(
        fast_paths=True, mask_by_bias=True, host_memory="keep", cpu_copy_region_analysis=True
    )
    monkeypatch.setenv("DISTILL_JAX_FAST_PATHS", "0")
    monkeypatch.setenv("DISTILL_JAX_HOST_MEMORY", "system")
    config = dj.load_config(CONFIG)
    assert (config.runtime.fast_paths, config.runtime.host_memory) == (False, "system")
    # --set wins over the environment
    config = dj.load_config(CONFIG, ["runtime.fast_paths=true"])
    assert config.runtime.fast_paths is True


def test_runtime_values_are_checked():
    with pytest.raises(UserError, match="runtime.host_memory must be one of"):
        dj.load_config(CONFIG, ["runtime.host_memory=sometimes"])


def test_runtime_apply_sets_the_fast_path_switches():
    jax.devices()  # (the host-memory mode is then left as it is)
    before = (fast_paths.ENABLED, fast_paths.MASK_BY_BIAS)
    try:
        runtime.apply(
            experiment.RuntimeConfig(
                fast_paths=False,
                mask_by_bias=False,
                host_memory=runtime.applied_host_memory() or "keep",
            )
        )
        assert (fast_paths.ENABLED, fast_paths.MASK_BY_BIAS) == (False, False)
        runtime.apply(
            experiment.RuntimeConfig(
                fast_paths=True, mask_by_bias=True, host_memory=runtime.applied_host_memory()
            )
        )
        assert (fast_paths.ENABLED, fast_paths.MASK_BY_BIAS) == (True, True)
    finally:
        fast_paths.configure(*before)


def test_the_compiler_option_follows_the_config():
    from distill_jax.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig())
    assert train.donated_state_compiler_options(mesh) == {
        "xla_cpu_copy_insertion_use_region_analysis": True
    }
    assert train.donated_state_compiler_options(mesh, False) == {}


def test_runtime_is_saved_with_the_run_and_compared_on_resume(tmp_path):
    config = dj.load_config(CONFIG)
    path = tmp_path / "students" / "s" / "config.json"
    runner.check_or_save_config(config, path, what="train-student")
    assert json.loads(path.read_text())["runtime"] == dataclasses.asdict(config.runtime)
    (path.parent / "checkpoints" / "2").mkdir(parents=True)  # a saved step: resumable
    changed = dataclasses.replace(
        config, runtime=dataclasses.replace(config.runtime, mask_by_bias=False)
    )
    with pytest.raises(UserError, match="runtime.mask_by_bias: True -> False"):
        runner.check_or_save_config(changed, path, what="train-student")
    # the teacher's config.json: its section's fields, and the runtime beside them
    teacher_path = tmp_path / "teacher" / "config.json"
    runner.check_or_save_config(
        config.teacher, teacher_path, what="train-teacher", runtime=config.runtime
    )
    saved = json.loads(teacher_path.read_text())
    assert saved["steps"] == config.teacher.steps and saved["runtime"]["fast_paths"] in (
        True,
        False,
    )
    (teacher_path.parent / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(UserError, match="runtime.cpu_copy_region_analysis: True -> False"):
        runner.check_or_save_config(
            config.teacher,
            teacher_path,
            what="train-teacher",
            runtime=dataclasses.replace(config.runtime, cpu_copy_region_analysis=False),
        )


@pytest.mark.parametrize("section", ["teacher", "student"])
def test_a_run_saved_before_the_runtime_section_resumes_with_its_defaults(tmp_path, section):
    """A work directory made before this change has config.json files without "runtime":
    they resume with the defaults, and a run that sets another value is refused, naming
    the field."""
    from distill_jax import configlib

    config = dj.load_config(CONFIG)
    run = tmp_path / section
    (run / "checkpoints" / "4").mkdir(parents=True)
    old = configlib.to_dict(config.teacher if section == "teacher" else config)
    old.pop("runtime", None)
    (run / "config.json").write_text(json.dumps(old))

    def check(cfg):
        if section == "teacher":
            runner.check_or_save_config(
                cfg.teacher, run / "config.json", what=section, runtime=cfg.runtime
            )
        else:
            runner.check_or_save_config(cfg, run / "config.json", what=section)

    check(config)  # the defaults: resumes
    assert "runtime" in json.loads((run / "config.json").read_text())  # recorded now
    (run / "config.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="runtime.mask_by_bias: None -> False"):
        check(dj.load_config(CONFIG, ["runtime.mask_by_bias=false"]))


def test_every_config_in_configs_loads_with_the_runtime_defaults():
    import glob

    for path in sorted(glob.glob("configs/*.py")):
        config = dj.load_config(path)
        assert config.runtime == experiment.RuntimeConfig(), path


# ----------------------------------------------------------------------------- end to end


class Recorder(runner.Callback):
    def __init__(self):
        self.steps, self.evals = [], []

    def on_step_end(self, step, state, metrics):
        self.steps.append(step)

    def on_eval(self, step, values, state):
        self.evals.append((step, dict(values)))


def _check_observers(run_dir, config, recorder):
    """--profile-steps 1:3 left a trace; the TensorBoard events hold every logged value,
    the schedule's learning rate and the validations' sample translations."""
    from tensorboardX.proto import event_pb2

    assert list((run_dir / "profile").rglob("*.xplane.pb")), "no profiler trace"
    events = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):  # TFRecord framing: length, CRC, Event, CRC
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    scalars = {
        (e.step, v.tag): v.simple_value
        for e in events
        for v in e.summary.value
        if v.HasField("simple_value")
    }
    schedule = student_lib.learning_rate_schedule(config)
    assert scalars[(4, "train/learning_rate")] == pytest.approx(float(schedule(3)))
    for step, values in recorder.evals:
        assert scalars[(step, "valid/bleu")] == pytest.approx(values["bleu"])
    texts = [
        (e.step, v.tensor.string_val[0].decode())
        for e in events
        for v in e.summary.value
        if v.HasField("tensor")
    ]
    assert [step for step, _ in texts] == [2, 4]
    assert texts[0][1].startswith("| source | hypothesis | reference |")


@pytest.mark.slow
def test_the_method_end_to_end_through_the_api(tmp_path, tiny_corpus):
    teacher_dir = tiny_corpus.teacher
    workdir = tmp_path / "work"
    shutil.copytree(tiny_corpus.data, workdir / "data")
    config = dj.load_config(
        CONFIG,
        [
            f"teacher.checkpoint={teacher_dir}",
            "teacher.steps=2",
            "teacher.eval_every=2",
            "teacher.save_every=2",
            "train.steps=4",
            "train.eval_every=2",
        ],
    )

    teacher = dj.train_teacher(config, str(workdir), no_progress=True)
    assert teacher.final_step == 2 and teacher.best_step == 2
    assert {"loss", "masked_accuracy", "stride_top1"} <= set(teacher.validation)
    assert teacher.directory == str(workdir / "teacher")

    cache = dj.extract_soft_targets(config, workdir, no_progress=True)
    assert (cache.split, cache.top_k, cache.teacher_step, cache.reused) == ("train", 4, 2, False)
    assert cache.num_examples > 0 and os.path.isdir(cache.path)
    assert dj.extract_soft_targets(config, workdir, no_progress=True).reused

    recorder = Recorder()
    run = dj.train_student(
        config, workdir, no_progress=True, callbacks=[recorder], profile_steps=(1, 3)
    )
    assert (run.name, run.final_step, run.finished) == ("distilled", 4, True)
    _check_observers(workdir / "students" / "distilled", config, recorder)
    assert recorder.steps == [1, 2, 3, 4] and [s for s, _ in recorder.evals] == [2, 4]
    assert run.validation == {k: v for k, v in recorder.evals[-1][1].items()}
    assert run.results["teacher"]["checkpoint_step"] == 2
    again = dj.train_student(config, workdir, no_progress=True)  # finished: nothing to redo
    assert again.results == run.results

    student = dj.Student.load(config, workdir, "distilled")
    sources = ["ein hund läuft über die wiese .", "zwei männer spielen fußball ."]
    beam = student.translate(sources)
    assert len(beam) == 2 and all(isinstance(t, str) for t in beam)
    greedy = student.translate(sources, method="greedy")
    assert len(greedy) == 2 and all(isinstance(t, str) for t in greedy)
    sampled = student.translate(sources, method="sample", top_p=0.9, seed=3)
    assert sampled == student.translate(sources, method="sample", top_p=0.9, seed=3)
    nbest = student.translate(sources, nbest=2)
    assert [len(h) for h in nbest] == [2, 2] and nbest[0][0].text == beam[0]
    with pytest.raises(UserError, match="top_p"):
        student.translate(sources, top_p=0.5)  # beam search does not sample
    with pytest.raises(UserError, match="decode.beam_size"):
        student.translate(sources, beam_size=0)

    # The split's score is the run's (the same best checkpoint, the same decoding).
    scores = student.score("test2016")
    assert scores["bleu"] == run.results["splits"]["test2016"]["bleu"]
    hypotheses = (workdir / "students" / "distilled" / "test2016.hyp.txt").read_text()
    assert "".join(h + "\n" for h in scores["hypotheses"]) == hypotheses
    references = (tiny_corpus.corpus / "test2016.en").read_text().splitlines()
    assert dj.score(scores["hypotheses"], references, lowercase=True)["bleu"] == pytest.approx(
        scores["bleu"]
    )
    with pytest.raises(UserError, match="no split 'nope'"):
        student.score("nope")
    assert jax.process_count() == 1


@pytest.mark.slow
def test_a_finished_student_trains_on_with_more_steps_or_until_val_stops_improving(
    tmp_path, tiny_corpus
):
    """#35: train.steps (and train.patience) may grow on resume, since the student's
    schedules do not depend on them; the earlier results are set aside, never deleted; a
    run is never cut back; patience stops the run once val BLEU stops improving."""
    workdir = tmp_path / "work"
    shutil.copytree(tiny_corpus.data, workdir / "data")
    sets = [
        f"teacher.checkpoint={tiny_corpus.teacher}",
        "distill.kd=none",
        "train.eval_every=2",
        "train.save_every=2",
    ]
    short = dj.load_config(CONFIG, [*sets, "train.steps=4"])
    first = dj.train_student(short, workdir, no_progress=True)
    out = workdir / "students" / "baseline"
    assert first.finished and first.results["trained_steps"] == 4
    assert first.results["stopped_early"] is None and first.results["patience"] == 0
    assert first.results["code"] == runner.code_version()  # the code that trained it
    before = {p.name: p.read_text() for p in [out / "results.json", *out.glob("*.hyp.txt")]}

    longer = dj.load_config(CONFIG, [*sets, "train.steps=8"])
    run = dj.train_student(longer, workdir, no_progress=True)
    assert run.finished and run.final_step == run.results["trained_steps"] == 8
    assert {p.name: p.read_text() for p in (out / "at_step_4").iterdir()} == before
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 8
    with pytest.raises(UserError, match="never cut back"):
        dj.train_student(short, workdir, no_progress=True)
    assert json.loads((out / "results.json").read_text()) == run.results

    patient = dj.load_config(CONFIG, [*sets, "train.steps=8", "train.patience=1"])
    run = dj.train_student(patient, workdir, name="patient", no_progress=True)
    # The stop, worked out from the logged validations: the first BLEU that is no better
    # than every earlier one ends the run (patience 1), else it trains all 8 steps.
    log = (workdir / "students" / "patient" / "metrics.jsonl").read_text().splitlines()
    valid = [json.loads(line) for line in log if json.loads(line)["split"] == "valid"]
    assert [r["step"] for r in valid] == list(range(2, run.final_step + 1, 2))
    bleus = [r["bleu"] for r in valid]
    stale = [i for i in range(1, len(bleus)) if bleus[i] <= max(bleus[:i])]
    expected = 2 * (stale[0] + 1) if stale else 8
    assert run.finished and run.final_step == run.results["trained_steps"] == expected
    assert (run.results["stopped_early"] is not None) == (expected < 8)
    if expected < 8:
        assert "patience 1" in run.results["stopped_early"]
    again = dj.train_student(patient, workdir, name="patient", no_progress=True)
    assert again.results == run.results and again.final_step == run.final_step
