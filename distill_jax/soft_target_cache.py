"""A cache of the teacher's top-K soft targets that lives on local disk or Cloud Storage.

Layout of a cache directory (a local folder or a ``gs://`` prefix)::

    layout.json   written first: format, identity, K, rows per chunk, counts
    rows.npy      int64 [num_examples, 2]: example i owns rows rows[i,0] : rows[i,0]+rows[i,1]
    logits/       zarr v3 array float16 [total_rows, K]  the teacher's raw top-K logits
    indices/      zarr v3 array int32   [total_rows, K]  their student-vocabulary ids
    header.json   written last, once every chunk is stored: the commit marker

Row ``rows[i, 0] + t`` holds the teacher's prediction for target position ``t`` of
example ``i``, i.e. for ``tgt_out[t]`` (``tgt[1:]``, the final EOS slot included).

Both arrays are written through tensorstore, chunked by rows. Consecutive examples are
packed into *chunks* of at most ``chunk_rows`` rows (an example never straddles two), so
a chunk is written whole, in one object, by one process: several processes fill one cache
without touching each other's objects, and a chunk is either stored or absent. That is
also the resume state: an interrupted extraction lists the stored chunks and computes the
others. A reader holds a cache that fits its memory budget in memory (read whole when
opened, one request per chunk and array); for a larger one it reads each batch's rows in
one request per array: inside a chunk (a zarr "shard") rows are grouped into small inner
chunks fetched by byte range, so a batch costs the rows it needs, not whole chunks.

Nothing looks finished until ``header.json`` exists: it is written by one process after
every chunk of both arrays has been found in storage. ``open_cache`` refuses a directory
without it, one whose chunks are missing (truncated or damaged), and one made for another
teacher / vocabulary / dataset / split / K / stride than the run expects, or from another
checkpoint of the fine-tuned teacher (its step and digest are part of the identity).

Every inner chunk of both arrays carries a CRC32C checksum (the zarr ``crc32c`` codec,
written with it, verified by tensorstore each time the inner chunk is decoded), and the
shard index has its own. A reader also checks the values it reads: logits finite, indices
inside the student vocabulary. A damaged chunk (flipped bits, cut short, NaN written over)
is refused with a :class:`CacheError` naming the cache and the chunk. A cache held in
memory is checked whole when it is opened (before any training step); a larger one as each
batch's rows are read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from distill_jax import storage
from distill_jax.errors import UserError

FORMAT_VERSION = 3  # 3: crc32c per inner chunk, teacher checkpoint and vocabulary size
FORMAT = "distill-jax-soft-targets"
DEFAULT_CHUNK_ROWS = 16384  # rows of one stored object (per array)
INNER_ROWS = 64  # rows a reader fetches at least (one byte range)
_LAYOUT, _ROWS, _HEADER = "layout.json", "rows.npy", "header.json"
_ARRAYS = {"logits": "float16", "indices": "int32"}
_CACHE_POOL_BYTES = 64 << 20  # decoded shard indices and chunks kept in memory by readers
DEFAULT_PRELOAD_BYTES = 1 << 30  # a reader holds a cache up to this size in memory


class CacheError(UserError, ValueError):
    """A soft-target cache that cannot be used: missing, truncated, damaged, or made for
    other data (a ``UserError``: the CLI reports it and exits with status 2)."""


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache was computed from; a run refuses a cache whose identity differs.

    The last three fields are not compared when the expected identity leaves them unset
    (0 / None): a reader that does not know them (a script looking at the values) still
    opens the cache."""

    teacher: str  # the teacher's base checkpoint, init and fine-tuning steps
    vocabulary: str  # fingerprint of the student vocabulary (ids of the stored indices)
    dataset: str  # name and fingerprint of the prepared dataset
    split: str  # the split whose targets were scored
    top_k: int  # K, entries kept per position
    stride: int  # masking stride S used for extraction (every position masked once)
    vocab_size: int = 0  # entries of the student vocabulary: every index is below it
    teacher_step: int | None = None  # step of the fine-tuned teacher checkpoint used
    teacher_digest: str | None = None  # its checkpoint.Checkpointer.fingerprint


_PROVENANCE = ("teacher_step", "teacher_digest")  # compared together, after the rest
_OPTIONAL = {"vocab_size": 0, "teacher_step": None, "teacher_digest": None}


