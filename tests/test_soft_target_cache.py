"""The soft-target cache (tensorstore zarr, chunked by rows) on local disk and on the
Cloud Storage emulator: layout, resume, batched reads, and refusal of bad caches."""

import numpy as np
import pytest

from distill_jax import storage
from distill_jax.soft_target_cache import (
    CacheError,
    CacheIdentity,
    create_or_resume,
    is_finished,
    open_cache,
    plan_chunks,
)

IDENTITY = CacheIdentity(
    teacher="teacher@abc",
    vocabulary="vocab@123",
    dataset="multi30k/de-en@xyz",
    split="train",
    top_k=4,
    stride=7,
)


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path):
    """A fresh cache location: a local folder or a gs:// prefix on the emulator."""
    if request.param == "local":
        return lambda name: str(tmp_path / name)
    gcs = request.getfixturevalue("gcs")
    return lambda name: gcs.gs(
        "cache-tests", request.node.name.replace("[", "-").replace("]", ""), name
    )


def _example(i, length, k=4):
    rng = np.random.default_rng(i)
    logits = -np.sort(-rng.normal(size=(length, k)), axis=-1).astype(np.float32)  # decreasing
    indices = rng.integers(0, 100, size=(length, k)).astype(np.int32)
    return logits, indices


def _fill(path, lengths, chunks=None, chunk_rows=8):
    writer = create_or_resume(path, IDENTITY, np.array(lengths), chunk_rows=chunk_rows)
    for c in writer.pending_chunks() if chunks is None else chunks:
        writer.write_chunk(c, {e: _example(e, lengths[e]) for e in writer.examples_of(c)})
    writer.flush()
    return writer


def test_chunks_pack_whole_examples():
    rows, starts = plan_chunks(np.array([3, 5, 1, 4, 8, 2]), 8)
    assert starts.tolist() == [0, 2, 4, 5, 6]  # [3,5] [1,4] [8] [2]
    assert rows[:, 0].tolist() == [0, 3, 8, 9, 16, 24]
    with pytest.raises(ValueError, match="below the longest target"):
        plan_chunks(np.array([9]), 8)


@pytest.mark.parametrize("preload", [True, False], ids=["in-memory", "range-reads"])
def test_rows_belong_to_their_example_and_position(where, preload):
    lengths = [3, 5, 1, 4, 7, 2]
    path = where("cache")
    _fill(path, lengths).finalize()
    cache = open_cache(path, IDENTITY, num_examples=6, preload_bytes=1 << 20 if preload else 0)
    assert len(cache) == 6 and (cache.in_memory is not None) == preload
    order = [4, 0, 5, 2]
    logits, indices = cache.read_async(order).result()  # one batched read
    for i, got_logits, got_indices in zip(order, logits, indices):
        want_logits, want_indices = _example(i, lengths[i])
        assert got_logits.shape == (lengths[i], 4) and got_logits.dtype == np.float32
        np.testing.assert_array_equal(got_logits, want_logits.astype(np.float16))
        np.testing.assert_array_equal(got_indices, want_indices)
    np.testing.assert_array_equal(cache[3][1], _example(3, 4)[1])


def test_resume_keeps_written_chunks_and_nothing_looks_finished_before(where):
    lengths = [2, 3, 4, 5, 6]
    path = where("cache")
    first = _fill(path, lengths, chunks=[0, 2])  # interrupted after two chunks
    assert first.num_chunks == 4 and not is_finished(path)
    with pytest.raises(CacheError, match="is not a finished soft-target cache.*resume"):
        open_cache(path)
    # A resumed writer keeps the first run's chunk size, whatever it is asked for.
    writer = create_or_resume(path, IDENTITY, np.array(lengths), chunk_rows=1000)
    assert writer.chunk_rows == 8 and writer.pending_chunks() == [1, 3]
    with pytest.raises(CacheError, match="2 of 4 chunks have no soft targets"):
        writer.finalize()
    assert not is_finished(path)
    for c in writer.pending_chunks():
        writer.write_chunk(c, {e: _example(e, lengths[e]) for e in writer.examples_of(c)})
    writer.finalize()
    assert is_finished(path)
    np.testing.assert_array_equal(open_cache(path)[2][1], _example(2, 4)[1])


