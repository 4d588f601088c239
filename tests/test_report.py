"""scripts/report.py: the per-run table, the per-seed summary and the JSON records."""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import report  # noqa: E402

SIGNATURE = "nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2.6.0"


def _write(workdir, name, kd, seed, val, test):
    run = workdir / "students" / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps(
            {
                "name": name,
                "kd": kd,
                "steps": 500,
                "seed": seed,
                "checkpoint": "step 500",
                "teacher": None if kd == "none" else {"checkpoint": "minilm", "init": "pretrained"},
                "splits": {
                    "val": {"bleu": val, "bleu_signature": SIGNATURE},
                    "test2016": {"bleu": test, "bleu_signature": SIGNATURE},
                },
            }
        )
    )


def test_seed_groups_are_summarised_and_recorded(tmp_path):
    _write(tmp_path, "baseline", "none", 0, 10.0, 11.0)
    _write(tmp_path, "baseline-s1", "none", 1, 12.0, 13.0)
    _write(tmp_path, "baseline-s2", "none", 2, 14.0, 12.0)
    _write(tmp_path, "distilled", "offline", 0, 9.0, 9.5)
    _write(tmp_path, "distilled-s1", "offline", 1, 9.0, 10.5)
    _write(tmp_path, "lonely", "offline", 0, 1.0, 1.0)  # one run: no summary row
    table, records = report.results_table(tmp_path)
    assert len(records) == 12  # 6 runs x 2 splits
    baseline_row = next(line for line in table.splitlines() if line.startswith("| baseline | 3 |"))
    std = statistics.stdev([11.0, 13.0, 12.0])
    assert f"12.00 ± {std:.2f}" in baseline_row  # test2016 mean of 11, 13, 12
    assert "| distilled | 2 | 9.00 ± 0.00 | 10.00 ± 0.71 |" in table
    assert "| lonely | 1 |" not in table
    record = next(r for r in records if r["system"] == "distilled-s1" and r["split"] == "test2016")
    assert record["value"] == 10.5 and record["seed"] == 1 and record["kd"] == "offline"
    assert record["teacher"]["init"] == "pretrained" and record["metric"] == "bleu"
    assert record["hardware"] and record["steps"] == 500
    assert record["commit"]  # the code that produced it (or "unknown" outside git)


def _write_scores(workdir, name, seed, **scores):
    run = workdir / "students" / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps(
            {
                "name": name,
                "kd": "none",
                "steps": 10,
                "seed": seed,
                "checkpoint": "step 10",
                "teacher": None,
                "splits": {"valid": {"bleu_signature": SIGNATURE, **scores}},
            }
        )
    )


def test_rouge_columns_appear_when_every_run_has_them(tmp_path):
    _write_scores(tmp_path, "baseline", 0, bleu=5.0, rouge1=30.0, rouge2=10.0, rougeL=28.0)
    _write_scores(tmp_path, "baseline-s1", 1, bleu=7.0, rouge1=32.0, rouge2=12.0, rougeL=30.0)
    table, records = report.results_table(tmp_path)
    assert "valid ROUGE-2" in table and "valid BLEU" in table
    assert "| baseline | 2 | 6.00 ± 1.41 | 31.00 ± 1.41 | 11.00 ± 1.41 | 29.00 ± 1.41 |" in table
    assert sorted(r["metric"] for r in records if r["seed"] == 1) == [
        "bleu",
        "rouge1",
        "rouge2",
        "rougeL",
    ]
    assert all(("signature" in r) == (r["metric"] == "bleu") for r in records)
    table, records = report.results_table(tmp_path, ["rougeL"])
    assert "BLEU" not in table and {r["metric"] for r in records} == {"rougeL"}


def test_a_run_without_the_asked_metric_is_named(tmp_path):
    _write_scores(tmp_path, "baseline", 0, bleu=5.0, rouge1=30.0, rouge2=10.0, rougeL=28.0)
    _write_scores(tmp_path, "old", 0, bleu=5.0)  # scored before ROUGE was recorded
    table, _ = report.results_table(tmp_path)
    assert "ROUGE" not in table  # default: only what every run has
    try:
        report.results_table(tmp_path, ["rougeL"])
    except SystemExit as exit_:
        assert "old/results.json" in str(exit_) and "rougeL" in str(exit_)
    else:
        raise AssertionError("a missing metric must stop the report")


def test_ablations_across_work_directories_show_their_difference_from_the_baseline(tmp_path):
    main, other = tmp_path / "main", tmp_path / "random"
    _write(main, "baseline", "none", 0, 10.0, 11.0)
    _write(main, "distilled", "offline", 0, 12.0, 12.5)
    _write(main, "unwanted", "offline", 0, 1.0, 1.0)
    _write(other, "distilled-random-teacher", "offline", 0, 9.0, 10.25)
    table, records = report.results_table(
        [main, other],
        names=["baseline", "distilled-random-teacher", "distilled"],
        baseline="baseline",
    )
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| baseline",
        "| distilled-random-teacher",
        "| distilled",
    ]  # the asked order
    assert "| 9.00 (-1.00) | 10.25 (-0.75) |" in rows[2]
    assert "| 12.00 (+2.00) | 12.50 (+1.50) |" in rows[3]
    assert "| 10.00 | 11.00 |" in rows[1]  # the reference itself has no difference
    assert "unwanted" not in table and len(records) == 6


