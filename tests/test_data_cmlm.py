"""C-MLM teacher inputs and masks (distill_jax.data.cmlm) against a loop-based reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.data.cmlm import (
    build_cmlm_inputs,
    masked_capacity,
    masked_positions,
    random_target_mask,
    stride_masks,
)

CLS, MASK = 101, 103


def _reference_packed(src_row, tgt_row, teacher_ids, mask_row):
    """The packed teacher sequence of one example, built token by token."""
    ids, types, weights = [CLS], [0], []
    ids += [int(teacher_ids[t]) for t in src_row if t != 0]
    types += [0] * (len(ids) - 1)
    for t, m in zip(tgt_row, mask_row):
        if t == 0:
            weights.append(0.0)
            continue
        ids.append(MASK if m else int(teacher_ids[t]))
        types.append(1)
        weights.append(1.0 if m else 0.0)
    return ids, types, weights


def _random_batch(rng, batch=5, src_len=9, tgt_len=7, vocab=40):
    """A 0-padded student batch with sources ending in </s> (2) and random masks."""
    src = np.zeros((batch, src_len), np.int32)
    tgt_out = np.zeros((batch, tgt_len), np.int32)
    for row in range(batch):
        n_src, n_tgt = rng.integers(1, src_len + 1), rng.integers(1, tgt_len + 1)
        src[row, : n_src - 1] = rng.integers(4, vocab, n_src - 1)
        src[row, n_src - 1] = 2
        tgt_out[row, : n_tgt - 1] = rng.integers(4, vocab, n_tgt - 1)
        tgt_out[row, n_tgt - 1] = 2
    mask = rng.random((batch, tgt_len)) < 0.4
    teacher_ids = rng.permutation(1000)[:vocab].astype(np.int32) + 1000
    return src, tgt_out, teacher_ids, mask


@pytest.mark.parametrize("use_jit", [False, True])
def test_layout_matches_packed_reference(use_jit):
    rng = np.random.default_rng(0)
    src, tgt_out, teacher_ids, mask = _random_batch(rng)

    def fn(*a):
        return build_cmlm_inputs(*a, cls_id=CLS, mask_id=MASK)

    out = (
        jax.jit(fn)(*map(jnp.asarray, (src, tgt_out, teacher_ids, mask)))
        if use_jit
        else fn(src, tgt_out, teacher_ids, mask)
    )
    out = {k: np.asarray(v) for k, v in out.items()}
    b, s, t = src.shape[0], src.shape[1], tgt_out.shape[1]
    assert out["input_ids"].shape == (b, 1 + s + t)
    np.testing.assert_array_equal(out["labels"], tgt_out)
    assert out["label_weights"].dtype == np.float32
    for row in range(b):
        ids, types, weights = _reference_packed(src[row], tgt_out[row], teacher_ids, mask[row])
        keep = out["attention_mask"][row].astype(bool)
        # Removing the masked (padding) positions gives exactly the packed sequence.
        assert out["input_ids"][row][keep].tolist() == ids
        assert out["token_type_ids"][row][keep].tolist() == types
        assert out["position_ids"][row][keep].tolist() == list(range(len(ids)))
        assert out["label_weights"][row].tolist() == weights
        # Segment 1 covers exactly the target block, padding included.
        assert out["token_type_ids"][row].tolist() == [0] * (1 + s) + [1] * t
        # The EOS slot is [SEP]'s teacher id (student 2) unless masked.
        n_src = int((src[row] != 0).sum())
        assert out["input_ids"][row][n_src] == teacher_ids[2]


def test_only_target_positions_are_masked():
    rng = np.random.default_rng(1)
    src, tgt_out, teacher_ids, _ = _random_batch(rng)
    everything = np.ones_like(tgt_out, bool)
    out = build_cmlm_inputs(src, tgt_out, teacher_ids, everything, cls_id=CLS, mask_id=MASK)
    is_mask = out["input_ids"] == MASK
    s = src.shape[1]
    assert not is_mask[:, : 1 + s].any()
    np.testing.assert_array_equal(is_mask[:, 1 + s :], tgt_out != 0)
    np.testing.assert_array_equal(out["label_weights"], (tgt_out != 0).astype(np.float32))


def test_random_mask_rate_and_determinism():
    tgt_len = 40
    masks = np.stack([random_target_mask(tgt_len, seed=3, example_index=i) for i in range(4000)])
    assert abs(masks.mean() - 0.15) < 0.01
    # Each position (the final EOS slot included) is masked at the same rate.
    assert abs(masks[:, -1].mean() - 0.15) < 0.03
    again = random_target_mask(tgt_len, seed=3, example_index=17)
    np.testing.assert_array_equal(again, masks[17])
    assert not np.array_equal(
        random_target_mask(tgt_len, seed=4, example_index=17), again
    ) or not np.array_equal(random_target_mask(tgt_len, seed=3, example_index=18), again)


def test_random_mask_resamples_empty_masks():
    # With one position, every mask must be that position, despite rate 0.15.
    for i in range(200):
        assert random_target_mask(1, seed=0, example_index=i).tolist() == [True]
    # For short targets the rate is the conditional one: rate / (1 - (1 - rate)^L).
    tgt_len, n = 3, 6000
    masks = np.stack([random_target_mask(tgt_len, 0, i) for i in range(n)])
    assert masks.any(axis=1).all()
    expected = 0.15 / (1 - 0.85**tgt_len)
    assert abs(masks.mean() - expected) < 0.015


@pytest.mark.parametrize("tgt_len,stride", [(1, 7), (6, 7), (7, 7), (23, 7), (10, 3)])
def test_stride_masks_cover_every_position_once(tgt_len, stride):
    masks = stride_masks(tgt_len, stride)
    assert masks.shape == (min(stride, tgt_len), tgt_len)
    np.testing.assert_array_equal(masks.sum(axis=0), np.ones(tgt_len))
    assert masks.any(axis=1).all()
    for i, row in enumerate(masks):
        assert np.flatnonzero(row).tolist() == list(range(i, tgt_len, stride))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tgt_len"):
        random_target_mask(0, 0, 0)
    with pytest.raises(ValueError, match="rate"):
        random_target_mask(5, 0, 0, rate=0.0)


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_masks_stay_within_capacity(rate):
    """Every drawn mask fits ``masked_capacity`` (the width the teacher's output layer runs
    on), the capacity never decreases with the length, and it truncates only the tail: the
    masking rate stays the configured one."""
    capacities = [masked_capacity(n, rate) for n in range(1, 129)]
    assert capacities == sorted(capacities) and capacities[0] == 1
    assert all(c <= n for n, c in zip(range(1, 129), capacities))
    for n in (1, 2, 5, 16, 40):
        counts = np.array([random_target_mask(n, 0, i, rate).sum() for i in range(1500)])
        assert counts.min() >= 1 and counts.max() <= masked_capacity(n, rate)
    masks = np.stack([random_target_mask(40, 1, i, rate) for i in range(3000)])
    assert abs(masks.mean() - rate) < 0.01


def test_masked_positions_numpy_and_jax():
    mask = np.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    expected = [[1, 3, 4, -1], [-1, -1, -1, -1], [0, -1, -1, -1]]
    np.testing.assert_array_equal(masked_positions(mask, 4), expected)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda m: masked_positions(m, 4))(jnp.asarray(mask))), expected
    )
    np.testing.assert_array_equal(masked_positions(mask, 7)[:, 4:], -1)
    with pytest.raises(ValueError, match="capacity 2"):
        masked_positions(mask, 2)
