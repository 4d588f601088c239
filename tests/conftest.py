"""Test set-up: 8 simulated CPU devices, so that every sharding path is exercised."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import pathlib
import shutil
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

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


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
    path = pathlib.Path(os.environ.get(
        "DISTILL_JAX_MINILM", REPO / ".cache" / "distill-jax" / "all-MiniLM-L6-v2"))
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