def test_unfinished_cache_for_other_data_is_refused(where):
    path = where("cache")
    _fill(path, [2, 3], chunks=[0])
    with pytest.raises(CacheError, match="unfinished cache for other data"):
        create_or_resume(path, IDENTITY, np.array([2, 4]), chunk_rows=8)
    other = CacheIdentity(**{**IDENTITY.__dict__, "teacher": "other"})
    with pytest.raises(CacheError, match="unfinished cache for other data"):
        create_or_resume(path, other, np.array([2, 3]), chunk_rows=8)


def test_truncated_cache_is_refused(where):
    path = where("cache")
    _fill(path, [5, 5, 5]).finalize()
    (storage.path(path) / "logits" / "c" / "1" / "0").unlink()  # a chunk lost
    with pytest.raises(CacheError, match=r"logits: 1 of 3 chunks are missing"):
        open_cache(path)


@pytest.mark.parametrize(
    "field,value",
    [("vocabulary", "vocab@other"), ("dataset", "gigaword@1"), ("teacher", "other"), ("stride", 5)],
)
def test_foreign_cache_is_refused(tmp_path, field, value):
    path = str(tmp_path / "cache")
    _fill(path, [2]).finalize()
    expected = CacheIdentity(**{**IDENTITY.__dict__, field: value})
    with pytest.raises(CacheError, match=f"made for {field}"):
        open_cache(path, expected)


def test_smaller_k_is_accepted_larger_refused(tmp_path):
    path = str(tmp_path / "cache")
    _fill(path, [2]).finalize()
    open_cache(path, CacheIdentity(**{**IDENTITY.__dict__, "top_k": 2}))
    with pytest.raises(CacheError, match="K=4 entries per position; the run asks for K=8"):
        open_cache(path, CacheIdentity(**{**IDENTITY.__dict__, "top_k": 8}))


def test_wrong_shapes_and_unsorted_logits_are_refused(tmp_path):
    writer = create_or_resume(str(tmp_path / "c"), IDENTITY, np.array([3]), chunk_rows=8)
    logits, indices = _example(0, 3)
    with pytest.raises(CacheError, match=r"expected soft targets of shape \(3, 4\)"):
        writer.write_chunk(0, {0: (logits[:2], indices[:2])})
    with pytest.raises(CacheError, match="sorted in decreasing order"):
        writer.write_chunk(0, {0: (logits[:, ::-1], indices)})
    with pytest.raises(CacheError, match="no soft targets for example 0"):
        writer.write_chunk(0, {})


def test_example_count_must_match_dataset(tmp_path):
    path = str(tmp_path / "cache")
    _fill(path, [1, 1]).finalize()
    with pytest.raises(CacheError, match="soft targets for 2 examples; the dataset split has 3"):
        open_cache(path, num_examples=3)


