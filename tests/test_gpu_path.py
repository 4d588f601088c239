"""The GPU path of docs/gpu.md, run on CPU with the tiny teacher and corpus:
scripts/gpu_pack.py -> scripts/gpu_teacher.sh (JAX on CPU, a few teacher steps, the
teacher stopped after its step-2 checkpoint as a run out of time would be) ->
scripts/gpu_unpack.py into a fresh work directory -> train-student with distill.kd=offline
on the returned caches; and the refusals of the unpack (a missing part, a damaged part, an
existing cache, another teacher), which exit with 2 and leave the work directory as it
was."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import tiny_experiment

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.py")
TEACHER_STEPS = 4  # planned; the run is stopped at step 3, after the step-2 checkpoint


def _run(args, cwd, env=None, timeout=1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _unpack(root, files, workdir, *extra) -> subprocess.CompletedProcess:
    return _run(
        [sys.executable, REPO / "scripts" / "gpu_unpack.py", files, workdir, *extra], cwd=root
    )


def _tree(path: pathlib.Path) -> dict:
    """Every file under ``path`` with its bytes (what a refusal must leave unchanged)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, tiny_corpus):
    """root (the stand-in for the repository root of both machines), the returned files and
    the GPU run's output."""
    root = tmp_path_factory.mktemp("gpu-path")
    packed = _run(
        [sys.executable, REPO / "scripts" / "gpu_pack.py", "--teacher", tiny_corpus.teacher]
        + ["--data", tiny_corpus.data, "--no-wheels"],
        cwd=root,
    )
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "fits" in packed.stdout
    manifest = json.loads((root / ".device" / "manifest.json").read_text())
    assert manifest["teacher"]["zeroed_embedding_rows"] > 0
    assert not (root / ".device" / "teacher-fp16" / "model.safetensors").exists()  # only .xz

    out = root / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        # kills train-teacher after update 3 (its step-2 checkpoint saved), as the budget would
        "DISTILL_JAX_CRASH_AT": "step:3",
    }
    result = _run(
        ["bash", REPO / "scripts" / "gpu_teacher.sh", "--config", CONFIG]
        + ["--workdir", root / "gpu-work", "--steps", TEACHER_STEPS, "--tokens", 512]
        + ["--every", 2, "--students", "", "--budget-s", 3000, "--part-mib", 0.01],
        cwd=root,
        env=env,
    )
    return root, out, result


def test_gpu_run_returns_caches_and_a_record_within_the_file_limits(gpu_run):
    root, out, result = gpu_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(out.iterdir())
    assert 3 <= len(files) <= 8
    assert all(f.is_file() and f.stat().st_size <= 16 << 20 for f in files)
    assert sum(f.stat().st_size for f in files) <= 64 << 20
    record = json.loads((out / "record.json").read_text())
    assert len(record["parts"]) >= 2  # split, so that a missing part can be tested
    assert record["status"] == "partial"  # the teacher was stopped before its last step
    teacher = record["teacher"]
    assert teacher["steps_planned"] == TEACHER_STEPS
    assert teacher["steps_reached"] == 2 and teacher["checkpoint_step"] == 2
    assert teacher["finished"] is False
    assert sorted(record["caches"]) == ["train", "val"]
    assert {"top1", "topk", "p_ref"} <= set(record["quality_val"])
    assert record["student_sets"] == [
        "teacher.checkpoint=.device/teacher-fp16",
        f"teacher.steps={TEACHER_STEPS}",
    ]
    assert record["device"]["backend"] == "cpu"
    assert {"train_teacher", "soft_targets_train", "soft_targets_val"} <= set(record["wall_s"])


