"""Work directories on Cloud Storage (gs://), against the emulator on 127.0.0.1
(tests/gcs_emulator.py): bad buckets and credentials are refused with a clear error, and
the tiny pipeline of test_pipeline.py run with --workdir gs://... (killed with SIGKILL
during soft-target extraction and during student training, then rerun; 2 processes
writing one cache and one checkpoint) ends exactly like the same run on a local disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import crash_matrix
import gcs_emulator
import tiny_experiment

CONFIG = "configs/tiny.py"
# The commands of the session's uninterrupted tiny run (conftest.tiny_run, the crash
# matrix's reference), which is the local run the gs:// one must equal: configs/tiny.py's
# teacher and student, soft targets in several chunks of the tiny train split.
CHUNK_ROWS = crash_matrix.CHUNK_ROWS


def _env(emulator_env: dict, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_JAX_")}
    env.update(emulator_env)
    env.update(extra)
    return env


def _args(command, workdir, *extra, teacher=None, data=None) -> list[str]:
    """``COMMAND`` on ``workdir``; with ``teacher``, that teacher checkpoint; with ``data``,
    that prepared dataset."""
    settings = []
    if data is not None:
        settings += ["--set", f"data.prepared={data}"]
    return tiny_experiment.run_args(workdir, teacher, command, *settings, *extra, config=CONFIG)


def _run(command, workdir, *extra, env, teacher=None, data=None, check=True):
    args = _args(command, workdir, *extra, teacher=teacher, data=data)
    return tiny_experiment.cli(*args, env=env, check=check)


# ----------------------------------------------------------------------------- bad input


def _objects_under(gcs, prefix: str) -> list[str]:
    from distill_jax import storage

    return storage.list_files(gcs.gs(prefix)) if storage.path(gcs.gs(prefix)).exists() else []


def test_unreachable_storage_is_refused_by_name(gcs, tmp_path):
    closed = f"http://127.0.0.1:{gcs_emulator.free_port()}"  # nothing listens there
    env = _env(gcs_emulator.client_env(closed))
    workdir = gcs.gs("unreachable", "run")
    result = _run("train-student", workdir, env=env, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{workdir}: cannot reach Cloud Storage at {closed}" in result.stderr
    assert "Traceback" not in result.stderr
    assert _objects_under(gcs, "unreachable") == []


def test_missing_bucket_is_refused_by_name(gcs):
    env = _env(gcs.env)
    result = _run("soft-targets", "gs://no-such-bucket/run", env=env, check=False)
    assert result.returncode == 2
    assert "gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist" in result.stderr


def test_missing_credentials_are_refused_by_name(tmp_path):
    """No emulator and no credentials anywhere (the GCE metadata lookup is pointed at a
    closed loopback port): the command says so instead of retrying."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "STORAGE_EMULATOR_HOST",
            "TENSORSTORE_GCS_HTTP_URL",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING",
            "GOOGLE_APPLICATION_CREDENTIALS",
        )
    }
    env.update(
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        NO_GCE_CHECK="True",
        GCE_METADATA_HOST="127.0.0.1:9",
        GCE_METADATA_IP="127.0.0.1:9",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    )
    result = _run("train-teacher", "gs://some-bucket/run", env=env, check=False)
    assert result.returncode == 2
    assert "gs://some-bucket/run: no Google Cloud credentials found" in result.stderr


def test_prepare_and_prepared_data_on_gcs_are_refused_with_the_remedy(gcs, tmp_path):
    env = _env(gcs.env)
    out = gcs.gs("prepared")
    result = tiny_experiment.cli(
        "prepare", "--dataset", "local", "--teacher", "unused", "--out", out, env=env, check=False
    )
    assert result.returncode == 2
    assert f"--out {out} is on Cloud Storage" in result.stderr
    assert "prepare it on every host's local disk" in result.stderr
    result = _run("train-teacher", gcs.gs("no-local-data"), env=env, check=False)
    assert result.returncode == 2
    assert (
        f"the prepared dataset {gcs.gs('no-local-data', 'data')} is on Cloud Storage"
        in result.stderr
    ) and "data.prepared" in result.stderr
    assert _objects_under(gcs, "prepared") == []


