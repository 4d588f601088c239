"""Test support: a small end-to-end experiment on real data.

* a tiny random BERT (2 layers, width 32) that uses all-MiniLM-L6-v2's WordPiece
  vocabulary, saved in Hugging Face format with its tokenizer files, so that the real
  loading and tokenization code runs;
* the first lines of Multi30k de-en (train / val / test2016) written as a local corpus and
  prepared with ``distill-jax prepare``.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def save_tiny_teacher(path: pathlib.Path, minilm_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A random BertForMaskedLM with MiniLM's vocabulary and tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    transformers.BertForMaskedLM(config).save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).exists():
            shutil.copy(minilm_dir / name, path / name)
    return path


def write_corpus(
    shared_data: pathlib.Path,
    out: pathlib.Path,
    sizes=(("train", "train", 240), ("val", "val", 24), ("test2016", "test_2016_flickr", 24)),
) -> list[str]:
    """The first lines of Multi30k splits; returns ``--split`` arguments for prepare
    (file names relative to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for split, stem, lines in sizes:
        for lang in ("de", "en"):
            text = (shared_data / "multi30k" / f"{stem}.{lang}").read_text(encoding="utf-8")
            (out / f"{split}.{lang}").write_text(
                "".join(line + "\n" for line in text.splitlines()[:lines]), encoding="utf-8"
            )
        specs.append(f"{split}={split}.de,{split}.en")
    return specs


def prepare(
    teacher: pathlib.Path, corpus: pathlib.Path, split_specs: list[str], out: pathlib.Path
) -> None:
    args = [
        sys.executable,
        "-m",
        "distill_jax.cli",
        "prepare",
        "--dataset",
        "local",
        "--data-dir",
        str(corpus),
        "--teacher",
        str(teacher),
        "--out",
        str(out),
    ]
    for spec in split_specs:
        args += ["--split", spec]
    subprocess.run(args, check=True, capture_output=True, text=True)