def describe_teacher(step, digest) -> str:
    """ "teacher checkpoint step 30 (digest 1a2b3c4d5e6f)" for messages."""
    if step is None:
        return "an unrecorded teacher checkpoint"
    return f"teacher checkpoint step {step} (digest {str(digest)[:12]})"


def identity_difference(have: dict, want: CacheIdentity) -> str | None:
    """Why a cache with identity ``have`` (a header or layout dict) is not one for
    ``want``, or None when it is. K may be smaller in ``want`` (a run can use the first
    K' <= K entries); fields left unset in ``want`` are not compared."""
    expected = asdict(want)
    for field, value in expected.items():
        if field in _PROVENANCE or _OPTIONAL.get(field, object()) == value:
            continue
        stored = have.get(field)
        if field == "top_k":
            if stored is None or value > stored:
                return f"keeps K={stored} entries per position; the run asks for K={value}"
        elif stored != value:
            return f"was made for {field} {stored!r}, but this run uses {field} {value!r}"
    made_from = (have.get("teacher_step"), have.get("teacher_digest"))
    if want.teacher_step is not None and made_from != (want.teacher_step, want.teacher_digest):
        return (
            f"was made from {describe_teacher(*made_from)}, but the one selected now is "
            f"{describe_teacher(want.teacher_step, want.teacher_digest)}"
        )
    return None


