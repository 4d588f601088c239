"""The #34 run-safety fixes through the command line, on a tiny prepared corpus: two runs
on one run directory (item 3), a learning rate that blows up (item 4), a failed start
followed by the corrected command (item 6)."""

import json
import subprocess
import time

import pytest

import tiny_experiment

pytestmark = pytest.mark.slow

CONFIG = "configs/tiny.py"


@pytest.fixture(scope="module")
def prepared(tiny_corpus):
    """(the folder of the session's tiny prepared corpus, ROOT/data; its teacher): read
    only, through data.prepared; every run directory is the test's own."""
    return tiny_corpus.data.parent, tiny_corpus.teacher


def _args(workdir, data, teacher, command, *extra):
    return tiny_experiment.run_args(
        workdir, teacher, command, "--set", f"data.prepared={data}", *extra
    )


def _cli(*args):
    return tiny_experiment.cli(*_args(*args), check=False)


def test_a_failed_start_does_not_poison_the_work_directory(prepared, tmp_path):
    root, teacher = prepared
    workdir = tmp_path / "work"
    missing = tmp_path / "no-such-teacher"
    failed = _cli(workdir, root / "data", missing, "train-teacher")
    assert failed.returncode == 2, failed.stderr
    assert str(missing) in failed.stderr
    fixed = _cli(
        workdir,
        root / "data",
        teacher,
        "train-teacher",
        "--set",
        "teacher.steps=1",
        "--set",
        "teacher.save_every=1",
        "--set",
        "teacher.eval_every=1",
    )
    assert fixed.returncode == 0, fixed.stderr
    assert "run with another config" not in fixed.stderr  # not refused ...
    assert "no step of the earlier train-teacher run was saved" in fixed.stderr  # ... noted
    saved = json.loads((workdir / "teacher" / "config.json").read_text())
    assert saved["checkpoint"] == str(teacher) and saved["steps"] == 1
    # Now that a step is saved, another config is refused, naming the field.
    changed = _cli(
        workdir,
        root / "data",
        teacher,
        "train-teacher",
        "--set",
        "teacher.steps=2",
        "--set",
        "teacher.save_every=1",
        "--set",
        "teacher.eval_every=1",
    )
    assert changed.returncode == 2 and "changed fields: steps: 1 -> 2" in changed.stderr


def test_a_second_run_on_the_same_run_directory_is_refused(prepared, tmp_path):
    root, teacher = prepared
    workdir = tmp_path / "work"
    common = ["--set", "distill.kd=none", "--set", "train.steps=4", "--name", "same"]
    first = subprocess.Popen(
        [*tiny_experiment.CLI, *_args(workdir, root / "data", teacher, "train-student", *common)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = workdir / "students" / "same" / ".lock"
    deadline = time.time() + 300
    while not (lock.exists() and lock.read_text()):
        assert first.poll() is None, first.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.1)
    second = _cli(workdir, root / "data", teacher, "train-student", *common)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert (
        f"students/same is in use by `train-student --name same` (pid {first.pid} " in second.stderr
    ), second.stderr
    lines = (workdir / "students" / "same" / "metrics.jsonl").read_text().splitlines()
    steps = [(r["step"], r["split"]) for r in map(json.loads, lines)]
    assert len(steps) == len(set(steps)), "records written twice"


def test_a_learning_rate_that_blows_up_stops_with_exit_2_and_no_results(prepared, tmp_path):
    root, teacher = prepared
    workdir = tmp_path / "work"
    result = _cli(
        workdir,
        root / "data",
        teacher,
        "train-student",
        "--set",
        "distill.kd=none",
        "--set",
        "train.schedule=constant",
        "--set",
        "train.learning_rate=1e30",
        "--set",
        "train.steps=8",
        "--set",
        "train.eval_every=8",
    )
    assert result.returncode == 2, result.stderr
    assert "not finite" in result.stderr and "step " in result.stderr
    run = workdir / "students" / "baseline"
    assert not (run / "results.json").exists()
    assert not list(run.glob("*.hyp.txt"))
    # Whatever checkpoint was kept holds finite values only.
    import jax
    import numpy as np

    from distill_jax import configlib
    from distill_jax.sharding import MeshConfig, make_mesh
    from distill_jax.student import load_trained

    steps = (
        [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
        if (run / "checkpoints").exists()
        else []
    )
    if steps:
        config = configlib.override(
            configlib.load_config_file(CONFIG), [f"data.prepared={root / 'data'}"]
        )
        _, params, _ = load_trained(config, workdir, "baseline", "latest", make_mesh(MeshConfig()))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
