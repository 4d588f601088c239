"""Provenance of soft targets (#34 item 1): which fine-tuned teacher checkpoint a command
uses, refusing an unfinished teacher run unless a step is asked for, and refusing a
soft-target cache made from another checkpoint than the one selected now."""

import json
import re
import shutil

import jax.numpy as jnp
import pytest

from distill_jax import cli, configlib, trainer
from distill_jax import teacher as teacher_lib
from distill_jax.errors import UserError

import tiny_experiment

CONFIG = "configs/tiny.py"


def _config(steps=4):
    return configlib.override(
        configlib.load_config_file(CONFIG), [f"teacher.steps={steps}", "teacher.save_every=2"]
    )


def _teacher_run(workdir, config, top1, losses=None):
    """A teacher checkpoint folder as train-teacher leaves it: a step per validation stride
    top-1 in ``top1`` (the masked-token loss of each step from ``losses``, or 1 - top-1)."""
    directory = workdir / "teacher" / "checkpoints"
    with trainer.checkpointer(directory, teacher_lib.checkpoint_policy(config)) as manager:
        for step, value in top1.items():
            loss = (losses or {}).get(step, 1.0 - value)
            manager.save(
                step,
                {"w": jnp.full((3,), float(step))},
                extra={"data": {"position": step}},
                metrics={"loss": loss, "stride_top1": value},
                force=True,
            )
    return directory


def test_a_finished_run_gives_its_best_checkpoint(tmp_path):
    config = _config()
    _teacher_run(tmp_path, config, {2: 0.7, 4: 0.6})
    chosen = teacher_lib.select_finetuned(config, tmp_path)
    assert (chosen.step, chosen.saved_steps, chosen.explicit) == (2, (2, 4), False)
    assert re.fullmatch(r"[0-9a-f]{64}", chosen.digest)
    # The digest is the checkpoint's: the same when read again, another for another step.
    assert teacher_lib.select_finetuned(config, tmp_path).digest == chosen.digest
    assert teacher_lib.select_finetuned(config, tmp_path, 4).digest != chosen.digest


def test_the_best_checkpoint_is_the_best_stride_top1_not_the_lowest_loss(tmp_path):
    """Late in a long fine-tuning the masked-token loss can rise (overfitting) while the
    stride top-1, the accuracy of what the soft targets hold, still improves, or the other
    way round: the teacher's checkpoint is chosen, and kept, by the stride top-1."""
    config = _config(steps=8)
    directory = _teacher_run(
        tmp_path,
        config,
        {2: 0.60, 4: 0.75, 6: 0.70, 8: 0.72},
        losses={2: 2.0, 4: 1.5, 6: 1.2, 8: 1.1},
    )
    chosen = teacher_lib.select_finetuned(config, tmp_path)
    assert chosen.step == 4  # the lowest loss is step 8's
    # Kept: the last two (6, 8) and the best by stride top-1 (4); 2 is deleted.
    assert chosen.saved_steps == (4, 6, 8)
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [4, 6, 8]


def test_a_stride_top1_tie_goes_to_the_later_checkpoint(tmp_path):
    """Equal stride top-1 (the same count of right positions) at two steps: the later one,
    which trained longer, is kept and chosen."""
    config = _config(steps=8)
    _teacher_run(tmp_path, config, {2: 0.60, 4: 0.75, 6: 0.75, 8: 0.72})
    chosen = teacher_lib.select_finetuned(config, tmp_path)
    assert (chosen.step, chosen.saved_steps) == (6, (6, 8))


def test_the_digest_tells_apart_two_runs_at_the_same_step(tmp_path):
    config = _config()
    _teacher_run(tmp_path / "a", config, {2: 0.5, 4: 0.7})
    _teacher_run(tmp_path / "b", config, {2: 0.5, 4: 0.65})
    a = teacher_lib.select_finetuned(config, tmp_path / "a")
    b = teacher_lib.select_finetuned(config, tmp_path / "b")
    assert a.step == b.step == 4 and a.digest != b.digest


def test_an_unfinished_run_is_refused_unless_a_step_is_asked_for(tmp_path):
    config = _config(steps=6)
    _teacher_run(tmp_path, config, {2: 0.5, 4: 0.7})  # killed before step 6
    with pytest.raises(
        UserError,
        match=r"teacher run in .* has not finished: its last "
        r"checkpoint is step 4 of teacher.steps=6.*"
        r"--teacher-step 4",
    ):
        teacher_lib.select_finetuned(config, tmp_path)
    assert teacher_lib.select_finetuned(config, tmp_path, 2).step == 2
    with pytest.raises(
        UserError,
        match=r"--teacher-step 3: .* no checkpoint of that step "
        r"\(saved: 2, 4\)",
    ):
        teacher_lib.select_finetuned(config, tmp_path, 3)


