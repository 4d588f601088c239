"""scripts/bench/bench_teacher_step.py's epoch mode: which batch shapes it times and how
often each counts."""

import argparse
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "bench"))
import bench_teacher_step  # noqa: E402

pytestmark = pytest.mark.bench  # benchmark tools: out of the fast tier, run in CI


def test_epoch_shapes_cover_the_epoch_and_count_real_tokens(tmp_path):
    """The most frequent shapes of the pipeline's epoch plan, covering at least the asked
    share of its batches, each weighted by its batch count, with the real tokens of the
    batch that stands for it; the batch is the pipeline's, with its C-MLM masks."""
    rng = np.random.default_rng(0)
    src = rng.integers(3, 30, 2000)
    lengths = np.stack([src, np.maximum(2, src - rng.integers(0, 6, 2000))], axis=1)
    path = tmp_path / "lengths.npy"
    np.save(path, lengths)
    args = argparse.Namespace(vocab=100, tokens=512, bucket_step=8, mask_rate=0.3, coverage=0.7)
    entries, covered = bench_teacher_step.epoch_batches(str(path), args)
    weights = [weight for _, _, weight in entries]
    assert weights == sorted(weights, reverse=True)  # most frequent first
    assert sum(weights) == covered["batches_covered"]
    assert covered["batches_covered"] >= 0.7 * covered["batches_per_epoch"]
    # one shape fewer would not cover it: only as many shapes as needed are timed
    assert sum(weights[:-1]) < 0.7 * covered["batches_per_epoch"]
    assert 0 < covered["padding_fraction"] < 0.5
    for (batch, real, _), shape in zip(entries, covered["shapes"]):
        rows, src_len, tgt_len = shape
        assert batch["src"].shape == (rows, src_len) and batch["tgt_out"].shape == (rows, tgt_len)
        assert real == int((batch["src"] != 0).sum() + (batch["tgt_out"] != 0).sum())
        assert batch["mlm_mask"].any() and not (batch["mlm_mask"] & (batch["tgt_out"] == 0)).any()
        assert sorted(batch) == ["mlm_mask", "mlm_positions", "src", "tgt_out"]
