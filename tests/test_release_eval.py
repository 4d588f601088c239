"""scripts/release_eval.py: which parameters a finished run is scored with, and what it
refuses (the end-to-end scoring is Student.score, tested in test_api.py)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import release_eval  # noqa: E402

from distill_jax.errors import UserError


def _release_eval(tmp_path, runs, out, *extra) -> int:
    """release_eval.py on the RUNS of tmp_path/work (configs/tiny.py), its record to OUT."""
    return release_eval.main(
        [
            "--config",
            "configs/tiny.py",
            "--workdir",
            str(tmp_path / "work"),
            "--runs",
            runs,
            *extra,
            "--json",
            str(out),
        ]
    )


def test_the_reported_checkpoint_is_the_one_loaded():
    assert release_eval.checkpoint_of("best validation BLEU, step 1200") == "1200"
    assert release_eval.checkpoint_of("last step 1500") == "1500"
    assert release_eval.checkpoint_of("step 400") == "400"
    assert release_eval.checkpoint_of("average of the last 5 checkpoints") == "averaged"
    with pytest.raises(UserError, match="unknown checkpoint 'best'"):
        release_eval.checkpoint_of("best")


def test_seeds_share_a_stem():
    assert release_eval.seed_stem("k1-s2") == "k1"
    assert release_eval.seed_stem("baseline") == "baseline"
    assert release_eval.seed_stem("a-s1x") == "a-s1x"


def test_an_unfinished_run_is_refused_and_no_record_is_written(tmp_path, capsys):
    run = tmp_path / "work" / "students" / "baseline"
    run.mkdir(parents=True)
    out = tmp_path / "release.json"
    status = _release_eval(tmp_path, "baseline", out)
    assert status == 2
    assert f"{run / 'results.json'}: no such file" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_whose_reported_score_is_not_reproduced_is_refused(tmp_path, capsys, monkeypatch):
    """The release figures must come from the systems of the results table: a run whose
    reported test BLEU differs from its outputs decoded again stops with exit 2."""
    run = tmp_path / "work" / "students" / "baseline"
    run.mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps({"checkpoint": "step 8", "splits": {"test2016": {"bleu": 20.0}}})
    )

    class FakeStudent:
        loaded = []

        @classmethod
        def load(cls, config, workdir, name, checkpoint):
            cls.loaded.append((name, checkpoint))
            return cls()

        def score(self, split, progress=False):
            return {"bleu": 19.5, "bleu_signature": "sig", "hypotheses": ["a"]}

    monkeypatch.setattr(release_eval.dj, "Student", FakeStudent)
    out = tmp_path / "release.json"
    status = _release_eval(tmp_path, "baseline", out)
    assert status == 2 and FakeStudent.loaded == [("baseline", "8")]
    assert (
        "test2016 BLEU 19.50 decoded again, but results.json reports 20.00"
        in capsys.readouterr().err
    )
    assert not out.exists()


def test_release_scores_per_run_and_per_system(tmp_path, monkeypatch):
    reported = {"baseline": 20.0, "baseline-s1": 22.0}
    for name, bleu in reported.items():
        run = tmp_path / "work" / "students" / name
        run.mkdir(parents=True)
        (run / "results.json").write_text(
            json.dumps(
                {
                    "checkpoint": "best validation BLEU, step 6",
                    "splits": {"test2016": {"bleu": bleu}},
                }
            )
        )

    class FakeStudent:
        def __init__(self, name):
            self.name = name

        @classmethod
        def load(cls, config, workdir, name, checkpoint):
            assert checkpoint == "6"
            return cls(name)

        def score(self, split, progress=False):
            bleu = (
                reported[self.name] + {"test2016": 0.0, "test2017": -1.0, "mscoco2017": -5.0}[split]
            )
            return {"bleu": bleu, "bleu_signature": "sig", "hypotheses": [f"{split} out"]}

    monkeypatch.setattr(release_eval.dj, "Student", FakeStudent)
    out = tmp_path / "release.json"
    assert (
        _release_eval(tmp_path, "baseline,baseline-s1", out, "--splits", "test2017,mscoco2017") == 0
    )
    record = json.loads(out.read_text())
    assert record["runs"]["baseline-s1"]["splits"]["mscoco2017"]["bleu"] == 17.0
    assert record["runs"]["baseline"]["splits"]["test2016"] == {"bleu": 20.0, "reported": 20.0}
    system = record["systems"]["baseline"]
    assert system["runs"] == ["baseline", "baseline-s1"]
    assert system["test2017"]["mean"] == pytest.approx(20.0)
    assert system["test2017"]["std"] == pytest.approx(2**0.5)
    hyp = tmp_path / "work" / "students" / "baseline" / "mscoco2017.hyp.txt"
    assert hyp.read_text() == "mscoco2017 out\n"
