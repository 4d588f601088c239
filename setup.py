"""distill-jax: distil a C-MLM fine-tuned BERT into a Transformer seq2seq student (JAX/Flax).

Version floors are the versions the test suite runs with; constraints.txt pins every package
the test extra installs to exactly those (scripts/test.sh; `--newest` leaves it out).
"""

from setuptools import find_packages, setup

setup(
    name="distill-jax",
    version="0.1.0",
    description=(
        "Distilling knowledge learned in BERT for text generation "
        "(Chen et al., ACL 2020) in JAX/Flax"
    ),
    packages=find_packages(include=["distill_jax", "distill_jax.*"]),
    package_data={"distill_jax": ["py.typed"]},  # PEP 561: the package ships its types
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "etils[epath]>=1.15.0",  # paths on local disk and gs:// (distill_jax/storage.py)
        "tensorstore>=0.1.86",  # the soft-target cache (zarr v3)
        "numpy>=2.4.6",
        "safetensors>=0.8.0",
        "transformers>=5.25.0",
        "huggingface_hub>=2.4.0",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.6",
        "grain>=0.2.18",
        "sacrebleu>=2.6.0",
        "rouge-score>=0.1.2",
        "sacremoses>=0.2.0",  # Moses tokenization: IWSLT14 preprocessing, tokenized BLEU
        "tqdm>=4.70.1",
    ],
    extras_require={
        # Parity tests and comparison benchmarks against PyTorch / transformers.
        "torch": ["torch>=2.13.0"],
        # Work directories on Cloud Storage (gs://): etils.epath reaches it through gcsfs
        # (tensorstore, for checkpoint arrays and the soft-target cache, needs nothing more).
        "gcs": ["gcsfs>=2026.10.1"],
        # The gs:// tests run against a local emulator (tests/gcs_emulator.py); ruff lints.
        "test": [
            "pytest>=9.2.0",
            "pytest-xdist>=3.8.0",
            "filelock>=4.3.2",
            "torch>=2.13.0",
            "matplotlib>=3.11.2",
            "gcsfs>=2026.10.1",
            "gcp-storage-emulator>=2026.7.19",
            "ctranslate2>=4.8.5",
            "ruff>=0.17.6",
            "tensorboardX>=2.6.5",
        ],
        # Contributing: the test extra and the pre-commit hooks (.pre-commit-config.yaml).
        "dev": ["distill-jax[test]", "pre-commit>=4.7.0"],
        # `distill-jax export --ctranslate2` / `--format ctranslate2` (docs/export.md)
        "export": ["ctranslate2>=4.8.5"],
        # Serving an export: transformers with torch, or CTranslate2.
        "serve": ["torch>=2.13.0", "ctranslate2>=4.8.5"],
        "plots": ["matplotlib>=3.11.2"],
        # Upstream TFDS datasets (wmt14_translate, cnn_dailymail) need TensorFlow to build.
        "tf": ["tensorflow"],
        # TensorBoard event files beside metrics.jsonl (distill_jax/observe.py).
        "tensorboard": ["tensorboardX>=2.6.5"],
    },
    entry_points={"console_scripts": ["distill-jax=distill_jax.cli:main"]},
)
