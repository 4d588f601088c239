"""The README's demo command end to end on a reduced budget (`scripts/demo.sh --quick`):
install, prepare the full Multi30k de-en, fine-tune all-MiniLM-L6-v2 a few steps, extract
soft targets, train a baseline and a distilled student, print the table and the plots."""

import os
import pathlib

import pytest

import tiny_experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def _plan(*args, workdir=None):
    env = {k: v for k, v in os.environ.items() if k != "WORKDIR"}
    if workdir:
        env["WORKDIR"] = workdir
    return tiny_experiment.demo(*args, env=env, timeout=60)


def test_demo_arguments_full_and_quick_paths():
    """The argument handling and settings of both paths, as a new user starts them: the
    full demo (no arguments) once died at its first line under `set -e`."""
    full = _plan("--plan")
    assert full.returncode == 0, full.stderr
    assert f"workdir: {REPO}/runs/demo\n" in full.stdout
    assert "settings: (the config as it is)" in full.stdout
    quick = _plan("--quick", "--plan")
    assert quick.returncode == 0, quick.stderr
    assert f"workdir: {REPO}/runs/demo-quick\n" in quick.stdout
    assert "--set teacher.steps=4" in quick.stdout
    chosen = _plan("--plan", workdir="/tmp/elsewhere")
    assert "workdir: /tmp/elsewhere\n" in chosen.stdout
    bad = _plan("--fast")
    assert bad.returncode == 2 and "usage: scripts/demo.sh" in bad.stderr
    assert bad.stdout == ""


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(quick_demo):
    """The session's quick demo run (conftest.quick_demo: made once, its prepared Multi30k
    is also what tests/test_data_multi30k.py reads), then the same command again."""
    result, work, env = quick_demo.result, quick_demo.workdir, quick_demo.env
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout  # results (report.py's table)
    said = result.stdout + result.stderr  # status lines: printed or logged (stderr)
    assert (
        "| baseline | none |" in out
        and "| distilled | offline, K 1, α 0.5, pretrained teacher |" in out
    )
    assert "val BLEU" in out and "test2016 BLEU" in out
    assert "teacher quality at step 4 on validation: stride top-1" in said  # soft-targets
    # report.py: the teacher's validation at the checkpoint the distilled student read
    assert "teacher at step 4 (the distilled students' soft targets): masked accuracy" in out
    assert "val stride top-1" in out
    assert "baseline val accuracy" in out  # report.py, beside the teacher's figures
    assert "already prepared" not in said  # the first run prepared the corpus itself
    assert (work / "curves.png").stat().st_size > 10_000
    for name in ("baseline", "distilled"):
        assert (work / "students" / name / "results.json").is_file()
        hypotheses = (work / "students" / name / "test2016.hyp.txt").read_text().splitlines()
        assert len(hypotheses) == 1000

    # Rerunning the same command redoes nothing: every stage finds its work done.
    mtime = (work / "students" / "baseline" / "results.json").stat().st_mtime_ns
    again = tiny_experiment.demo("--quick", env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"already prepared: {work / 'data'}" in again.stdout
    again_said = again.stdout + again.stderr
    assert "[baseline] already finished" in again_said
    assert "[distilled] already finished" in again_said
    assert (work / "students" / "baseline" / "results.json").stat().st_mtime_ns == mtime
    assert "| distilled | offline, K 1, α 0.5, pretrained teacher |" in again.stdout