def plan_chunks(target_lengths: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Packs consecutive examples into chunks of at most ``chunk_rows`` rows.

    Returns (rows ``[n, 2]`` int64 first row and row count of each example, chunk_starts
    ``[chunks + 1]`` int64: chunk c holds examples ``chunk_starts[c] : chunk_starts[c+1]``).
    Chunk c's rows begin at ``c * chunk_rows``; the rows after its last example are zeros.
    """
    lengths = np.asarray(target_lengths, np.int64)
    if len(lengths) and lengths.max() > chunk_rows:
        raise ValueError(
            f"chunk_rows {chunk_rows} is below the longest target ({int(lengths.max())} rows)"
        )
    rows = np.zeros((len(lengths), 2), np.int64)
    starts, chunk, used = [0], 0, 0
    for i, length in enumerate(lengths):
        if used + length > chunk_rows:
            starts.append(i)
            chunk, used = chunk + 1, 0
        rows[i] = (chunk * chunk_rows + used, length)
        used += length
    starts.append(len(lengths))
    if len(lengths) == 0:
        starts = [0, 0]
    return rows, np.asarray(starts, np.int64)


def _array_spec(
    directory,
    name: str,
    *,
    total_rows: int = 0,
    top_k: int = 0,
    chunk_rows: int = 0,
    create: bool = False,
) -> dict:
    spec = {
        "driver": "zarr3",
        "kvstore": storage.tensorstore_kvstore(storage.path(directory) / name),
        "context": {"cache_pool": {"total_bytes_limit": _CACHE_POOL_BYTES}},
        "recheck_cached_data": "open",
        # A chunk of zeros is stored too: a stored object is what marks a chunk as done.
        "store_data_equal_to_fill_value": True,
    }
    if create:
        inner = min(INNER_ROWS, chunk_rows)
        spec["metadata"] = {
            "shape": [max(total_rows, 1), top_k],
            "data_type": _ARRAYS[name],
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": [chunk_rows, top_k]},
            },
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [inner, top_k],
                        # A CRC32C after every inner chunk: verified whenever it is decoded.
                        "codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                        # The index first: read with an ordinary byte range (not a suffix range).
                        "index_location": "start",
                    },
                }
            ],
            "fill_value": 0,
        }
    return spec


def _open_array(directory, name: str, **kwargs):
    import tensorstore as ts

    create = kwargs.get("create", False)
    try:
        # (A new cache's folder was emptied before: no delete_existing, which would issue a
        # range delete over the bucket's listing.)
        return ts.open(
            _array_spec(directory, name, **kwargs), create=create, open=not create
        ).result()
    except (ValueError, RuntimeError) as err:
        raise CacheError(
            f"{storage.path(directory) / name}: cannot open the soft-target array: {err}"
        ) from None


def _stored_chunks(directory, name: str) -> set[int]:
    """Chunk numbers of ``name`` that are in storage (zarr v3 keys ``c/<chunk>/0``)."""
    found = set()
    for key in storage.list_files(storage.path(directory) / name):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "c" and parts[1].isdigit() and parts[2] == "0":
            found.add(int(parts[1]))
    return found


def _read_json(file) -> dict | None:
    """The JSON object in ``file``, None when it does not exist; a damaged one (cut
    short, emptied) is a :class:`CacheError` naming it."""
    file = storage.path(file)
    if not file.exists():
        return None
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(
            f"{file} is damaged (not valid JSON: {err}); remove the cache "
            "(`distill-jax soft-targets --force` remakes it)"
        ) from None
    if not isinstance(value, dict):
        raise CacheError(f"{file} is damaged (not a JSON object)")
    return value


class CacheWriter:
    """Fills a cache chunk by chunk; create or resume one with :func:`create_or_resume`."""

    def __init__(
        self,
        path,
        identity: CacheIdentity,
        rows: np.ndarray,
        chunk_starts: np.ndarray,
        chunk_rows: int,
    ):
        self.path = storage.path(path)
        self.identity = identity
        self.rows = rows  # [n, 2] first row, count
        self.chunk_starts = chunk_starts  # [chunks + 1]
        self.chunk_rows = chunk_rows
        self._arrays = {name: _open_array(self.path, name) for name in _ARRAYS}
        self._writes: list = []  # tensorstore write futures not waited for yet

    @property
    def num_examples(self) -> int:
        return len(self.rows)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_starts) - 1

    def examples_of(self, chunk: int) -> range:
        """The examples whose rows chunk ``chunk`` holds."""
        return range(int(self.chunk_starts[chunk]), int(self.chunk_starts[chunk + 1]))

    def stored_chunks(self) -> set[int]:
        """Chunks whose logits and indices are both in storage."""
        return _stored_chunks(self.path, "logits") & _stored_chunks(self.path, "indices")

    def pending_chunks(self) -> list[int]:
        """Chunks still to compute, ascending."""
        done = self.stored_chunks()
        return [c for c in range(self.num_chunks) if c not in done]

    def write_chunk(self, chunk: int, examples: dict) -> None:
        """Starts storing chunk ``chunk`` from ``{example: (logits, indices)}`` (each
        ``[target_len, K]``, logits sorted decreasing along K, so a run may use the first
        K' <= K) for every example of the chunk. The chunk counts as stored once both
        arrays' objects exist; :meth:`flush` waits for the writes."""
        first_row = chunk * self.chunk_rows
        k = self.identity.top_k
        end = min(first_row + self.chunk_rows, self._arrays["logits"].shape[0])
        logits = np.zeros((end - first_row, k), np.float16)  # [chunk rows, K]
        indices = np.zeros((end - first_row, k), np.int32)  # [chunk rows, K]
        for example in self.examples_of(chunk):
            if example not in examples:
                raise CacheError(f"chunk {chunk}: no soft targets for example {example}")
            start, length = (int(x) for x in self.rows[example])
            values, ids = examples[example]
            if values.shape != (length, k) or ids.shape != (length, k):
                raise CacheError(
                    f"example {example}: expected soft targets of shape {(length, k)}, got "
                    f"logits {values.shape} and indices {ids.shape}"
                )
            if values.size and np.any(np.diff(values, axis=-1) > 0):
                raise CacheError(
                    f"example {example}: top-K logits must be sorted in decreasing order along K"
                )
            if not np.all(np.isfinite(values.astype(np.float16))):
                raise CacheError(
                    f"example {example}: the teacher's top-K logits are not all "
                    "finite in float16 (NaN, or beyond +-65504); not stored"
                )
            size = self.identity.vocab_size
            if ids.size and (ids.min() < 0 or (size and ids.max() >= size)):
                raise CacheError(
                    f"example {example}: top-K indices span {ids.min()}..{ids.max()}, "
                    f"outside the student vocabulary of {size} entries"
                )
            logits[start - first_row : start - first_row + length] = values
            indices[start - first_row : start - first_row + length] = ids
        self._writes += [
            self._arrays["indices"][first_row:end].write(indices),
            self._arrays["logits"][first_row:end].write(logits),
        ]

    def writes_in_flight(self) -> int:
        return len(self._writes) // 2

    def flush(self) -> None:
        """Waits until the chunks written so far are in storage."""
        writes, self._writes = self._writes, []
        for future in writes:
            future.commit.result()

    def finalize(self) -> storage.epath.Path:
        """Checks that every chunk of both arrays is stored, then writes ``header.json`` (the
        commit marker). Call from one process after all have flushed their chunks."""
        self.flush()
        missing = self.pending_chunks()
        if missing:
            raise CacheError(
                f"{self.path}: {len(missing)} of {self.num_chunks} chunks have no soft targets "
                f"yet (first missing: {missing[:5]})"
            )
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **asdict(self.identity),
            "num_examples": self.num_examples,
            "num_chunks": self.num_chunks,
            "total_rows": int(self.num_chunks * self.chunk_rows),
            "chunk_rows": self.chunk_rows,
            "arrays": sorted(_ARRAYS),
        }
        storage.write_text_atomic(self.path / _HEADER, json.dumps(header, indent=2))
        return self.path


def _layout(
    identity: CacheIdentity, rows: np.ndarray, chunk_starts: np.ndarray, chunk_rows: int
) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": asdict(identity),
        "num_examples": int(len(rows)),
        "num_chunks": int(len(chunk_starts) - 1),
        "chunk_rows": int(chunk_rows),
        "target_rows": int(rows[:, 1].sum()),
    }


