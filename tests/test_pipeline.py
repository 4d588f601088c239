"""The distillation pipeline end to end on a tiny teacher and a slice of Multi30k, on a
copy of the session's tiny run (train-teacher -> soft-targets -> train-student): reruns,
refusals, two processes, checkpoint selection, teacher quality, and online vs offline
distillation. Exact resume after SIGKILL is tests/crash_matrix.py's (every stage, killed
during and between writes) and test_gcs.py's (killed from outside, on gs://)."""

import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crash_matrix
import tiny_experiment

pytestmark = pytest.mark.slow

CONFIG = "configs/tiny.py"


def _cli(workdir, teacher, command, *extra, check=True):
    return tiny_experiment.run_cli(workdir, teacher, command, *extra, config=CONFIG, check=check)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_run):
    """(a copy of the session's finished tiny run: teacher, soft targets of the train
    split, the offline-distilled student ``distilled``; its teacher checkpoint)."""
    workdir = tmp_path_factory.mktemp("pipeline") / "work"
    shutil.copytree(tiny_run.workdir, workdir)
    return workdir, tiny_run.teacher


def _final_params(workdir, name):
    from distill_jax import configlib
    from distill_jax.sharding import MeshConfig, make_mesh
    from distill_jax.student import load_trained

    config = configlib.load_config_file(CONFIG)
    _, params, _ = load_trained(config, workdir, name, "latest", make_mesh(MeshConfig()))
    return jax.tree.map(np.asarray, params)


