"""The kill -9 matrix of issue #34 as a slow test: tests/crash_matrix.py kills
train-teacher, soft-targets and train-student during a write and between writes, reruns
them, and compares every artefact with an uninterrupted run's (see its docstring). The
uninterrupted run is the session's ``tiny_run`` (tests/conftest.py), which other tests
share."""

import pytest

import crash_matrix

pytestmark = pytest.mark.slow


def test_kill_9_anywhere_then_rerun_ends_like_an_uninterrupted_run(tmp_path, tiny_run):
    lines = []
    failures = crash_matrix.run_matrix(
        tmp_path, tiny_run.workdir, tiny_run.teacher, log=lines.append
    )
    assert not failures, "\n".join(lines + failures)
    killed = [line for line in lines if "killed" in line]
    assert len(killed) == sum(len(cases) for cases in crash_matrix.CASES.values())
    assert all("identical" in line for line in killed), "\n".join(lines)
