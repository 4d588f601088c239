"""``distill-jax prepare``: build a dataset (TFDS, array_record) and its student vocabulary.

Everything is written into a temporary directory beside ``--out`` and renamed into place at
the end, so a failed run leaves nothing that looks like a dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from distill_jax import storage
from distill_jax.data import builders
from distill_jax.data.prepared import DATASET_FORMAT
from distill_jax.data.vocab import TeacherTokenizer, Vocabulary
from distill_jax.errors import UserError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``distill-jax prepare``."""
    parser.add_argument("--dataset", required=True, help=f"one of {_dataset_names()}")
    parser.add_argument(
        "--direction", default=None, help="source-target, e.g. de-en (default: the corpus's first)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="local copy of the corpus files (else they are downloaded)",
    )
    parser.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=SRC,TGT",
        help="for --dataset local: a split and its two files (repeatable)",
    )
    parser.add_argument(
        "--teacher",
        required=True,
        help="teacher BERT folder or Hugging Face name (its tokenizer is used)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="directory to create (local: the dataset is read from local disk)",
    )
    parser.add_argument(
        "--vocab",
        type=Path,
        default=None,
        help="reuse this vocab.json instead of building one from train",
    )
    parser.add_argument(
        "--min-count",
        type=int,
        default=1,
        help="least training-split count of a piece in the vocabulary",
    )
    parser.add_argument(
        "--size-multiple",
        type=int,
        default=8,
        help="vocabulary size is padded to a multiple of this",
    )
    parser.add_argument(
        "--max-src-len",
        type=int,
        default=256,
        help="drop pairs whose source has more pieces (</s> included)",
    )
    parser.add_argument(
        "--max-tgt-len",
        type=int,
        default=256,
        help="drop pairs whose target has more pieces (</s> included)",
    )


def _dataset_names() -> list[str]:
    return (
        sorted(builders.CORPORA)
        + sorted(builders.ARCHIVE_CORPORA)
        + ["local"]
        + sorted(builders.UPSTREAM)
    )


def _download_manager():
    """TFDS's download manager, caching under ~/.cache/distill-jax/downloads."""
    import tensorflow_datasets as tfds

    return tfds.download.DownloadManager(
        download_dir=str(Path.home() / ".cache" / "distill-jax" / "downloads")
    )


def _local_split_files(specs: list[str], data_dir: Path | None) -> dict[str, tuple[str, str]]:
    """Parses ``--split NAME=SRC,TGT`` arguments."""
    if not specs:
        raise UserError("--dataset local needs at least one --split NAME=SRC,TGT")
    if data_dir is None:
        raise UserError("--dataset local needs --data-dir (the folder of the files)")
    out = {}
    for spec in specs:
        name, _, files = spec.partition("=")
        parts = files.split(",")
        if not name or len(parts) != 2 or not all(parts):
            raise UserError(f"--split {spec!r}: expected NAME=SRC_FILE,TGT_FILE")
        out[name] = (parts[0], parts[1])
    return out


def _read_texts(
    args, spec: builders.CorpusSpec, direction: str
) -> dict[str, tuple[list[str], list[str]]]:
    """Fetches (or finds and verifies) the files, then reads every split's line pairs."""
    dl_manager = _download_manager() if args.data_dir is None else None
    return builders.read_corpus(spec, direction, args.data_dir, dl_manager)


def _print_counts(encoded: dict[str, builders.EncodedSplit], out: Path, vocab: Vocabulary) -> None:
    """The per-split table printed at the end."""
    print(f"prepared {out} (vocabulary {vocab.name}, {len(vocab)} ids)")
    print(f"{'split':<12}{'lines':>9}{'kept':>9}{'empty':>9}{'too long':>10}")
    for split, enc in encoded.items():
        c = enc.counts
        print(f"{split:<12}{c.lines:>9}{c.kept:>9}{c.dropped_empty:>9}{c.dropped_too_long:>10}")