def test_train_student_command_runs_as_two_processes(experiment):
    """The unchanged `distill-jax train-student` command as 2 processes x 4 CPU devices
    (through the local launcher) on a (2,2,2) mesh trains like 1 process x 8 devices:
    same final parameters; only process 0 logs metrics and prints results."""
    import json

    from test_multiprocess import NOISE_LEAVES, REPO, clean_env

    workdir, teacher = experiment
    common = [
        "--set",
        "train.steps=4",
        "--set",
        "train.save_every=2",
        "--set",
        "train.eval_every=100",
        *tiny_experiment.MESH_2X2X2,
    ]
    command = [
        *tiny_experiment.CLI,
        *tiny_experiment.run_args(workdir, teacher, "train-student", *common, config=CONFIG),
    ]
    one = subprocess.run(
        command + ["--name", "one-process"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        tiny_experiment.two_processes(*command, "--name", "two-processes"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=clean_env(),
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "[0] [two-processes] test2016: BLEU" in two.stdout
    assert "[1] [two-processes]" not in two.stdout  # only the chief prints results
    run = workdir / "students" / "two-processes"
    assert (run / "results.json").is_file() and (run / "checkpoints" / "4").is_dir()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)), "metrics written by more than one process"

    ones, twos = _final_params(workdir, "one-process"), _final_params(workdir, "two-processes")
    flat_one = jax.tree_util.tree_leaves_with_path(ones)
    for (path, a), b in zip(flat_one, jax.tree.leaves(twos)):
        noise = NOISE_LEAVES in jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=4e-3 if noise else 1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_soft_targets_rerun_reuses_a_finished_cache(experiment):
    """A second `soft-targets` with the same teacher and data keeps the finished cache
    (same files, untouched); --force recomputes it (same values: extraction is
    deterministic)."""
    workdir, teacher = experiment
    cache = workdir / "soft_targets" / "train"

    def files():
        return {str(p.relative_to(cache)): p for p in cache.rglob("*") if p.is_file()}

    before = {name: (p.stat().st_mtime_ns, p.read_bytes()) for name, p in files().items()}
    chunks = ["--chunk-rows", crash_matrix.CHUNK_ROWS]  # how the tiny run's cache was made
    again = _cli(workdir, teacher, "soft-targets", *chunks)
    assert "already in" in again.stdout and "nothing to do" in again.stdout
    assert {name: (p.stat().st_mtime_ns, p.read_bytes()) for name, p in files().items()} == before
    forced = _cli(workdir, teacher, "soft-targets", *chunks, "--force")
    assert "already in" not in forced.stdout and "soft targets of" in forced.stdout
    after = {name: p.read_bytes() for name, p in files().items()}
    assert after == {name: data for name, (_, data) in before.items()}


def test_foreign_cache_and_changed_config_are_refused(experiment):
    workdir, teacher = experiment

    def refused(*extra):
        """Another teacher run (teacher.steps=3) than the one the cache was made with (6)."""
        return _cli(
            workdir,
            teacher,
            "train-student",
            "--name",
            "refused",
            "--set",
            "teacher.steps=3",
            *extra,
            check=False,
        )

    result = refused()
    assert result.returncode == 2
    assert "was made for teacher" in result.stderr and "soft-targets" in result.stderr
    # That failed start saved no step, so it does not bind the run to its config (#34
    # item 6): a corrected command is not refused for "changed fields".
    result = refused("--set", "train.steps=9")
    assert result.returncode == 2
    assert "run with another config" not in result.stderr  # (a note says it started over)
    assert "was made for teacher" in result.stderr
    # Once a step is saved (here: a step folder), another config is refused, naming it.
    (workdir / "students" / "refused" / "checkpoints" / "2").mkdir(parents=True)
    result = refused("--set", "train.steps=9", "--set", "train.seed=1")
    assert result.returncode == 2
    assert "changed fields: train.seed: 0 -> 1." in result.stderr
    # train.steps is the field that may change, growing only (#35): a run is never cut back.
    result = refused("--set", "train.steps=1")
    assert result.returncode == 2
    assert "has trained 2 steps, more than train.steps 1" in result.stderr
    assert "never cut back" in result.stderr


def test_online_and_offline_distillation_give_the_same_loss(experiment):
    from distill_jax import configlib, sharding, student, train
    from distill_jax import teacher as teacher_lib
    from distill_jax.data.prepared import open_prepared
    from distill_jax.soft_target_cache import open_cache

    workdir, teacher_dir = experiment
    config = configlib.override(
        configlib.load_config_file(CONFIG), [f"teacher.checkpoint={teacher_dir}"]
    )
    dataset = open_prepared(workdir / "data")
    mesh = sharding.make_mesh(config.mesh)
    model = student.build_model(config, dataset.vocab, jnp.float32)
    params = nn.unbox(
        model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32)
        )["params"]
    )
    pipeline = student.student_pipeline(config, dataset, "train", 8, training=True)
    batch = pipeline.load_batch(0)
    cache = open_cache(str(workdir / "soft_targets" / "train"))
    offline_batch = student.attach_soft_targets(batch, cache, config.distill.top_k)

    teacher, teacher_params, _ = teacher_lib.load_finetuned(
        config, workdir, dataset.vocab, mesh, jnp.float32
    )
    settings = train.StudentLossConfig(
        alpha=0.5, label_smoothing=0.1, kd_mode="paper", temperature=10.0
    )

    def online_teacher(b, p):
        return teacher_lib.stride_topk(
            teacher,
            p,
            b["src"],
            b["tgt_out"],
            stride=config.teacher.stride,
            top_k=config.distill.top_k,
        )

    offline = train.student_loss_fn(model, settings)
    online = train.student_loss_fn(model, settings, online_teacher)
    keys = ("src", "tgt_in", "tgt_out")
    off_sum, off_metrics = offline(
        params, {k: offline_batch[k] for k in keys + ("kd_logits", "kd_indices")}, None
    )
    on_sum, on_metrics = online(
        params, {k: batch[k] for k in keys}, None, jax.device_get(teacher_params)
    )
    assert float(off_metrics["kd"][0]) > 0
    # The cache stores float16 logits; the online teacher computes them in float32.
    np.testing.assert_allclose(float(on_sum), float(off_sum), rtol=2e-3)
    np.testing.assert_allclose(float(on_metrics["kd"][0]), float(off_metrics["kd"][0]), rtol=2e-3)
    # And the online teacher's top-K ids are exactly the cached ones.
    _, ids = jax.jit(lambda b: online_teacher(b, teacher_params))({k: batch[k] for k in keys})
    mask = batch["tgt_out"] != 0
    np.testing.assert_array_equal(np.asarray(ids)[mask], offline_batch["kd_indices"][mask])