def test_report_refuses_ambiguous_or_missing_runs(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _write(first, "distilled", "offline", 0, 1.0, 1.0)
    _write(second, "distilled", "offline", 1, 2.0, 2.0)
    for call, words in (
        (lambda: report.results_table([first, second]), ["distilled", str(second)]),
        (lambda: report.results_table([first], names=["distilled", "k32"]), ["k32"]),
        (lambda: report.results_table([first], baseline="baseline"), ["baseline"]),
    ):
        try:
            call()
        except SystemExit as exit_:
            assert all(w in str(exit_) for w in words), str(exit_)
        else:
            raise AssertionError("the report must stop")


def test_ablations_script_names_what_it_needs_first(tmp_path):
    import subprocess

    repo = os.path.join(os.path.dirname(__file__), "..")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("{}")
    result = subprocess.run(
        [
            "bash",
            "scripts/ablations.sh",
            "configs/multi30k_cpu.py",
            str(tmp_path),
            str(tmp_path / "out.json"),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{tmp_path}/teacher is missing" in result.stderr
    assert "scripts/experiment.sh" in result.stderr
    assert (
        not (tmp_path / "out.json").exists()
        and not (tmp_path.parent / (tmp_path.name + "-random")).exists()
    )


def test_online_cost_script_names_what_it_needs_first(tmp_path):
    """scripts/online_cost.sh refuses a work directory without the teacher stages and
    trains nothing there."""
    import subprocess

    repo = os.path.join(os.path.dirname(__file__), "..")
    (tmp_path / "teacher" / "checkpoints").mkdir(parents=True)
    result = subprocess.run(
        ["bash", "scripts/online_cost.sh", "configs/multi30k_cpu.py", str(tmp_path), "20"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{tmp_path}/soft_targets/train is missing" in result.stderr
    assert "scripts/experiment.sh" in result.stderr
    assert not (tmp_path / "students").exists()


def test_distillation_names_the_temperature_where_it_matters(tmp_path):
    """K > 1: the label names T, from results.json or (older runs) the run's config.json;
    K 1: T changes nothing, so the label leaves it out."""
    for name, teacher, config_t in (
        ("t1", {"top_k": 8, "alpha": 0.5, "temperature": 1.0}, None),
        ("paper", {"top_k": 8, "alpha": 0.5}, 10.0),
        ("k1", {"top_k": 1, "alpha": 0.5, "temperature": 10.0}, None),
    ):
        _write(tmp_path, name, "offline", 0, 20.0, 21.0)
        run = tmp_path / "students" / name
        result = json.loads((run / "results.json").read_text())
        result["teacher"].update(teacher)
        (run / "results.json").write_text(json.dumps(result))
        if config_t is not None:
            (run / "config.json").write_text(json.dumps({"distill": {"temperature": config_t}}))
    table, _ = report.results_table(tmp_path)
    assert "| t1 | offline, K 8, α 0.5, T 1, pretrained teacher |" in table
    assert "| paper | offline, K 8, α 0.5, T 10, pretrained teacher |" in table
    assert "| k1 | offline, K 1, α 0.5, pretrained teacher |" in table


def test_a_run_stopped_by_patience_says_how_far_it_trained(tmp_path):
    _write(tmp_path, "baseline", "none", 0, 10.0, 11.0)
    _write(tmp_path, "patient", "none", 0, 12.0, 12.5)
    path = tmp_path / "students" / "patient" / "results.json"
    results = json.loads(path.read_text())
    reason = "no better validation bleu in 2 validations after step 300 (12; patience 2)"
    results.update(steps=2000, trained_steps=400, patience=2, stopped_early=reason)
    path.write_text(json.dumps(results))
    table, records = report.results_table(tmp_path)
    assert "| baseline | none | 500 | step 500 |" in table  # (results.json before #35)
    assert "| 400 of 2000 (val stopped improving, patience 2) |" in table
    record = next(r for r in records if r["system"] == "patient")
    assert (record["steps"], record["trained_steps"], record["stopped_early"]) == (
        2000,
        400,
        reason,
    )
    saved = tmp_path / "records.json"  # read back by --records: the same steps cell
    saved.write_text(json.dumps(records))
    recorded = report.load_records(saved, only=["patient"])
    assert recorded[0]["patience"] == 2
    assert report.steps_cell(recorded[0]) == "400 of 2000 (val stopped improving, patience 2)"


def test_recorded_runs_join_the_table_with_their_own_provenance(tmp_path):
    """Baselines whose work directory is gone, from an earlier --json, beside new runs."""
    old = tmp_path / "old"
    for i, (val, test) in enumerate(((10.0, 11.0), (12.0, 13.0), (14.0, 12.0))):
        _write(old, "baseline" + (f"-s{i}" if i else ""), "none", i, val, test)
    _write(old, "t1", "offline", 0, 99.0, 99.0)  # an older t1: must not be confused
    _, old_records = report.results_table(old)
    for r in old_records:
        r.update(commit="0ld", hardware="old CPU")
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps(old_records))
    new = tmp_path / "new"
    for i, (val, test) in enumerate(((11.0, 12.5), (13.0, 14.0), (15.0, 12.5))):
        _write(new, "t1" + (f"-s{i}" if i else ""), "offline", i, val, test)
    recorded = report.load_records(saved)
    assert {r["name"] for r in recorded} == {"baseline", "baseline-s1", "baseline-s2", "t1"}
    try:  # two runs called t1: the report must not pick one silently
        report.results_table([new], recorded=recorded)
    except SystemExit as exit_:
        assert "'t1'" in str(exit_) and "--records" in str(exit_)
    else:
        raise AssertionError("two runs called t1 must stop the report")
    names = ["baseline", "baseline-s1", "baseline-s2", "t1", "t1-s1", "t1-s2"]
    try:  # naming t1 does not say which
        report.results_table([new], names=names, recorded=recorded)
    except SystemExit as exit_:
        assert "'t1'" in str(exit_)
    else:
        raise AssertionError("two runs called t1 must stop the report")
    recorded = report.load_records(saved, only=names[:3])
    table, records = report.results_table(
        [new], names=names, baseline="baseline", recorded=recorded
    )
    assert "| t1 | 3 | 13.00 ± 2.00 (+1.00) | 13.00 ± 0.87 (+1.00) |" in table
    assert "| baseline | 3 | 12.00 ± 2.00 | 12.00 ± 1.00 |" in table
    assert "99.00" not in table  # the old t1 was not chosen
    by_system = {r["system"]: r for r in records if r["split"] == "val"}
    assert by_system["baseline-s1"]["commit"] == "0ld"
    assert by_system["baseline-s1"]["hardware"] == "old CPU"
    assert by_system["t1-s1"]["commit"] != "0ld"  # a new run: this checkout's provenance
    assert by_system["baseline-s1"]["value"] == 12.0
    assert f"recorded earlier (--records {saved}, commit 0ld, old CPU): baseline, " in table


def test_bad_records_are_named_and_exit_2(tmp_path, capsys):
    _write(tmp_path, "b", "none", 0, 1.0, 2.0)
    _, records = report.results_table(tmp_path)
    for content, words in (
        ("not json", ["cannot read it as JSON"]),
        ("[]", ["non-empty list"]),
        ('[{"system": "b", "kd": "none"}]', ["record 0 has no", "split", "value"]),
        (json.dumps(records), ["no run called nope", "(it has b)"]),
    ):
        path = tmp_path / "bad.json"
        path.write_text(content)
        try:
            report.load_records(path, only=["nope"] if "nope" in words[0] else None)
        except SystemExit as exit_:
            assert exit_.code == 2
            err = capsys.readouterr().err
            assert str(path) in err and all(w in err for w in words), err
        else:
            raise AssertionError(f"{content!r} must stop the report")


def test_teacher_line_shows_the_checkpoint_the_students_distilled_from(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    rows = [
        {
            "step": 200,
            "split": "valid",
            "masked_accuracy": 0.5,
            "stride_top1": 0.70,
            "stride_topk": 0.9,
        },
        {
            "step": 400,
            "split": "valid",
            "masked_accuracy": 0.6,
            "stride_top1": 0.82,
            "stride_topk": 0.93,
        },
        {
            "step": 600,
            "split": "valid",
            "masked_accuracy": 0.7,
            "stride_top1": 0.81,
            "stride_topk": 0.94,
        },
    ]
    (teacher / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write(tmp_path, "baseline", "none", 0, 10.0, 11.0)
    # no distilled run names a checkpoint: the teacher's last validation
    assert report.teacher_line(tmp_path).startswith("teacher at step 600: masked accuracy 70.0%")
    _write(tmp_path, "distilled", "offline", 0, 9.0, 9.5)
    path = tmp_path / "students" / "distilled" / "results.json"
    result = json.loads(path.read_text())
    result["teacher"]["checkpoint_step"] = 400
    path.write_text(json.dumps(result))
    line = report.teacher_line(tmp_path)
    assert line.startswith(
        "teacher at step 400 (the distilled students' soft targets): masked accuracy 60.0%; "
        "val stride top-1 82.0%, top-K 93.0%"
    )


def test_records_name_the_commit_each_run_was_trained_with(tmp_path):
    _write(tmp_path, "baseline", "none", 0, 10.0, 11.0)
    _write(tmp_path, "old", "none", 1, 10.0, 11.0)  # a run from before results.json had "code"
    path = tmp_path / "students" / "baseline" / "results.json"
    result = json.loads(path.read_text())
    result["code"] = {"version": "0.1.0", "commit": "0123456789ab"}
    path.write_text(json.dumps(result))
    _, records = report.results_table(tmp_path)
    commits = {r["system"]: r["commit"] for r in records}
    assert commits["baseline"] == "0123456789ab"
    assert commits["old"] == report.git_commit()  # the report's own checkout
