"""A portable, memory-mapped cache of the teacher's top-K soft targets.

Layout of a finished cache directory::

    header.json     format version, teacher, vocabulary, dataset, split, K, counts
    logits.f16      float16 [total_rows, K]   the teacher's raw top-K logits
    indices.i32     int32   [total_rows, K]   their student-vocabulary ids
    offsets.i64     int64   [num_examples + 1] example i owns rows offsets[i]:offsets[i+1]

Row ``offsets[i] + t`` holds the teacher's prediction for target position ``t`` of
example ``i``, i.e. for ``tgt_out[t]`` (``tgt[1:]``, the final EOS slot included).

Writing happens in ``<dir>.partial/``: rows may be written in any order and by several
processes (each one owns disjoint examples and records what it finished in its own
``done-<process>.npy``), so an interrupted extraction resumes where it stopped. Only
``finalize`` writes ``header.json`` and renames the folder into place, so a folder
without ``.partial`` is always complete. ``open_cache`` refuses a cache whose files are
truncated or whose teacher / vocabulary / dataset differ from the ones a run expects.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import numpy as np

FORMAT_VERSION = 1
_LOGITS, _INDICES, _OFFSETS, _HEADER = "logits.f16", "indices.i32", "offsets.i64", "header.json"


class CacheError(ValueError):
    """A soft-target cache that cannot be used: missing, truncated, or made for other data."""


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache was computed from; a run refuses a cache whose identity differs."""

    teacher: str  # name or fingerprint of the fine-tuned teacher checkpoint
    vocabulary: str  # fingerprint of the student vocabulary (ids of the stored indices)
    dataset: str  # name and fingerprint of the prepared dataset
    split: str  # the split whose targets were scored
    top_k: int  # K, entries kept per position
    stride: int  # masking stride S used for extraction (every position masked once)


def _partial(path: str) -> str:
    return path.rstrip("/") + ".partial"


class CacheWriter:
    """Fills a cache in ``<path>.partial``; create or resume with :func:`create_or_resume`."""

    def __init__(self, path: str, identity: CacheIdentity, offsets: np.ndarray,
                 process_index: int = 0):
        self.path = path
        self.identity = identity
        self.offsets = offsets
        self.process_index = process_index
        work = _partial(path)
        rows, k = int(offsets[-1]), identity.top_k
        self._logits = np.memmap(os.path.join(work, _LOGITS), np.float16, "r+", shape=(rows, k))
        self._indices = np.memmap(os.path.join(work, _INDICES), np.int32, "r+", shape=(rows, k))
        self._done_path = os.path.join(work, f"done-{process_index}.npy")
        self.done = (np.load(self._done_path) if os.path.exists(self._done_path)
                     else np.zeros(len(offsets) - 1, dtype=bool))

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    def pending(self, example_ids: Iterable[int]) -> list[int]:
        """The given examples that this process has not written yet."""
        return [int(i) for i in example_ids if not self.done[int(i)]]

    def write(self, example_index: int, logits: np.ndarray, indices: np.ndarray) -> None:
        """Stores ``logits``/``indices`` ``[target_len, K]`` for one example; each row's
        logits must be sorted in decreasing order (so a run may use the first K' <= K)."""
        start, end = int(self.offsets[example_index]), int(self.offsets[example_index + 1])
        expected = (end - start, self.identity.top_k)
        if logits.shape != expected or indices.shape != expected:
            raise CacheError(
                f"example {example_index}: expected soft targets of shape {expected}, got "
                f"logits {logits.shape} and indices {indices.shape}")
        if logits.size and np.any(np.diff(logits, axis=-1) > 0):
            raise CacheError(f"example {example_index}: top-K logits must be sorted in "
                             "decreasing order along K")
        self._logits[start:end] = logits.astype(np.float16)
        self._indices[start:end] = indices.astype(np.int32)
        self.done[example_index] = True

    def flush(self) -> None:
        """Makes the rows written so far durable, then records them as done (in that order,
        so a crash never marks unwritten rows as done)."""
        self._logits.flush()
        self._indices.flush()
        tmp = self._done_path + ".tmp.npy"
        np.save(tmp, self.done)
        os.replace(tmp, self._done_path)

    def finalize(self, num_processes: int = 1) -> str:
        """Checks every example was written (by any process), writes the header and moves
        the folder into place. Call from one process after all have flushed."""
        self.flush()
        work = _partial(self.path)
        done = np.zeros(self.num_examples, dtype=bool)
        for p in range(num_processes):
            f = os.path.join(work, f"done-{p}.npy")
            if os.path.exists(f):
                done |= np.load(f)
        if not done.all():
            missing = np.flatnonzero(~done)
            raise CacheError(
                f"{work}: {len(missing)} of {self.num_examples} examples have no soft targets "
                f"yet (first missing: {missing[:5].tolist()})")
        header = {
            "format_version": FORMAT_VERSION,
            **asdict(self.identity),
            "num_examples": self.num_examples,
            "total_rows": int(self.offsets[-1]),
            "files": {"logits": _LOGITS, "indices": _INDICES, "offsets": _OFFSETS},
        }
        with open(os.path.join(work, _HEADER), "w") as f:
            json.dump(header, f, indent=2)
        for name in os.listdir(work):
            if name.startswith("done-") or name == "identity.json":
                os.remove(os.path.join(work, name))
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.replace(work, self.path)
        return self.path


