"""A prepared dataset directory: the TFDS dataset, its vocabulary and per-split lengths.

Layout written by ``distill-jax prepare``::

    OUT/dataset.json          what was built: corpus, direction, TFDS name, counts, vocabulary
    OUT/vocab.json            the student vocabulary the ids refer to
    OUT/lengths/SPLIT.npy     [n, 2] int32 source / target lengths of record i (for bucketing)
    OUT/tfds/...              the TFDS dataset (array_record), read with tfds.data_source
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill_jax import storage
from distill_jax.data.vocab import Vocabulary
from distill_jax.errors import UserError

DATASET_FORMAT = "distill-jax-dataset/1"


@dataclass
class PreparedDataset:
    """A dataset directory written by ``distill-jax prepare``."""

    path: Path  # the directory
    meta: dict  # the content of dataset.json
    vocab: Vocabulary  # the vocabulary the stored ids refer to

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def source(self, split: str):
        """``tfds.data_source`` of one split: random access to examples (dicts of numpy)."""
        import tensorflow_datasets as tfds

        import distill_jax.data.builders  # noqa: F401  (registers the builder class)

        self._check_split(split)
        return tfds.data_source(
            self.meta["tfds_name"], data_dir=os.fspath(self.path / "tfds"), split=split
        )

    def records(self, split: str, limit: int = 0) -> tuple[RecordView, np.ndarray]:
        """(random-access records, ``[n, 2]`` lengths) of the first ``limit`` records of
        ``split`` (all when ``limit`` is 0): how a run trains on part of a corpus."""
        source, lengths = self.source(split), self.lengths(split)
        count = len(source) if not limit else min(limit, len(source))
        return RecordView(source, count), lengths[:count]

    def lengths(self, split: str) -> np.ndarray:
        """[n, 2] int32: source and target length of each record of ``split``."""
        self._check_split(split)
        return np.load(self.path / "lengths" / f"{split}.npy")

    def _check_split(self, split: str) -> None:
        if split not in self.meta["splits"]:
            raise UserError(f"{self.path} has no split {split!r} (splits: {self.splits})")


class RecordView:
    """The first ``count`` records of a data source, with the same random-access API."""

    def __init__(self, source, count: int):
        self.source = source
        self.count = count

    def __len__(self) -> int:
        return self.count

    def _check(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"record {index} is outside the first {self.count} records")
        return index

    def __getitem__(self, index: int):
        return self.source[self._check(int(index))]

    def __getitems__(self, indices):
        return self.source.__getitems__([self._check(int(i)) for i in indices])


def open_prepared(
    path: str | os.PathLike, vocab: Vocabulary | str | os.PathLike | None = None
) -> PreparedDataset:
    """Opens a prepared dataset; with ``vocab`` (a Vocabulary or a vocab.json path), refuses a
    dataset whose ids refer to another vocabulary. The dataset must be on local disk (its
    array_record files are opened by path); a ``gs://`` path is refused with the remedy."""
    path = Path(
        storage.require_local(
            path,
            "the prepared dataset",
            "copy it to local disk on every host (`gcloud storage cp -r ...`) or run "
            "`distill-jax prepare` on every host (it is deterministic), and pass that path",
        )
    )
    meta_path = path / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path} is not a prepared dataset (no dataset.json); run `distill-jax prepare`"
        ) from None
    if meta.get("format") != DATASET_FORMAT:
        raise UserError(f"{meta_path}: format {meta.get('format')!r}, expected {DATASET_FORMAT!r}")
    stored = Vocabulary.load(path / "vocab.json")
    if stored.sha256 != meta["vocab"]["sha256"]:
        raise UserError(
            f"{path}/vocab.json ({stored.name}) is not the vocabulary the dataset was "
            f"encoded with ({meta['vocab']['name']})"
        )
    if vocab is not None:
        wanted = vocab if isinstance(vocab, Vocabulary) else Vocabulary.load(vocab)
        if wanted.sha256 != stored.sha256:
            raise UserError(
                f"dataset {path} was prepared with vocabulary {stored.name}, but this "
                f"run uses vocabulary {wanted.name}; prepare the data again with "
                f"--vocab, or use the dataset's vocab.json"
            )
        stored.tokenizer = wanted.tokenizer
    return PreparedDataset(path, meta, stored)