def run(args: argparse.Namespace) -> int:
    """Builds the dataset directory ``args.out``."""
    out = Path(
        storage.require_local(
            args.out,
            "--out",
            "the prepared dataset is read through grain / tfds.data_source, which open local "
            "files only; prepare it on every host's local disk (the result is the same everywhere) "
            "and keep the work directory (--workdir) on Cloud Storage",
        )
    )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty")
    for flag in ("min_count", "size_multiple", "max_src_len", "max_tgt_len"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    limits = builders.LengthLimits(args.max_src_len, args.max_tgt_len)

    text_format = None
    split_files: dict[str, tuple[str, str]] = {}  # for messages: split -> its two files
    if args.dataset in builders.UPSTREAM:
        upstream = builders.UPSTREAM[args.dataset]
        direction = args.direction or next(iter(upstream.directions))
        texts = builders.read_upstream(upstream, direction, args.data_dir)
        train_split = upstream.train_split
    elif args.dataset in builders.ARCHIVE_CORPORA:
        archive = builders.ARCHIVE_CORPORA[args.dataset]
        direction = args.direction or archive.direction
        if direction != archive.direction:
            raise UserError(
                f"corpus {archive.name!r} has only the direction "
                f"{archive.direction!r}, not {direction!r}"
            )
        texts = builders.read_archive_corpus(
            archive, args.data_dir, _download_manager() if args.data_dir is None else None
        )
        train_split, text_format = archive.train_split, archive.text
    else:
        if args.dataset == "local":
            split_files = {
                split: tuple(str(Path(args.data_dir) / name) for name in names)
                for split, names in _local_split_files(args.split, args.data_dir).items()
            }
            spec = builders.local_corpus(_local_split_files(args.split, args.data_dir))
        elif args.dataset in builders.CORPORA:
            spec = builders.CORPORA[args.dataset]
        else:
            raise UserError(f"unknown --dataset {args.dataset!r}; choose one of {_dataset_names()}")
        direction = args.direction or next(iter(spec.directions))
        texts = _read_texts(args, spec, direction)
        train_split, text_format = spec.train_split, spec.text or None

    logger.info(
        "read %s (%s): %s",
        args.dataset,
        direction,
        ", ".join(f"{split} {len(src)} pairs" for split, (src, _) in texts.items()),
    )
    tokenizer = TeacherTokenizer.load(args.teacher)
    given_vocab = Vocabulary.load(args.vocab, tokenizer) if args.vocab else None
    vocab, encoded = builders.encode_corpus(
        texts, train_split, tokenizer, given_vocab, args.min_count, args.size_multiple, limits
    )
    _refuse_empty_splits(encoded, args.dataset, split_files)
    logger.info("writing the dataset (TFDS array_record) to %s", out)
    _write_dataset(out, args.dataset, direction, vocab, encoded, limits, text_format)
    _print_counts(encoded, out, vocab)
    return 0


def _refuse_empty_splits(
    encoded: dict[str, builders.EncodedSplit], corpus: str, split_files: dict[str, tuple[str, str]]
) -> None:
    """A split with no pair left to store (empty files, or every line empty or too long)
    is refused here, naming its files, before anything is written."""
    for split, enc in encoded.items():
        if enc.counts.kept:
            continue
        c = enc.counts
        where = " and ".join(split_files[split]) if split in split_files else f"corpus {corpus!r}"
        why = (
            "the files are empty"
            if c.lines == 0
            else (
                f"all {c.lines} lines were dropped ({c.dropped_empty} empty, "
                f"{c.dropped_too_long} over --max-src-len / --max-tgt-len)"
            )
        )
        raise UserError(f"split {split!r} ({where}) has no sentence pair to store: {why}")


def _write_dataset(
    out: Path,
    corpus: str,
    direction: str,
    vocab: Vocabulary,
    encoded: dict[str, builders.EncodedSplit],
    limits: builders.LengthLimits,
    text_format: dict | None = None,
) -> None:
    """Writes the TFDS dataset, vocabulary, lengths and dataset.json, then renames into place.
    ``text_format`` (how a preprocessed corpus's text is tokenized) goes into dataset.json as
    ``"text"``; scoring reads it to add tokenized BLEU."""
    import tensorflow_datasets as tfds

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = builders.config_name(corpus, direction)
        known = {c.name for c in builders.DistillParallel.BUILDER_CONFIGS}
        config_arg = (
            config
            if config in known
            else builders.ParallelCorpusConfig(
                name=config,
                corpus=corpus,
                direction=direction,
                description=f"{corpus}, direction {direction}.",
            )
        )
        builder = builders.DistillParallel(
            config=config_arg,
            data_dir=str(tmp / "tfds"),
            file_format="array_record",
            encoded=encoded,
        )
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=True))
        vocab.save(tmp / "vocab.json")
        (tmp / "lengths").mkdir()
        for split, enc in encoded.items():
            np.save(tmp / "lengths" / f"{split}.npy", enc.lengths())
        meta = {
            "format": DATASET_FORMAT,
            "corpus": corpus,
            "direction": direction,
            "tfds_name": f"{builders.BUILDER_NAME}/{config}",
            "splits": {split: vars(enc.counts) for split, enc in encoded.items()},
            "limits": vars(limits),
            "vocab": {
                "name": vocab.name,
                "sha256": vocab.sha256,
                "size": len(vocab),
                "teacher": vocab.teacher,
            },
        }
        if text_format:
            meta["text"] = dict(text_format)
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked in run)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