def create_or_resume(path: str, identity: CacheIdentity, target_lengths: np.ndarray,
                     process_index: int = 0) -> CacheWriter:
    """Starts a cache for examples with the given target lengths (``len(tgt_out)``), or
    resumes ``<path>.partial`` if one exists for the same identity and lengths."""
    offsets = np.zeros(len(target_lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(target_lengths, dtype=np.int64), out=offsets[1:])
    work = _partial(path)
    meta_path = os.path.join(work, "identity.json")
    if os.path.isdir(work):
        with open(meta_path) as f:
            previous = json.load(f)
        stored_offsets = np.fromfile(os.path.join(work, _OFFSETS), dtype=np.int64)
        if previous != asdict(identity) or not np.array_equal(stored_offsets, offsets):
            raise CacheError(
                f"{work} is an unfinished cache for other data ({previous}); "
                "remove it to start again")
    else:
        os.makedirs(work, exist_ok=process_index != 0)
        if process_index == 0:
            rows = int(offsets[-1])
            for name, dtype in ((_LOGITS, np.float16), (_INDICES, np.int32)):
                np.memmap(os.path.join(work, name), dtype, "w+",
                          shape=(max(rows, 1), identity.top_k)).flush()
            offsets.tofile(os.path.join(work, _OFFSETS))
            with open(meta_path, "w") as f:
                json.dump(asdict(identity), f)
    return CacheWriter(path, identity, offsets, process_index)


class SoftTargetCache:
    """Read-only view of a finished cache (memory-mapped; nothing is loaded up front)."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.header = header
        rows, k = header["total_rows"], header["top_k"]
        self.offsets = np.fromfile(os.path.join(path, _OFFSETS), dtype=np.int64)
        self.logits = np.memmap(os.path.join(path, _LOGITS), np.float16, "r", shape=(rows, k))
        self.indices = np.memmap(os.path.join(path, _INDICES), np.int32, "r", shape=(rows, k))

    @property
    def top_k(self) -> int:
        return int(self.header["top_k"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, example_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(logits float32 [target_len, K], indices int32 [target_len, K]) of one example."""
        start, end = self.offsets[example_index], self.offsets[example_index + 1]
        return (np.asarray(self.logits[start:end], dtype=np.float32),
                np.asarray(self.indices[start:end]))


def open_cache(path: str, expected: Optional[CacheIdentity] = None,
               num_examples: Optional[int] = None) -> SoftTargetCache:
    """Opens a finished cache, refusing it if it is unfinished, truncated, or was made for
    another teacher / vocabulary / dataset / split than ``expected`` (``top_k`` may be
    smaller in ``expected``: a run can use the first K' <= K entries)."""
    header_path = os.path.join(path, _HEADER)
    if not os.path.isfile(header_path):
        hint = " (extraction did not finish; rerun soft-targets to resume)" \
            if os.path.isdir(_partial(path)) else ""
        raise CacheError(f"{path} is not a finished soft-target cache: no {_HEADER}{hint}")
    with open(header_path) as f:
        header = json.load(f)
    if header.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{header_path}: format version {header.get('format_version')}, "
                         f"this code reads version {FORMAT_VERSION}")
    rows, k, n = header["total_rows"], header["top_k"], header["num_examples"]
    sizes = {_LOGITS: rows * k * 2, _INDICES: rows * k * 4, _OFFSETS: (n + 1) * 8}
    for name, size in sizes.items():
        file = os.path.join(path, name)
        found = os.path.getsize(file) if os.path.exists(file) else None
        if found != size and not (rows == 0 and name != _OFFSETS):
            raise CacheError(f"{file}: expected {size} bytes for {rows} rows x K={k}, "
                             f"found {found if found is not None else 'no file'} (truncated?)")
    if expected is not None:
        for field, want in asdict(expected).items():
            have = header.get(field)
            if field == "top_k":
                if want > have:
                    raise CacheError(f"{path} keeps K={have} entries per position; "
                                     f"the run asks for K={want}")
            elif have != want:
                raise CacheError(f"{path} was made for {field} {have!r}, "
                                 f"but this run uses {field} {want!r}")
    if num_examples is not None and n != num_examples:
        raise CacheError(f"{path} has soft targets for {n} examples; the dataset split has "
                         f"{num_examples}")
    return SoftTargetCache(path, header)
