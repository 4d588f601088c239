"""The memory-mapped soft-target cache: layout, resume, and refusal of bad caches."""

import os

import numpy as np
import pytest

from distill_jax.soft_target_cache import (CacheError, CacheIdentity, create_or_resume,
                                           open_cache)

IDENTITY = CacheIdentity(teacher="teacher@abc", vocabulary="vocab@123",
                         dataset="multi30k/de-en@xyz", split="train", top_k=4, stride=7)


def _example(i, length, k=4):
    rng = np.random.default_rng(i)
    logits = -np.sort(-rng.normal(size=(length, k)), axis=-1).astype(np.float32)  # decreasing
    indices = rng.integers(0, 100, size=(length, k)).astype(np.int32)
    return logits, indices


def _fill(path, lengths, only=None):
    writer = create_or_resume(str(path), IDENTITY, np.array(lengths))
    for i in writer.pending(range(len(lengths)) if only is None else only):
        writer.write(i, *_example(i, lengths[i]))
    writer.flush()
    return writer


def test_rows_belong_to_their_example_and_position(tmp_path):
    lengths = [3, 5, 1, 4]
    path = tmp_path / "cache"
    _fill(path, lengths).finalize()
    cache = open_cache(str(path), IDENTITY, num_examples=4)
    assert len(cache) == 4 and not os.path.exists(str(path) + ".partial")
    for i, length in enumerate(lengths):
        logits, indices = cache[i]
        want_logits, want_indices = _example(i, length)
        assert logits.shape == (length, 4)
        np.testing.assert_allclose(logits, want_logits.astype(np.float16), rtol=0, atol=0)
        np.testing.assert_array_equal(indices, want_indices)


def test_resume_keeps_written_examples(tmp_path):
    lengths = [2, 3, 4]
    path = tmp_path / "cache"
    _fill(path, lengths, only=[0, 2])  # interrupted after two examples
    with pytest.raises(CacheError, match="is not a finished soft-target cache"):
        open_cache(str(path))
    writer = create_or_resume(str(path), IDENTITY, np.array(lengths))
    assert writer.pending(range(3)) == [1]
    with pytest.raises(CacheError, match="1 of 3 examples have no soft targets"):
        writer.finalize()
    writer.write(1, *_example(1, 3))
    writer.finalize()
    np.testing.assert_array_equal(open_cache(str(path))[2][1], _example(2, 4)[1])


def test_truncated_cache_is_refused(tmp_path):
    path = tmp_path / "cache"
    _fill(path, [3, 3]).finalize()
    with open(path / "indices.i32", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CacheError, match=r"indices.i32: expected 96 bytes .* found 10"):
        open_cache(str(path))


@pytest.mark.parametrize("field,value", [("vocabulary", "vocab@other"),
                                         ("dataset", "gigaword@1"), ("teacher", "other")])
def test_foreign_cache_is_refused(tmp_path, field, value):
    path = tmp_path / "cache"
    _fill(path, [2]).finalize()
    expected = CacheIdentity(**{**IDENTITY.__dict__, field: value})
    with pytest.raises(CacheError, match=f"made for {field}"):
        open_cache(str(path), expected)


def test_smaller_k_is_accepted_larger_refused(tmp_path):
    path = tmp_path / "cache"
    _fill(path, [2]).finalize()
    open_cache(str(path), CacheIdentity(**{**IDENTITY.__dict__, "top_k": 2}))
    with pytest.raises(CacheError, match="K=4 entries per position; the run asks for K=8"):
        open_cache(str(path), CacheIdentity(**{**IDENTITY.__dict__, "top_k": 8}))


def test_wrong_shapes_and_unsorted_logits_are_refused(tmp_path):
    writer = create_or_resume(str(tmp_path / "c"), IDENTITY, np.array([3]))
    logits, indices = _example(0, 3)
    with pytest.raises(CacheError, match=r"expected soft targets of shape \(3, 4\)"):
        writer.write(0, logits[:2], indices[:2])
    with pytest.raises(CacheError, match="sorted in decreasing order"):
        writer.write(0, logits[:, ::-1], indices)


def test_example_count_must_match_dataset(tmp_path):
    path = tmp_path / "cache"
    _fill(path, [1, 1]).finalize()
    with pytest.raises(CacheError, match="soft targets for 2 examples; the dataset split has 3"):
        open_cache(str(path), num_examples=3)
