"""Test set-up: 8 simulated CPU devices, so that every sharding path is exercised."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import dataclasses
import json
import pathlib
import shutil
import subprocess
import tempfile

# One persistent XLA compilation cache for the session, inherited by the `distill-jax`
# processes the tests start: a program that one test or process compiled (the tiny
# experiment's train step, the beam search of each length bucket) is loaded from it by
# the next one that builds the same program instead of being compiled again, which is most
# of what the end-to-end tests spent their time on. A cached program is the same binary,
# so results do not change. The cache starts empty and is removed when the session ends;
# set JAX_COMPILATION_CACHE_DIR yourself to keep one (e.g. across local reruns).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="distill-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    atexit.register(shutil.rmtree, _xla_cache, True)
# Every program is kept, not only those that took over a second to compile (JAX's
# default): a CLI process of the tiny pipeline also compiles ~150 small programs (parameter
# initialisation, eager array operations, the metrics), each well under a second. On the
# kill -9 matrix with its reference run (15 processes), quiet, 2 cores of a Zen 3 EPYC:
# 398 -> 375 s of CPU, 5 min 37 s -> 5 min 21 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- scheduling
# scripts/test.sh runs the suite on parallel workers, one test module at a time per worker
# (pytest-xdist --dist loadfile --no-loadscope-reorder), handing out modules in collection
# order. The longest modules go first, longest first, so that the work left at the end is
# short modules that even out the workers (xdist's default order, most tests first, left
# the one-test crash matrix for last). The order is that of each module's seconds in the
# full suite at 846fab6 (fresh clone, 2 cores, quiet, --durations=0: 646 gs://, 379 the
# data tests with the quick demo they start, ... 38 the scaling benchmark); the other
# modules take under 30 s each and keep their order after these. test_demo.py comes well
# after the demo's first user (test_data_multi30k.py), so no worker waits for the demo.
LONGEST_MODULES = (
    "test_gcs.py",
    "test_data_multi30k.py",
    "test_pipeline.py",
    "test_train_step.py",
    "test_export.py",
    "test_crash_matrix.py",
    "test_multiprocess.py",
    "test_decode.py",
    "test_generate_stream.py",
    "test_gpu_path.py",
    "test_transformer.py",
    "test_api.py",
    "test_run_safety.py",
    "test_runtime.py",
    "test_demo.py",
    "test_provenance.py",
    "test_bert.py",
    "test_bench_scaling.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The local corpora in ../shared/data (see its README)."""
    path = pathlib.Path(os.environ.get("DISTILL_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "multi30k" / "train.en").is_file():
        pytest.skip(f"the shared corpora are not at {path} (set DISTILL_JAX_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 checkpoint folder fetched by scripts/fetch_minilm.sh."""
    path = pathlib.Path(
        os.environ.get("DISTILL_JAX_MINILM", REPO / ".cache" / "distill-jax" / "all-MiniLM-L6-v2")
    )
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"all-MiniLM-L6-v2 is not at {path}; run scripts/fetch_minilm.sh")
    return path


@pytest.fixture(scope="session")
def gcs():
    """A Cloud Storage emulator on 127.0.0.1 for the whole session (tests/gcs_emulator.py);
    skipped when gcp-storage-emulator or gcsfs is not installed (the `test` extra)."""
    import gcs_emulator  # (before gcsfs is imported)

    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    with gcs_emulator.running() as emulator:
        yield emulator


# ----------------------------------------------------------------------------- shared runs
# What several test modules read is made once per session: the tiny corpus and teacher of
# the end-to-end tests, and the quick demo (whose prepared Multi30k is the one the data
# tests read). Tests only read these; each writes its own runs into its own folders.


@dataclasses.dataclass(frozen=True)
class TinyCorpus:
    """tests/tiny_experiment.py's tiny random BERT (MiniLM's vocabulary and tokenizer) and
    the first 240 / 24 / 24 lines of Multi30k de-en, prepared (read it through
    ``--set data.prepared=DATA``)."""

    teacher: pathlib.Path
    corpus: pathlib.Path  # the text files (train/val/test2016 .de/.en)
    data: pathlib.Path  # the prepared dataset


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, minilm_dir, shared_data) -> TinyCorpus:
    """Made once per session, also with parallel workers (``_once``)."""
    import tiny_experiment

    def make(root):
        teacher = tiny_experiment.save_tiny_teacher(root / "teacher", minilm_dir)
        specs = tiny_experiment.write_corpus(shared_data, root / "corpus")
        tiny_experiment.prepare(teacher, root / "corpus", specs, root / "data")

    root = _once(tmp_path_factory, "tiny-corpus", make)
    return TinyCorpus(root / "teacher", root / "corpus", root / "data")


@dataclasses.dataclass(frozen=True)
class TinyRun:
    """The uninterrupted tiny pipeline on ``TinyCorpus`` (tests/crash_matrix.py's
    reference run: configs/tiny.py's teacher, its soft targets in chunks of 512 rows, the
    offline-distilled student ``distilled``), finished. Read only: a test that runs more
    commands on it copies ``workdir`` first."""

    workdir: pathlib.Path  # teacher/, soft_targets/train/, students/distilled/, data/
    teacher: pathlib.Path  # the tiny BERT it was made with (--set teacher.checkpoint=)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_corpus) -> TinyRun:
    """Made once per session, also with parallel workers (``_once``): the crash matrix,
    the gs:// pipeline and test_pipeline.py compare with it or build on a copy of it."""
    import crash_matrix

    def make(root):
        shutil.copytree(tiny_corpus.data, root / "work" / "data")
        failures = crash_matrix.reference_run(root, root / "work", tiny_corpus.teacher)
        assert not failures, failures[0]

    root = _once(tmp_path_factory, "tiny-run", make)
    return TinyRun(root / "work", tiny_corpus.teacher)


def _once(tmp_path_factory, name: str, make) -> pathlib.Path:
    """The session folder ``name`` (``_session_dir``), filled by ``make(folder)`` by the
    first worker that needs it, under a file lock; the others wait for it. A ``make``
    that fails leaves no folder behind, so the next test that needs it tries again (and
    fails with the same error)."""
    import filelock

    root = _session_dir(tmp_path_factory, name)
    with filelock.FileLock(f"{root}.lock"):
        if not (root / ".made").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            try:
                make(root)
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
            (root / ".made").touch()
    return root


@dataclasses.dataclass(frozen=True)
class QuickDemo:
    workdir: pathlib.Path  # WORKDIR of the run
    env: dict  # its environment (a rerun uses the same)
    result: subprocess.CompletedProcess  # the first run: exit status, stdout, stderr


def _demo_applies(shared_data: pathlib.Path) -> bool:
    """The demo reads ../shared/data beside the checkout."""
    return pathlib.Path(shared_data).resolve() == (REPO.parent / "shared" / "data").resolve()


def _overlay_venv(path: pathlib.Path) -> pathlib.Path:
    """A virtualenv for the demo's own `pip install -e .` that sees this session's packages
    (a .pth file adds their site directory) but is not this session's: pip installs the
    project into it and leaves the session's environment alone, which the tests running
    at the same time in other workers import from. Creating it takes a second: no pip of
    its own (the session's is found through the .pth file) and nothing to download."""
    import sysconfig
    import venv

    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    session_site = sysconfig.get_paths()["purelib"]
    pathlib.Path(purelib, "distill-jax-test-session.pth").write_text(
        f"import site; site.addsitedir({session_site!r})\n"
    )
    return path


def _session_dir(tmp_path_factory, name: str) -> pathlib.Path:
    """A folder of this test session that every pytest-xdist worker sees (each worker's
    own temporary folder is one level below the session's)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return base / name


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, minilm_dir, shared_data) -> QuickDemo:
    """`scripts/demo.sh --quick` run once, as a user runs it (on the real devices: no
    simulated ones), into a fresh WORKDIR; a failed run is returned too (its test says
    why). Once per session, also with parallel workers (``_once``): the first worker that
    needs it runs it and records the result, the others wait and read it."""
    if not _demo_applies(shared_data):
        pytest.skip("the demo reads ../shared/data beside the checkout")

    def make(root):
        env = dict(
            os.environ,
            WORKDIR=str(root / "demo"),
            VENV=str(_overlay_venv(root / "venv")),
            DISTILL_JAX_CACHE=str(pathlib.Path(minilm_dir).parent),
        )
        env.pop("XLA_FLAGS", None)  # the demo runs as a user would: on the real devices
        import tiny_experiment

        run = tiny_experiment.demo("--quick", env=env, timeout=1800)
        saved = {"env": env, "args": run.args, "returncode": run.returncode}
        (root / "run.json").write_text(
            json.dumps({**saved, "stdout": run.stdout, "stderr": run.stderr})
        )

    root = _once(tmp_path_factory, "quick-demo", make)
    saved = json.loads((root / "run.json").read_text())
    result = subprocess.CompletedProcess(
        saved["args"], saved["returncode"], saved["stdout"], saved["stderr"]
    )
    return QuickDemo(root / "demo", saved["env"], result)


# What the demo's `prepare` call must have recorded for its dataset to be the one
# multi30k_de_en would prepare (the same command: prepare's default limits).
MULTI30K_DE_EN = {
    "corpus": "multi30k",
    "direction": "de-en",
    "limits": {"max_src_len": 256, "max_tgt_len": 256},
}


@pytest.fixture(scope="session")
def multi30k_de_en(request, tmp_path_factory, shared_data, minilm_dir) -> pathlib.Path:
    """Multi30k de-en prepared with the MiniLM tokenizer: `distill-jax prepare --dataset
    multi30k --direction de-en --data-dir SHARED/multi30k --teacher MINILM --out DIR`.

    When this session also runs the quick demo, which prepares it with that same command,
    the demo's `data` folder is used (once the demo has made it; checked to be the same
    corpus, direction, limits and tokenizer), so that the full corpus is prepared once;
    otherwise (e.g. the fast tier) it is prepared here."""
    if _demo_applies(shared_data) and any(
        "quick_demo" in item.fixturenames for item in request.session.items
    ):
        data = request.getfixturevalue("quick_demo").workdir / "data"
        meta_path = data / "dataset.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if {k: meta.get(k) for k in MULTI30K_DE_EN} == MULTI30K_DE_EN and meta["vocab"][
                "teacher"
            ] == str(minilm_dir):
                return data
    from distill_jax.cli import main

    out = tmp_path_factory.mktemp("m30k") / "de_en"
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "multi30k",
                "--direction",
                "de-en",
                "--data-dir",
                str(shared_data / "multi30k"),
                "--teacher",
                str(minilm_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out