def test_soft_target_batches_read_ahead_and_resume_exactly(tmp_path):
    """The student's reader attaches each batch's soft targets (read ahead of use) and its
    state is the position of the batches it handed out, not of those it read ahead."""
    from distill_jax.student import SoftTargetBatches

    lengths = [3, 2, 4, 1]
    path = str(tmp_path / "cache")
    _fill(path, lengths).finalize()
    cache = open_cache(path)

    class Batches:  # a stand-in for BatchIterator: one record per batch
        def __init__(self):
            self.step = 0

        def __next__(self):
            if self.step >= 4:
                raise StopIteration
            i, self.step = self.step, self.step + 1
            tgt_out = np.zeros((2, 8), np.int32)
            tgt_out[0, : lengths[i]] = 5
            return {"index": np.array([i, -1], np.int32), "tgt_out": tgt_out}

        def get_state(self):
            return {"step": self.step}

        def set_state(self, state):
            self.step = state["step"]

    reader = SoftTargetBatches(Batches(), cache, top_k=2, depth=2)
    first = next(reader)
    assert reader.get_state() == {"step": 1}  # two batches read ahead, one handed out
    np.testing.assert_array_equal(first["kd_indices"][0, :3], _example(0, 3)[1][:, :2])
    assert not first["kd_logits"][1].any() and not first["kd_logits"][0, 3:].any()
    reader.set_state({"step": 3})
    last = next(reader)
    np.testing.assert_array_equal(last["kd_indices"][0, :1], _example(3, 1)[1][:, :2])
    with pytest.raises(StopIteration):
        next(reader)


# ----------------------------------------------------------------------------- provenance


def test_cache_from_another_teacher_checkpoint_is_refused_by_name(tmp_path):
    """The teacher checkpoint (step and digest) is part of the identity: a cache made from
    step 15 is refused for step 30 (and for another checkpoint of the same step), the
    message naming both; a reader that does not know the checkpoint still opens it."""
    from dataclasses import replace

    path = str(tmp_path / "cache")
    made = replace(IDENTITY, teacher_step=15, teacher_digest="a" * 64)
    writer = create_or_resume(path, made, np.array([2, 3]), chunk_rows=8)
    for c in writer.pending_chunks():
        writer.write_chunk(c, {e: _example(e, [2, 3][e]) for e in writer.examples_of(c)})
    writer.finalize()
    header = open_cache(path).header
    assert (header["teacher_step"], header["teacher_digest"]) == (15, "a" * 64)
    open_cache(path, made)
    open_cache(path, IDENTITY)  # not compared when not given
    for step, digest in ((30, "b" * 64), (15, "c" * 64)):
        with pytest.raises(
            CacheError,
            match=rf"was made from teacher checkpoint step 15 "
            rf"\(digest aaaaaaaaaaaa\), but the one selected "
            rf"now is teacher checkpoint step {step} "
            rf"\(digest {digest[:12]}\)",
        ):
            open_cache(path, replace(made, teacher_step=step, teacher_digest=digest))


def test_unfinished_cache_from_another_teacher_checkpoint_is_not_resumed(tmp_path):
    from dataclasses import replace

    path = str(tmp_path / "cache")
    made = replace(IDENTITY, teacher_step=15, teacher_digest="a" * 64)
    writer = create_or_resume(path, made, np.array([2, 3, 4]), chunk_rows=4)
    writer.write_chunk(0, {0: _example(0, 2)})
    writer.flush()
    with pytest.raises(
        CacheError,
        match="unfinished cache for other data: it was made from "
        "teacher checkpoint step 15.*step 30",
    ):
        create_or_resume(
            path,
            replace(made, teacher_step=30, teacher_digest="b" * 64),
            np.array([2, 3, 4]),
            chunk_rows=4,
        )


# ----------------------------------------------------------------------------- damage


def _three_chunks(path, identity=IDENTITY):
    """A finished cache of 3 chunks (8 rows each); returns the lengths."""
    lengths = [5, 5, 5]
    writer = create_or_resume(path, identity, np.array(lengths), chunk_rows=8)
    for c in writer.pending_chunks():
        writer.write_chunk(c, {e: _example(e, lengths[e]) for e in writer.examples_of(c)})
    writer.finalize()
    return lengths


