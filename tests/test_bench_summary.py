"""scripts/bench/bench_summary.py: the per-shape ratio table BENCHMARKS.md is made of."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "bench"))
import bench_summary  # noqa: E402

pytestmark = pytest.mark.bench  # benchmark tools: out of the fast tier, run in CI


def _pair(run, length, ratio, variant=None):
    config = {"batch": 32, "length": length, "dtype": "float32"}
    records = [
        {"system": side, "config": config, "run": run, "ratio_ours_over_theirs": ratio}
        for side in ("ours", "theirs")
    ]
    if variant is not None:
        records.append(
            {"system": "variant", "config": config, "run": run, "ratio_ours_over_theirs": variant}
        )
    return records


def test_median_and_range_per_shape_ignore_variant_sides():
    records = (
        _pair(1, 64, 0.9, variant=0.5)
        + _pair(2, 64, 1.1, variant=0.6)
        + _pair(3, 64, 1.0)
        + _pair(1, 128, 2.0)
    )
    rows = {shape: rest for shape, *rest in bench_summary.summarise(records)}
    assert rows["batch 32, length 64"] == [3, 1.0, 0.9, 1.1]
    assert rows["batch 32, length 128"] == [1, 2.0, 2.0, 2.0]