def test_unpacked_caches_train_an_offline_student(gpu_run):
    root, out, _ = gpu_run
    workdir = root / "cpu-work"
    unpacked = _unpack(root, out, workdir)
    assert unpacked.returncode == 0, unpacked.stderr[-3000:]
    for split in ("train", "val"):
        assert (workdir / "soft_targets" / split / "header.json").is_file()
    assert (workdir / "data" / "dataset.json").is_file()
    assert not list(workdir.glob(".gpu-unpack-*"))

    trained = tiny_experiment.cli(
        *tiny_experiment.run_args(workdir, ".device/teacher-fp16", "train-student", config=CONFIG),
        *tiny_experiment.sets(
            f"teacher.steps={TEACHER_STEPS}",
            "distill.kd=offline",
            "train.steps=2",
            "train.eval_every=2",
            "train.save_every=2",
        ),
        "--name",
        "distilled",
        cwd=root,
        timeout=3600,
    )
    assert "cannot be checked against" in trained.stderr  # no teacher here: used as it is
    results = json.loads((workdir / "students" / "distilled" / "results.json").read_text())
    assert results["teacher"]["checkpoint_step"] == 2  # the GPU teacher's checkpoint


@pytest.mark.parametrize("damage", ["missing part", "damaged part", "another teacher"])
def test_unpack_refuses_bad_input_and_writes_nothing(gpu_run, tmp_path, damage):
    root, out, _ = gpu_run
    files = tmp_path / "files"
    shutil.copytree(out, files)
    extra = []
    if damage == "missing part":
        (files / "soft_targets.tar.gz.part01").unlink()
        named = "soft_targets.tar.gz.part01"
    elif damage == "damaged part":
        part = files / "soft_targets.tar.gz.part00"
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0x40
        part.write_bytes(bytes(data))
        named = "soft_targets.tar.gz.part00 is damaged: its SHA-256"
    else:  # a CPU config that expects another teacher than the GPU run trained
        extra = ["--set", f"teacher.steps={TEACHER_STEPS + 1}"]
        named = f"steps={TEACHER_STEPS + 1}"
    workdir = tmp_path / "work"
    refused = _unpack(root, files, workdir, *extra)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert named in refused.stderr
    assert not workdir.exists()


def test_unpack_never_overwrites_an_existing_cache(gpu_run, tmp_path):
    root, out, _ = gpu_run
    workdir = tmp_path / "work"
    assert _unpack(root, out, workdir).returncode == 0
    before = _tree(workdir)
    again = _unpack(root, out, workdir)
    assert again.returncode == 2
    assert str(workdir / "soft_targets" / "train") in again.stderr
    assert _tree(workdir) == before


@pytest.mark.parametrize(
    "stages,message",
    [
        ("skip", "TEACHER_STAGES=skip needs the soft targets of train"),
        ("maybe", "TEACHER_STAGES must be run or skip"),
    ],
)
def test_kd_experiment_without_teacher_stages_needs_the_caches(tmp_path, stages, message):
    """scripts/kd_experiment.sh with TEACHER_STAGES=skip (students on caches already in the
    work directory, e.g. unpacked from a GPU run) refuses, before it writes anything, a
    work directory without them, and any other value."""
    workdir = tmp_path / "work"
    env = {**os.environ, "TEACHER_STAGES": stages}
    done = _run(
        ["bash", REPO / "scripts" / "kd_experiment.sh", CONFIG, workdir, tmp_path / "res"],
        REPO,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not workdir.exists() and not list(tmp_path.glob("res*"))


def test_the_default_students_are_valid_settings_of_the_default_config():
    """A GPU run trains its default students only after the teacher and the soft targets, so
    a misspelt field there would cost the lease: each default student's settings apply
    to the default config, and the distilled one reads the cache it writes (offline, with
    the K the teacher keeps)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_teacher
    finally:
        sys.path.remove(str(REPO / "scripts"))
    from distill_jax import configlib

    args = gpu_teacher.parse_args(["--out", "unused"])
    config = configlib.load_config_file(str(REPO / args.config))
    kinds = {}
    for name, fields in args.student_list:
        student = configlib.override(config, fields)
        kinds[name] = student.distill.kd
        if student.distill.kd == "offline":
            assert student.distill.top_k <= config.teacher.top_k, name
    assert sorted(kinds.values()) == ["none", "offline"]
