"""distill-jax: distil a C-MLM fine-tuned BERT into a Transformer seq2seq student (JAX/Flax)."""

from setuptools import find_packages, setup

setup(
    name="distill-jax",
    version="0.1.0",
    description=(
        "Distilling knowledge learned in BERT for text generation "
        "(Chen et al., ACL 2020) in JAX/Flax"
    ),
    packages=find_packages(include=["distill_jax", "distill_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "etils[epath]",  # paths on local disk and gs:// (distill_jax/storage.py)
        "tensorstore",  # the soft-target cache (zarr v3)
        "numpy",
        "safetensors",
        "transformers>=4.40",
        "huggingface_hub",
        "tensorflow-datasets>=4.9.7",
        "array_record",
        "grain",
        "sacrebleu>=2.3",
        "rouge-score",
        "sacremoses",  # Moses tokenization: IWSLT14 preprocessing, tokenized BLEU
        "tqdm",
    ],
    extras_require={
        # Parity tests and comparison benchmarks against PyTorch / transformers.
        "torch": ["torch"],
        # Work directories on Cloud Storage (gs://): etils.epath reaches it through gcsfs
        # (tensorstore, for checkpoint arrays and the soft-target cache, needs nothing more).
        "gcs": ["gcsfs"],
        # The gs:// tests run against a local emulator (tests/gcs_emulator.py).
        "test": ["pytest>=7", "torch", "matplotlib", "gcsfs", "gcp-storage-emulator",
                 "ctranslate2"],
        # `distill-jax export --ctranslate2` / `--format ctranslate2` (docs/export.md)
        "export": ["ctranslate2"],
        # Serving an export: transformers with torch, or CTranslate2.
        "serve": ["torch", "ctranslate2"],
        "plots": ["matplotlib"],
        # Upstream TFDS datasets (wmt14_translate, cnn_dailymail) need TensorFlow to build.
        "tf": ["tensorflow"],
    },
    entry_points={"console_scripts": ["distill-jax=distill_jax.cli:main"]},
)