def test_a_teacher_run_made_with_other_steps_is_refused(tmp_path):
    config = _config(steps=4)
    _teacher_run(tmp_path, config, {2: 0.5, 4: 0.7})
    (tmp_path / "teacher" / "config.json").write_text(json.dumps({"steps": 8}))
    with pytest.raises(
        UserError,
        match=r"made with teacher.steps=8 .* this command has "
        r"teacher.steps=4",
    ):
        teacher_lib.select_finetuned(config, tmp_path)


def test_no_teacher_run(tmp_path):
    with pytest.raises(UserError, match="no teacher checkpoint in .*`distill-jax train-teacher`"):
        teacher_lib.select_finetuned(_config(), tmp_path)
    assert not (tmp_path / "teacher").exists()  # nothing created while looking


def test_an_emptied_metadata_file_is_named(tmp_path):
    config = _config()
    directory = _teacher_run(tmp_path, config, {2: 0.5, 4: 0.7})
    (directory / "4" / "extra" / "metadata").write_text("")
    with pytest.raises(
        UserError,
        match=r"checkpoint .*checkpoints/4 is damaged: "
        r".*4/extra/metadata is not valid JSON",
    ):
        teacher_lib.select_finetuned(config, tmp_path)


# ----------------------------------------------------------------------------- end to end


TEACHER = [
    "--set",
    "teacher.steps=4",
    "--set",
    "teacher.save_every=2",
    "--set",
    "teacher.eval_every=2",
    "--set",
    "teacher.learning_rate=1e-3",
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_corpus):
    """The tiny experiment (the session's tiny corpus and teacher) with a finished 4-step
    teacher run (checkpoints 2 and 4)."""
    workdir = tmp_path_factory.mktemp("provenance") / "work"
    shutil.copytree(tiny_corpus.data, workdir / "data")
    teacher = tiny_corpus.teacher
    assert _cli(workdir, teacher, "train-teacher")[0] == 0
    return workdir, teacher


def _cli(workdir, teacher, command, *extra, capsys=None):
    """``distill-jax COMMAND`` in this process: (exit status, stdout, stderr)."""
    if capsys is not None:
        capsys.readouterr()
    status = cli.main(
        tiny_experiment.run_args(workdir, teacher, command, *TEACHER, *extra, config=CONFIG)
    )
    out = capsys.readouterr() if capsys is not None else None
    return status, out.out if out else "", out.err if out else ""


def _header(workdir):
    return json.loads((workdir / "soft_targets" / "train" / "header.json").read_text())