def create_or_resume(
    path,
    identity: CacheIdentity,
    target_lengths: np.ndarray,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    create: bool = True,
) -> CacheWriter:
    """Starts a cache for examples with the given target lengths (``len(tgt_out)``), or
    resumes an unfinished one at ``path`` made for the same identity and lengths (keeping
    its chunk size). ``create=False`` only opens what another process created.

    A finished cache at ``path`` is removed first (the caller asked to recompute it)."""
    path = storage.path(path)
    lengths = np.asarray(target_lengths, np.int64)
    previous = _read_json(path / _LAYOUT)
    if previous is not None:
        chunk_rows = int(previous.get("chunk_rows", chunk_rows))
    chunk_rows = max(int(chunk_rows), int(lengths.max()) if len(lengths) else 1)
    rows, chunk_starts = plan_chunks(lengths, chunk_rows)
    layout = _layout(identity, rows, chunk_starts, chunk_rows)
    if not create:
        if previous != layout:
            raise CacheError(
                f"{path}: the cache layout written by process 0 is not this "
                "process's (different data?)"
            )
        return CacheWriter(path, identity, rows, chunk_starts, chunk_rows)
    if (path / _HEADER).exists():
        storage.rmtree(path)
        previous = None
    if previous is not None:
        stored_rows = (
            np.load(io.BytesIO((path / _ROWS).read_bytes())) if (path / _ROWS).exists() else None
        )
        if previous != layout or stored_rows is None or not np.array_equal(stored_rows, rows):
            why = None
            if previous.get("format_version") != FORMAT_VERSION:
                why = (
                    f"was started by another version of distill-jax (format version "
                    f"{previous.get('format_version')}, this one writes {FORMAT_VERSION})"
                )
            elif isinstance(previous.get("identity"), dict):
                why = identity_difference(previous["identity"], identity)
            raise CacheError(
                f"{path} is an unfinished cache for other data"
                f"{'' if why is None else ': it ' + why}; remove it (or pass --force) to start "
                "again"
            )
        return CacheWriter(path, identity, rows, chunk_starts, chunk_rows)
    if path.exists():
        storage.rmtree(path)  # debris without a layout (e.g. killed while creating)
    storage.makedirs(path)
    total_rows = int(len(chunk_starts) - 1) * chunk_rows
    for name in _ARRAYS:
        _open_array(
            path,
            name,
            total_rows=total_rows,
            top_k=identity.top_k,
            chunk_rows=chunk_rows,
            create=True,
        )
    buffer = io.BytesIO()
    np.save(buffer, rows)
    storage.write_bytes_atomic(path / _ROWS, buffer.getvalue())
    storage.write_text_atomic(path / _LAYOUT, json.dumps(layout, indent=2))  # last: valid now
    return CacheWriter(path, identity, rows, chunk_starts, chunk_rows)


def remove(path) -> None:
    """Deletes a cache (finished or not)."""
    storage.rmtree(path)


