"""The soft-target cache (tensorstore zarr, chunked by rows) on local disk and on the
Cloud Storage emulator: layout, resume, batched reads, and refusal of bad caches."""

import numpy as np
import pytest

from distill_jax import storage
from distill_jax.soft_target_cache import (CacheError, CacheIdentity, create_or_resume,
                                           is_finished, open_cache, plan_chunks)

IDENTITY = CacheIdentity(teacher="teacher@abc", vocabulary="vocab@123",
                         dataset="multi30k/de-en@xyz", split="train", top_k=4, stride=7)


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path):
    """A fresh cache location: a local folder or a gs:// prefix on the emulator."""
    if request.param == "local":
        return lambda name: str(tmp_path / name)
    gcs = request.getfixturevalue("gcs")
    return lambda name: gcs.gs("cache-tests", request.node.name.replace("[", "-")
                               .replace("]", ""), name)


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


@pytest.mark.parametrize("field,value", [("vocabulary", "vocab@other"),
                                         ("dataset", "gigaword@1"), ("teacher", "other"),
                                         ("stride", 5)])
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
            tgt_out[0, :lengths[i]] = 5
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
