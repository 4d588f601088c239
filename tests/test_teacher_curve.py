"""scripts/teacher_curve.py: a teacher run's validation records as a learning curve."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import teacher_curve  # noqa: E402


def test_curve_lists_validations_in_step_order_and_says_how_far_the_run_got(tmp_path, capsys):
    run = tmp_path / "teacher"
    run.mkdir()
    records = [
        {"step": 10, "split": "train", "loss": 5.0},
        {
            "step": 40,
            "split": "valid",
            "loss": 2.5,
            "masked_accuracy": 0.6,
            "stride_top1": 0.65,
            "stride_topk": 0.8,
            "stride_p_ref": 0.15,
        },
        {
            "step": 20,
            "split": "valid",
            "loss": 3.0,
            "masked_accuracy": 0.5,
            "stride_top1": 0.55,
            "stride_topk": 0.75,
            "stride_p_ref": 0.13,
        },
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.json").write_text(json.dumps({"steps": 100}))
    out = tmp_path / "curve.json"
    assert teacher_curve.main([str(tmp_path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("| 20 | 3.000 | 50.0% | 55.0%") < printed.index(
        "| 40 | 2.500 | 60.0% | 65.0%"
    )
    assert "reached step 40 of teacher.steps=100" in printed
    record = json.loads(out.read_text())
    assert [p["step"] for p in record["points"]] == [20, 40]
    assert record["points"][1]["stride_top1"] == 0.65 and record["reached_step"] == 40
    assert record["teacher_config"] == {"steps": 100} and "commit" in record


def test_no_validation_is_an_error(tmp_path, capsys):
    assert teacher_curve.main([str(tmp_path)]) == 2
    assert "no validation record" in capsys.readouterr().err