@pytest.mark.slow
def test_soft_targets_follow_the_teacher_checkpoint(experiment, capsys):
    """An unfinished teacher run (the last checkpoint lost, as after kill -9 between
    saves) is refused by soft-targets and online distillation; --teacher-step takes its
    checkpoint explicitly; once the run is finished that cache is refused by train-student,
    naming both checkpoints, and soft-targets remakes it from the selected one."""
    workdir, teacher = experiment
    config = configlib.override(
        configlib.load_config_file(CONFIG), [a for a in TEACHER if a != "--set"]
    )
    checkpoints = workdir / "teacher" / "checkpoints"
    final = teacher_lib.select_finetuned(config, workdir)
    assert final.step == 4 and final.saved_steps == (2, 4)
    shutil.move(checkpoints / "4", workdir / "step4")  # the run as if killed after step 2

    status, _, err = _cli(workdir, teacher, "soft-targets", capsys=capsys)
    assert (
        status == 2
        and "has not finished: its last checkpoint is step 2 of teacher.steps=4" in err
        and "--teacher-step 2" in err
    )
    assert not (workdir / "soft_targets" / "train").exists()
    status, _, err = _cli(
        workdir,
        teacher,
        "train-student",
        "--name",
        "online",
        "--set",
        "distill.kd=online",
        capsys=capsys,
    )
    assert status == 2 and "has not finished" in err
    assert not (workdir / "students" / "online" / "checkpoints").exists()

    status, out, err = _cli(
        workdir,
        teacher,
        "soft-targets",
        "--teacher-step",
        "2",
        "--chunk-rows",
        "512",
        capsys=capsys,
    )
    assert status == 0 and "from the teacher checkpoint step 2" in out
    assert "of an unfinished run: its last checkpoint is step 2 of teacher.steps=4" in err
    early = teacher_lib.select_finetuned(config, workdir, 2)
    assert (_header(workdir)["teacher_step"], _header(workdir)["teacher_digest"]) == (
        2,
        early.digest,
    )

    shutil.move(workdir / "step4", checkpoints / "4")  # the teacher run finished
    status, _, err = _cli(workdir, teacher, "train-student", capsys=capsys)
    assert status == 2, err
    assert (
        f"was made from teacher checkpoint step 2 (digest {early.digest[:12]}), but the "
        f"one selected now is teacher checkpoint step 4 (digest {final.digest[:12]})" in err
    )
    assert "`distill-jax soft-targets --force`" in err and "--teacher-step 2" in err
    assert not (workdir / "students" / "distilled" / "checkpoints").exists()

    status, out, _ = _cli(workdir, teacher, "soft-targets", "--chunk-rows", "512", capsys=capsys)
    assert status == 0 and "recomputing the soft targets" in out and "step 2" in out
    assert (_header(workdir)["teacher_step"], _header(workdir)["teacher_digest"]) == (
        4,
        final.digest,
    )
    status, out, _ = _cli(workdir, teacher, "soft-targets", capsys=capsys)
    assert status == 0 and "nothing to do" in out
    # Asking for the early checkpoint now refuses the cache made from the final one.
    status, _, err = _cli(workdir, teacher, "train-student", "--teacher-step", "2", capsys=capsys)
    assert status == 2 and "soft-targets --force --teacher-step 2" in err
    # An early checkpoint of a finished run, named on purpose: no warning of an unfinished run.
    status, out, err = _cli(
        workdir, teacher, "soft-targets", "--force", "--teacher-step", "2", capsys=capsys
    )
    assert status == 0 and "from the teacher checkpoint step 2" in out
    assert "unfinished" not in err and _header(workdir)["teacher_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["nan", "flip", "truncate"])
def test_damaged_cache_chunk_stops_train_student_before_training(experiment, capsys, damage):
    """NaN bytes, a flipped byte or a cut in one stored chunk: train-student exits 2
    naming the cache and the chunk, before any training step (no checkpoint, no results)."""
    import numpy as np

    workdir, teacher = experiment
    if _header_or_none(workdir) != 4:
        assert (
            _cli(workdir, teacher, "soft-targets", "--force", "--chunk-rows", "512", capsys=capsys)[
                0
            ]
            == 0
        )
    assert _header(workdir)["num_chunks"] > 2
    file = workdir / "soft_targets" / "train" / "logits" / "c" / "1" / "0"
    good = file.read_bytes()
    data = bytearray(good)
    if damage == "nan":
        data[-64:-48] = np.full(8, np.nan, np.float16).tobytes()
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) // 3]
    file.write_bytes(bytes(data))
    try:
        status, _, err = _cli(
            workdir, teacher, "train-student", "--name", f"bad-{damage}", capsys=capsys
        )
    finally:
        file.write_bytes(good)
    assert status == 2, err
    assert f"soft-target cache {workdir / 'soft_targets' / 'train'}: chunk 1 of logits" in err
    assert "soft-targets --force" in err
    run = workdir / "students" / f"bad-{damage}"
    assert not (run / "checkpoints").exists() and not (run / "results.json").exists()


def _header_or_none(workdir):
    try:
        return _header(workdir)["teacher_step"]
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_damaged_teacher_files_are_named(experiment, capsys, tmp_path):
    """#34 item 7 through the commands: an emptied checkpoint _METADATA and a truncated
    model.safetensors exit 2 naming the file."""
    workdir, teacher = experiment
    metadata = workdir / "teacher" / "checkpoints" / "4" / "state" / "_METADATA"
    good = metadata.read_bytes()
    metadata.write_bytes(b"")
    try:
        status, _, err = _cli(workdir, teacher, "soft-targets", "--force", capsys=capsys)
    finally:
        metadata.write_bytes(good)
    assert status == 2 and f"{metadata} is not valid JSON" in err, err

    broken = tmp_path / "broken-teacher"
    shutil.copytree(teacher, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    status = cli.main(
        [
            "train-teacher",
            "--config",
            CONFIG,
            "--workdir",
            str(tmp_path / "w"),
            "--set",
            f"teacher.checkpoint={broken}",
            "--set",
            f"data.prepared={workdir / 'data'}",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and f"{weights} is not a readable safetensors file" in err, err