def _flip(file, offset=-7):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("preload", [True, False], ids=["in-memory", "range-reads"])
def test_flipped_bits_in_a_chunk_are_refused_naming_it(where, preload):
    """Each inner chunk carries a CRC32C: a flipped byte in chunk 1 is refused when the
    cache is opened (held in memory) or when a batch reads it (range reads), naming the
    cache and the chunk; batches of the other chunks still read."""
    path = where("cache")
    _three_chunks(path)
    file = storage.path(path) / "logits" / "c" / "1" / "0"
    _flip(file)
    message = rf"{path}: chunk 1 of logits \(.*c/1/0\) is damaged: .*[Dd]igest mismatch"
    if preload:
        with pytest.raises(CacheError, match=message):
            open_cache(path, preload_bytes=1 << 20)
        return
    cache = open_cache(path, preload_bytes=0)
    np.testing.assert_array_equal(cache[0][1], _example(0, 5)[1])  # chunk 0 is sound
    with pytest.raises(CacheError, match=message):
        cache.read_async([0, 1]).result()


@pytest.mark.parametrize("cut", [0, 20, -30], ids=["emptied", "index-cut", "data-cut"])
def test_truncated_chunk_is_refused_naming_it(tmp_path, cut):
    path = str(tmp_path / "cache")
    _three_chunks(path)
    file = tmp_path / "cache" / "indices" / "c" / "2" / "0"
    data = file.read_bytes()
    file.write_bytes(data[:cut] if cut >= 0 else data[: len(data) + cut])
    with pytest.raises(CacheError, match=r"chunk 2 of indices \(.*c/2/0\) is damaged"):
        open_cache(path)


@pytest.mark.parametrize("preload", [True, False], ids=["in-memory", "range-reads"])
def test_nan_logits_and_foreign_indices_are_refused_naming_the_chunk(tmp_path, preload):
    """Values written over a chunk with a valid checksum (NaN logits, an index outside
    the student vocabulary) are caught by the reader's value check."""
    from dataclasses import replace

    import tensorstore as ts

    from distill_jax.soft_target_cache import _array_spec

    path = str(tmp_path / "cache")
    _three_chunks(path, replace(IDENTITY, vocab_size=100))
    size = 1 << 20 if preload else 0
    logits = ts.open(_array_spec(path, "logits"), open=True).result()
    logits[9, 2].write(np.float16(np.nan)).result()  # row 9: chunk 1
    with pytest.raises(
        CacheError,
        match=r"chunk 1 of logits .* 1 rows hold logits that are "
        r"not finite",
    ):
        open_cache(path, preload_bytes=size).read_async([0, 1, 2]).result()
    logits[9, 2].write(np.float16(1.0)).result()
    indices = ts.open(_array_spec(path, "indices"), open=True).result()
    indices[17, 0].write(np.int32(100)).result()  # row 17: chunk 2
    with pytest.raises(
        CacheError,
        match=r"chunk 2 of indices .* indices outside the student "
        r"vocabulary \(0\.\.99\)",
    ):
        open_cache(path, preload_bytes=size).read_async([2]).result()


def test_writer_refuses_non_finite_logits_and_foreign_indices(tmp_path):
    from dataclasses import replace

    writer = create_or_resume(
        str(tmp_path / "c"), replace(IDENTITY, vocab_size=100), np.array([3]), chunk_rows=8
    )
    logits, indices = _example(0, 3)
    bad = logits.copy()
    bad[1] = np.nan
    with pytest.raises(CacheError, match="not all finite"):
        writer.write_chunk(0, {0: (bad, indices)})
    with pytest.raises(CacheError, match="outside the student vocabulary of 100"):
        writer.write_chunk(0, {0: (logits, indices + 100)})


@pytest.mark.parametrize("name", ["header.json", "rows.npy"])
def test_damaged_header_or_rows_is_refused_naming_the_file(tmp_path, name):
    path = str(tmp_path / "cache")
    _three_chunks(path)
    (tmp_path / "cache" / name).write_bytes(b"")
    with pytest.raises(CacheError, match=rf"cache/{name}.*(damaged|missing)"):
        open_cache(path)


def test_cache_errors_exit_with_status_2():
    from distill_jax.errors import UserError

    assert issubclass(CacheError, UserError) and issubclass(CacheError, ValueError)
