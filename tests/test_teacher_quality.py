"""scripts/teacher_quality.py: how often the teacher's soft targets hold the reference."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import teacher_quality  # noqa: E402


def test_agreement_counts_top1_topk_and_soft_probability():
    # Example 1: 2 positions, K 2; example 2: 1 position.
    logits = [np.array([[2.0, 0.0], [1.0, 1.0]], np.float16), np.array([[3.0, 1.0]])]
    indices = [np.array([[5, 6], [7, 8]]), np.array([[9, 4]])]
    references = [[5, 8], [3]]  # top-1 hit, second-place hit, miss
    got = teacher_quality.agreement(logits, indices, references, temperature=1.0)
    assert got["positions"] == 3
    assert got["top1"] == pytest.approx(1 / 3)
    assert got["topk"] == pytest.approx(2 / 3)
    p_first = np.exp(2.0) / (np.exp(2.0) + 1.0)  # softmax([2, 0])[0]
    assert got["p_ref"] == pytest.approx((p_first + 0.5 + 0.0) / 3)
    # A high temperature flattens the kept K: the reference's share tends to 1 / K.
    hot = teacher_quality.agreement(logits, indices, references, temperature=1e6)
    assert hot["p_ref"] == pytest.approx((0.5 + 0.5) / 3, abs=1e-5)
    assert (hot["top1"], hot["topk"]) == (got["top1"], got["topk"])


def test_agreement_refuses_misaligned_targets():
    with pytest.raises(ValueError, match="soft targets of 2 positions for a reference of 3"):
        teacher_quality.agreement([np.zeros((2, 1))], [np.zeros((2, 1), int)], [[1, 2, 3]], 1.0)


def test_student_accuracy_is_the_last_validation_record(tmp_path):
    run = tmp_path / "students" / "baseline"
    run.mkdir(parents=True)
    lines = [
        {"step": 10, "split": "train", "accuracy": 0.1},
        {"step": 10, "split": "valid", "accuracy": 0.4},
        {"step": 20, "split": "valid", "accuracy": 0.55, "bleu": 3.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert teacher_quality.student_accuracy(tmp_path, "baseline") == pytest.approx(0.55)
    assert teacher_quality.student_accuracy(tmp_path, "missing") is None


@pytest.mark.parametrize(
    "value, message",
    [("1,hot", "not a comma-separated list of numbers"), ("2,0", "every temperature must be > 0")],
)
def test_bad_temperatures_are_refused_before_any_work(value, message, tmp_path, capsys):
    code = teacher_quality.main(
        [
            "--config",
            str(tmp_path / "missing.py"),
            "--workdir",
            str(tmp_path),
            "--temperatures",
            value,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--temperatures" in err and message in err
    assert not list(tmp_path.iterdir())