# ----------------------------------------------------------------------------- end to end


def _wait_then_kill(process, ready, what: str) -> None:
    deadline = time.time() + 600
    while not ready():
        assert process.poll() is None, f"{what} ended before it could be killed"
        assert time.time() < deadline, f"{what}: nothing to kill at in time"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _start(command, workdir, *extra, env, teacher, data) -> subprocess.Popen:
    """``_run``'s command started, its output discarded (to be killed)."""
    args = _args(command, workdir, *extra, teacher=teacher, data=data)
    return subprocess.Popen(
        [*tiny_experiment.CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _pipeline(workdir, teacher, data, env, *, kill: bool, corpus, made: bool = False) -> dict:
    """prepare (local) -> teacher -> soft targets -> baseline and distilled student ->
    generate -> evaluate on ``workdir``; with ``kill``, SIGKILL the soft-target extraction
    after its first stored chunk and the distilled student after its first checkpoint, and
    rerun each; with ``made``, the teacher, the soft targets and the distilled student are
    there already (the session's tiny run), and only the rest runs. Returns what the runs
    scored."""
    from distill_jax import soft_target_cache, storage

    common = dict(env=env, teacher=teacher, data=data)
    if not made:
        _run("train-teacher", workdir, **common)
    cache = storage.path(workdir) / "soft_targets" / "train"
    if kill:
        process = _start("soft-targets", workdir, "--chunk-rows", CHUNK_ROWS, **common)
        _wait_then_kill(
            process, lambda: bool(soft_target_cache._stored_chunks(cache, "logits")), "soft-targets"
        )
        assert not soft_target_cache.is_finished(cache)  # a half-written cache is not done
        with pytest.raises(soft_target_cache.CacheError, match="not a finished"):
            soft_target_cache.open_cache(cache)
        refused = _run("train-student", workdir, "--name", "too-early", **common, check=False)
        assert refused.returncode == 2 and "not a finished soft-target cache" in refused.stderr
    if not made:
        _run("soft-targets", workdir, "--chunk-rows", CHUNK_ROWS, **common)
    _run(
        "train-student",
        workdir,
        "--name",
        "baseline",
        "--set",
        "distill.kd=none",
        **common,
    )
    if kill:
        process = _start("train-student", workdir, "--name", "distilled", **common)
        checkpoints = storage.path(workdir) / "students" / "distilled" / "checkpoints"
        _wait_then_kill(
            process,
            lambda: "2/commit_success.txt" in storage.list_files(checkpoints),
            "train-student",
        )  # killed after its first complete checkpoint
        assert not (checkpoints.parent / "results.json").exists()
    if not made:
        _run("train-student", workdir, "--name", "distilled", **common)
    hyp = storage.path(workdir) / "test2016.gen.txt"
    _run(
        "generate",
        workdir,
        "--name",
        "distilled",
        "--input",
        str(corpus / "test2016.de"),
        "--output",
        str(hyp),
        **common,
    )
    scored = tiny_experiment.cli(
        "evaluate", "--hyp", hyp, "--ref", corpus / "test2016.en", "--json", env=env
    )
    students = storage.path(workdir) / "students"
    return {
        "evaluate": json.loads(scored.stdout),
        **{
            name: json.loads((students / name / "results.json").read_text())["splits"]
            for name in ("baseline", "distilled")
        },
        "cache": _cache_arrays(cache),
    }


def _cache_arrays(path):
    from distill_jax.soft_target_cache import open_cache

    cache = open_cache(path)
    logits, indices = cache.read_async(range(len(cache))).result()
    return np.concatenate(logits), np.concatenate(indices)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_corpus, tiny_run, gcs):
    """(this module's folder, whose ``work`` is a copy of the session's uninterrupted tiny
    run; the tiny teacher; its prepared data; its corpus text): the prepared dataset stays
    local (read through grain)."""
    root = tmp_path_factory.mktemp("gcs-pipeline")
    shutil.copytree(tiny_run.workdir, root / "work")
    return root, tiny_corpus.teacher, tiny_corpus.data, tiny_corpus.corpus


@pytest.mark.slow
def test_pipeline_on_gcs_killed_and_rerun_scores_like_local(experiment, gcs):
    root, teacher, data, corpus = experiment
    env = _env(gcs.env)
    # The local run: the session's tiny run (teacher, soft targets, distilled student),
    # then its baseline, generate and evaluate.
    local = _pipeline(root / "work", teacher, None, env, kill=False, corpus=corpus, made=True)
    remote = _pipeline(gcs.gs("e2e", "work"), teacher, data, env, kill=True, corpus=corpus)
    for remote_array, local_array in zip(remote.pop("cache"), local.pop("cache")):
        np.testing.assert_array_equal(remote_array, local_array)  # the same soft targets
    assert remote == local  # every BLEU / ROUGE figure, to the digit
    assert local["distilled"]["test2016"]["bleu"] == remote["distilled"]["test2016"]["bleu"]
    # A gs:// cache made for other data (another teacher run) is refused, naming it.
    refused = _run(
        "train-student",
        gcs.gs("e2e", "work"),
        "--name",
        "foreign",
        "--set",
        f"teacher.checkpoint={teacher}",
        "--set",
        "teacher.steps=3",
        "--set",
        f"data.prepared={data}",
        env=env,
        check=False,
    )
    assert refused.returncode == 2
    assert (
        f"{gcs.gs('e2e', 'work', 'soft_targets', 'train')} was made for teacher" in refused.stderr
    )


@pytest.mark.slow
def test_two_processes_write_one_cache_and_checkpoint_on_gcs(experiment, gcs):
    """2 processes x 4 CPU devices: soft targets (the chunks dealt between them) and a
    student checkpoint on gs://, equal to what one process writes."""
    from test_multiprocess import REPO, clean_env

    from distill_jax import storage

    root, teacher, data, _ = experiment
    env = _env(gcs.env)
    workdir = gcs.gs("two", "work")
    common = [
        "--set",
        f"teacher.checkpoint={teacher}",
        "--set",
        f"data.prepared={data}",
        *tiny_experiment.MESH_2X2X2,
    ]
    _run("train-teacher", workdir, *common, env=env)
    for sub, extra in (
        ("soft-targets", ["--chunk-rows", CHUNK_ROWS]),
        (
            "train-student",
            [
                "--name",
                "two",
                "--set",
                "train.steps=2",
                "--set",
                "train.save_every=2",
                "--set",
                "train.eval_every=100",
            ],
        ),
    ):
        two = subprocess.run(
            tiny_experiment.two_processes(
                *tiny_experiment.CLI, *_args(sub, workdir, *common, *extra)
            ),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
            env=clean_env(**gcs.env),
        )
        assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    cache = storage.path(workdir) / "soft_targets" / "train"
    layout = json.loads((cache / "layout.json").read_text())
    assert layout["num_chunks"] > 2  # both processes owned chunks
    two_logits, two_ids = _cache_arrays(cache)
    single = _pipeline_cache_local(root)
    if single is not None:  # the teacher trained on another mesh: equal up to rounding
        np.testing.assert_allclose(two_logits, single[0], atol=2e-2)
        assert (two_ids == single[1]).mean() > 0.99
    run = storage.path(workdir) / "students" / "two"
    assert (run / "results.json").exists()
    assert "2/commit_success.txt" in storage.list_files(run / "checkpoints")


def _pipeline_cache_local(root):
    """The single-process local cache of the end-to-end test, if it ran in this session."""
    path = root / "work" / "soft_targets" / "train"
    return _cache_arrays(path) if (path / "header.json").exists() else None
