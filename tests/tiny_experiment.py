"""Test support: a small end-to-end experiment on real data.

* a tiny random BERT (2 layers, width 32) that uses all-MiniLM-L6-v2's WordPiece
  vocabulary, saved in Hugging Face format with its tokenizer files, so that the real
  loading and tokenization code runs;
* the first lines of Multi30k de-en (train / val / test2016) written as a local corpus and
  prepared with ``distill-jax prepare``;
* the command lines the end-to-end tests run: ``cli`` (``python -m distill_jax.cli`` in a
  fresh process), ``run_args`` / ``run_cli`` (a command on a work directory with a
  teacher checkpoint), ``two_processes`` (through the local launcher),
  ``local_corpus_args`` (``prepare --dataset local``) and ``demo`` (``scripts/demo.sh``).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny.py"
CLI = [sys.executable, "-m", "distill_jax.cli"]  # `distill-jax` in a fresh process
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


def local_corpus_args(
    data_dir: pathlib.Path, teacher, split_specs: list[str], *extra: str
) -> list[str]:
    """The arguments of ``prepare --dataset local`` (after the subcommand) for the text
    files in ``data_dir``: one ``--split`` per spec (``NAME=SRC,TGT``), then ``extra``."""
    args = ["--dataset", "local", "--data-dir", str(data_dir), "--teacher", str(teacher)]
    for spec in split_specs:
        args += ["--split", spec]
    return [*args, *extra]


def cli(*args, check: bool = True, timeout: float = 900, **run) -> subprocess.CompletedProcess:
    """``python -m distill_jax.cli ARGS`` in a fresh process, its output captured
    (``run``: more ``subprocess.run`` arguments: env, cwd). With ``check``, a non-zero
    exit fails with the end of its standard error."""
    result = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, **run
    )
    if check and result.returncode:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def run_args(workdir, teacher, command: str, *extra: str, config: str = CONFIG) -> list[str]:
    """``COMMAND --config CONFIG --workdir WORKDIR`` with ``teacher`` as the teacher
    checkpoint (none: the config's), no progress bars, then ``extra``."""
    args = [command, "--config", config, "--workdir", str(workdir)]
    if teacher is not None:
        args += ["--set", f"teacher.checkpoint={teacher}"]
    return [*args, "--no-progress", *extra]


def run_cli(
    workdir, teacher, command: str, *extra: str, config: str = CONFIG, check: bool = True, **run
) -> subprocess.CompletedProcess:
    """``distill-jax COMMAND`` on ``workdir`` with ``teacher`` (``run_args``), through
    ``cli``."""
    return cli(*run_args(workdir, teacher, command, *extra, config=config), check=check, **run)


# a (2,2,2) mesh of the 8 devices: what a run spread over ``two_processes`` uses
MESH_2X2X2 = ["--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2"]


def two_processes(*command: str) -> list[str]:
    """``command`` (an argv) run by the local launcher as 2 processes of 4 CPU devices."""
    return [
        sys.executable,
        "-m",
        "distill_jax.launch",
        "--local-processes",
        "2",
        "--devices-per-process",
        "4",
        "--",
        *command,
    ]


def prepare(
    teacher: pathlib.Path, corpus: pathlib.Path, split_specs: list[str], out: pathlib.Path
) -> None:
    cli(
        "prepare", *local_corpus_args(corpus, teacher, split_specs, "--out", str(out)), timeout=None
    )


def prepare_in_process(dataset: str, data_dir, teacher, out, *extra: str) -> int:
    """``prepare --dataset DATASET`` of the files in ``data_dir`` into ``out``, in this
    process (``cli.main``: its output goes to the test's capsys); its exit status."""
    from distill_jax.cli import main

    args = ["--dataset", dataset, "--data-dir", str(data_dir), "--teacher", str(teacher)]
    return main(["prepare", *args, "--out", str(out), *extra])


def demo(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``bash scripts/demo.sh ARGS`` from the repository root, its output captured."""
    return subprocess.run(
        ["bash", "scripts/demo.sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sets(*assignments: str) -> list[str]:
    """``--set A --set B ...``: config overrides as command-line arguments."""
    return [arg for assignment in assignments for arg in ("--set", assignment)]