def test_student_selects_its_checkpoint_by_the_configured_metric(experiment):
    """train.select_metric=rougeL: validation logs BLEU and ROUGE, the reported parameters
    are those of the step with the best validation ROUGE-L, and results.json carries
    ROUGE-1/2/L for every scored split (what summarisation reports)."""
    import json

    workdir, teacher = experiment
    _cli(
        workdir,
        teacher,
        "train-student",
        "--name",
        "by-rouge",
        "--set",
        "train.steps=6",
        "--set",
        "train.save_every=2",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.select_metric=rougeL",
        "--set",
        "train.bleu_sentences=16",
    )
    run = workdir / "students" / "by-rouge"
    valid = [
        json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["split"] == "valid"
    ]
    assert [r["step"] for r in valid] == [2, 4, 6]
    assert all({"bleu", "rouge1", "rouge2", "rougeL"} <= set(r) for r in valid)
    results = json.loads((run / "results.json").read_text())
    chosen = int(results["checkpoint"].rsplit(" ", 1)[1])
    best = max(r["rougeL"] for r in valid)
    assert next(r["rougeL"] for r in valid if r["step"] == chosen) == best
    if chosen != 6:
        assert results["checkpoint"].startswith("best validation ROUGE-L")
    for scores in results["splits"].values():
        assert {"bleu", "rouge1", "rouge2", "rougeL"} <= set(scores)
        assert 0 <= scores["rouge2"] <= scores["rouge1"] <= 100


def test_an_unknown_selection_metric_is_refused(experiment):
    workdir, teacher = experiment
    bad = _cli(
        workdir,
        teacher,
        "train-student",
        "--name",
        "bad-metric",
        "--set",
        "train.select_metric=meteor",
        check=False,
    )
    assert bad.returncode != 0
    assert "train.select_metric must be one of" in bad.stderr
    assert not (workdir / "students" / "bad-metric").exists()


def test_teacher_quality_is_measured_in_training_and_shown_by_soft_targets(experiment, capsys):
    """train-teacher's validation records the stride-masked quality of its soft targets,
    equal to what the cached soft targets of the validation split give
    (scripts/teacher_quality.py's arithmetic), and soft-targets prints it for the
    checkpoint it used."""
    import dataclasses
    import json
    import os

    from distill_jax import configlib, storage
    from distill_jax.data.prepared import open_prepared
    from distill_jax.data.vocab import EOS
    from distill_jax.soft_target_cache import CacheIdentity, open_cache

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import teacher_quality as script

    workdir, teacher = experiment
    records = [
        json.loads(line)
        for line in (workdir / "teacher" / "metrics.jsonl").read_text().splitlines()
    ]
    valid = [r for r in records if r["split"] == "valid" and r["step"] == 6]
    assert len(valid) == 1
    logged = valid[0]
    for key in ("stride_top1", "stride_topk", "stride_p_ref"):
        assert 0.0 <= logged[key] <= 1.0, key
    assert logged["stride_top1"] <= logged["stride_topk"]

    config = configlib.load_config_file(CONFIG)
    split = config.data.valid_split
    result = _cli(workdir, teacher, "soft-targets", "--split", split)
    assert "teacher quality at step 6 on validation: stride top-1" in result.stdout

    dataset = open_prepared(workdir / "data")
    examples, lengths = dataset.records(split)
    assert (
        config.teacher.quality_examples == 0 or len(lengths) <= config.teacher.quality_examples
    )  # the whole split was measured
    header = json.loads((workdir / "soft_targets" / split / "header.json").read_text())
    identity = CacheIdentity(**{f.name: header[f.name] for f in dataclasses.fields(CacheIdentity)})
    assert identity.teacher_step == 6
    cache = open_cache(
        storage.path(workdir) / "soft_targets" / split, identity, num_examples=len(lengths)
    )
    ids = list(range(len(lengths)))
    logits, indices = cache.read_async(ids).result()
    references = [[int(t) for t in r["tgt"]] + [EOS] for r in examples.__getitems__(ids)]
    cached = script.agreement(logits, indices, references, config.distill.temperature)
    assert cached["top1"] == pytest.approx(logged["stride_top1"], abs=1e-6)
    assert cached["topk"] == pytest.approx(logged["stride_topk"], abs=1e-6)
    assert cached["p_ref"] == pytest.approx(logged["stride_p_ref"], abs=2e-3)  # float16 cache

    # the script names the checkpoint the cache was made from and prints the same top-1
    args = ["--config", CONFIG, "--workdir", str(workdir), "--split", split]
    assert script.main([*args, "--set", f"teacher.checkpoint={teacher}"]) == 0
    shown = capsys.readouterr().out
    assert f"teacher (step 6 of a {config.teacher.steps}-step run) on {split}" in shown
    assert f"top-1 {100 * cached['top1']:.1f}%" in shown