class SoftTargetCache:
    """Read-only view of a finished cache.

    A cache of at most ``preload_bytes`` is read whole when opened (one request per stored
    chunk and array) and served from memory; a larger one is read a batch at a time, each
    batch's rows in one request per array that fetches only the inner chunks they touch.
    Every read is checked (checksums by tensorstore, then finite logits and indices inside
    the vocabulary, vectorised over the rows read); a failure raises :class:`CacheError`
    naming the chunk."""

    def __init__(
        self, path, header: dict, rows: np.ndarray, preload_bytes: int = DEFAULT_PRELOAD_BYTES
    ):
        self.path = storage.path(path)
        self.header = header
        self.rows = rows  # [n, 2] first row, count
        self.chunk_rows = int(header["chunk_rows"])
        self.vocab_size = int(header.get("vocab_size") or 0)
        self._arrays = {name: _open_array(self.path, name) for name in _ARRAYS}
        size = sum(
            int(np.prod(a.shape)) * np.dtype(_ARRAYS[n]).itemsize for n, a in self._arrays.items()
        )
        self.in_memory: dict | None = None
        if size <= preload_bytes:
            self.in_memory = self._read_whole()

    @property
    def top_k(self) -> int:
        return int(self.header["top_k"])

    def __len__(self) -> int:
        return len(self.rows)

    def chunk_file(self, name: str, chunk: int):
        """The stored object of chunk ``chunk`` of array ``name`` (zarr v3 key)."""
        return self.path / name / "c" / str(chunk) / "0"

    def _damaged(self, name: str, chunk: int, why: str) -> CacheError:
        return CacheError(
            f"soft-target cache {self.path}: chunk {chunk} of {name} "
            f"({self.chunk_file(name, chunk)}) is damaged: {why}. Remake the cache: "
            "`distill-jax soft-targets --force` (same --config and --set)"
        )

    def _read_whole(self) -> dict:
        """Both arrays, whole (one request per stored chunk and array, all in flight at
        once), their values checked once."""
        futures = {name: array.read() for name, array in self._arrays.items()}
        out = {}
        for name, future in futures.items():
            try:
                block = np.asarray(future.result())  # [total rows, K]
            except ValueError as err:
                raise self._locate(name, range(int(self.header["num_chunks"])), err) from None
            self._check_values(name, block, lambda rows: rows[0] // self.chunk_rows)
            out[name] = block
        return out

    def _check_values(self, name: str, block: np.ndarray, chunk_of) -> None:
        """Refuses non-finite logits / indices outside the vocabulary in ``block``
        ``[rows, K]``; ``chunk_of(bad row numbers)`` names the chunk."""
        if name == "logits":
            bad = ~np.isfinite(block).all(axis=-1)
            what = "logits that are not finite (NaN or infinite)"
        else:
            bad = (block < 0).any(axis=-1)
            if self.vocab_size:
                bad |= (block >= self.vocab_size).any(axis=-1)
            what = f"indices outside the student vocabulary (0..{self.vocab_size - 1})"
        if bad.any():
            rows = np.flatnonzero(bad)
            raise self._damaged(name, int(chunk_of(rows)), f"{len(rows)} rows hold {what}")

    def read_async(self, examples: Sequence[int]) -> PendingRead:
        """Starts reading the rows of ``examples`` (one request per array, or none when the
        cache is in memory); returns a :class:`PendingRead`."""
        examples = np.asarray(examples, np.int64)
        starts, counts = self.rows[examples, 0], self.rows[examples, 1]
        total = int(counts.sum())
        # [total] row numbers of every example's rows, examples one after another.
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = np.repeat(starts, counts) + within
        if self.in_memory is not None:
            return PendingRead(
                counts, self.in_memory["logits"][positions], self.in_memory["indices"][positions]
            )
        if total == 0:
            k = self.top_k
            return PendingRead(counts, np.zeros((0, k), np.float16), np.zeros((0, k), np.int32))
        return PendingRead(
            counts,
            *(self._arrays[name].vindex[positions].read() for name in ("logits", "indices")),
            check=(self, positions),
        )

    def _locate(self, name: str, chunks, err: Exception) -> CacheError:
        """The first of ``chunks`` (those a failed read touched) that cannot be read on its
        own (the error path only)."""
        array = self._arrays[name]
        for chunk in chunks:
            chunk = int(chunk)
            try:
                array[chunk * self.chunk_rows : (chunk + 1) * self.chunk_rows].read().result()
            except ValueError as again:
                return self._damaged(name, chunk, _first_line(again))
        return CacheError(
            f"soft-target cache {self.path}: reading {name} failed: {_first_line(err)}"
        )

    def __getitem__(self, example_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(logits float32 [target_len, K], indices int32 [target_len, K]) of one example."""
        logits, indices = self.read_async([int(example_index)]).result()
        return logits[0], indices[0]


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:400] if str(err) else type(err).__name__


class PendingRead:
    """The rows of some examples being read (tensorstore futures, or arrays already in
    memory); ``result()`` waits and splits them by example."""

    def __init__(self, counts: np.ndarray, logits, indices, check=None):
        self._counts = counts
        self._parts = (logits, indices)
        self._check = check  # (cache, row positions) for reads from storage

    def result(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(logits float32 ``[len_i, K]``, indices int32 ``[len_i, K]``) per example."""
        parts = []
        for name, part in zip(("logits", "indices"), self._parts):
            if hasattr(part, "result"):
                cache, positions = self._check
                try:
                    part = part.result()
                except ValueError as err:
                    touched = np.unique(positions // cache.chunk_rows)
                    raise cache._locate(name, touched, err) from None
                part = np.asarray(part)
                cache._check_values(
                    name,
                    part,
                    lambda rows, positions=positions, cache=cache: (
                        positions[rows[0]] // cache.chunk_rows
                    ),
                )
            parts.append(part)
        logits, indices = parts
        cuts = np.cumsum(self._counts)[:-1]
        return (
            np.split(np.asarray(logits, np.float32), cuts),
            np.split(np.asarray(indices, np.int32), cuts),
        )


def _check_identity(path, header: dict, expected: CacheIdentity) -> None:
    why = identity_difference(header, expected)
    if why is not None:
        raise CacheError(f"{path} {why}")


def is_finished(path) -> bool:
    """Whether ``path`` holds a committed cache (its ``header.json`` exists)."""
    return (storage.path(path) / _HEADER).exists()


def read_header(
    path, expected: CacheIdentity | None = None, num_examples: int | None = None
) -> dict:
    """The header of a finished cache, refusing one that is unfinished, of another format,
    made for another identity than ``expected`` (see :func:`identity_difference`) or for
    another number of examples. Reads ``header.json`` only."""
    path = storage.path(path)
    header = _read_json(path / _HEADER)
    if header is None:
        hint = (
            " (extraction did not finish; rerun soft-targets to resume)"
            if (path / _LAYOUT).exists()
            else ""
        )
        raise CacheError(f"{path} is not a finished soft-target cache: no {_HEADER}{hint}")
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path / _HEADER}: format {header.get('format')!r} version "
            f"{header.get('format_version')}, this code reads {FORMAT!r} version "
            f"{FORMAT_VERSION} (remake it: `distill-jax soft-targets --force`)"
        )
    if expected is not None:
        _check_identity(path, header, expected)
    n = int(header["num_examples"])
    if num_examples is not None and n != num_examples:
        raise CacheError(
            f"{path} has soft targets for {n} examples; the dataset split has {num_examples}"
        )
    return header


def open_cache(
    path,
    expected: CacheIdentity | None = None,
    num_examples: int | None = None,
    preload_bytes: int = DEFAULT_PRELOAD_BYTES,
) -> SoftTargetCache:
    """Opens a finished cache, refusing it if it is unfinished, truncated, damaged, or was
    made for another teacher / teacher checkpoint / vocabulary / dataset / split than
    ``expected`` (``top_k`` may be smaller in ``expected``: a run can use the first
    K' <= K entries). A cache of at most ``preload_bytes`` is read into memory and checked
    whole here (see :class:`SoftTargetCache`)."""
    path = storage.path(path)
    header = read_header(path, expected, num_examples)
    n, chunks = int(header["num_examples"]), int(header["num_chunks"])
    try:
        rows = np.load(io.BytesIO((path / _ROWS).read_bytes()))
    except (OSError, ValueError, EOFError) as err:
        raise CacheError(f"{path / _ROWS}: missing or damaged ({err})") from None
    if rows.shape != (n, 2):
        raise CacheError(f"{path / _ROWS}: {rows.shape[0]} examples, the header says {n}")
    for name in _ARRAYS:
        stored = _stored_chunks(path, name)
        if len(stored & set(range(chunks))) != chunks:
            raise CacheError(
                f"{path / name}: {chunks - len(stored)} of {chunks} chunks are "
                "missing (truncated or damaged cache)"
            )
    for name in _ARRAYS:
        shape = tuple(_open_array(path, name).shape)
        if shape != (int(header["total_rows"]), int(header["top_k"])):
            raise CacheError(
                f"{path / name}: shape {shape}, the header says "
                f"{(header['total_rows'], header['top_k'])} (truncated?)"
            )
    return SoftTargetCache(path, header, rows, preload_bytes)
