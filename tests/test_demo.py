"""The README's demo command end to end on a reduced budget (`scripts/demo.sh --quick`):
install, prepare the full Multi30k de-en, fine-tune all-MiniLM-L6-v2 a few steps, extract
soft targets, train a baseline and a distilled student, print the table and the plots."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quick_demo_runs_end_to_end(tmp_path, minilm_dir, shared_data):
    if pathlib.Path(shared_data).resolve() != (REPO.parent / "shared" / "data").resolve():
        pytest.skip("the demo reads ../shared/data beside the checkout")
    env = dict(os.environ, WORKDIR=str(tmp_path / "demo"), VENV=sys.prefix,
               DISTILL_JAX_CACHE=str(pathlib.Path(minilm_dir).parent))
    env.pop("XLA_FLAGS", None)  # the demo runs as a user would: on the real devices
    result = subprocess.run(["bash", "scripts/demo.sh", "--quick"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "| baseline | none |" in out and "| distilled | offline, K 8, α 0.5, pretrained teacher |" in out
    assert "val BLEU" in out and "test2016 BLEU" in out
    work = tmp_path / "demo"
    assert (work / "curves.png").stat().st_size > 10_000
    for name in ("baseline", "distilled"):
        assert (work / "students" / name / "results.json").is_file()
        hypotheses = (work / "students" / name / "test2016.hyp.txt").read_text().splitlines()
        assert len(hypotheses) == 1000

    # Rerunning the same command redoes nothing: every stage finds its work done.
    mtime = (work / "students" / "baseline" / "results.json").stat().st_mtime_ns
    again = subprocess.run(["bash", "scripts/demo.sh", "--quick"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[baseline] already finished" in again.stdout
    assert "[distilled] already finished" in again.stdout
    assert (work / "students" / "baseline" / "results.json").stat().st_mtime_ns == mtime
    assert "| distilled | offline, K 8, α 0.5, pretrained teacher |" in again.stdout
