"""Test set-up: 8 simulated CPU devices, so that every sharding path is exercised."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

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
