"""Summarises the runs of a comparison benchmark kept in one record file: per shape, the
number of runs and the median and range of ours / theirs (throughput ratio).

  python scripts/bench/bench_summary.py results/xeon/bench_teacher.json [more records ...]

A record file is the JSON list that ``bench_teacher.py`` / ``bench_student_step.py`` /
``bench_beam.py`` write with ``--json``; files that hold several runs tag each record with
its ``run``. BENCHMARKS.md's tables are this script's output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

SHAPE_KEYS = ("batch", "length", "src_len", "tgt_len", "new_tokens", "beams")


def summarise(records: list[dict]) -> list[tuple[str, int, float, float, float]]:
    """(shape, runs, median, min, max) of ours / theirs, one row per shape.

    The pair's ratio is the ``ratio_ours_over_theirs`` that both sides' records carry; a
    variant side (e.g. ``--mask-as-select``) carries its own, on its record alone."""
    found = defaultdict(lambda: defaultdict(list))  # shape -> run -> [ratio of each record]
    for record in records:
        ratio = record.get("ratio_ours_over_theirs")
        if ratio is None:
            continue
        shape = ", ".join(
            f"{k} {record['config'][k]}" for k in SHAPE_KEYS if k in record.get("config", {})
        )
        found[shape][record.get("run", 1)].append(ratio)
    ratios = {
        shape: {run: max(set(values), key=values.count) for run, values in runs.items()}
        for shape, runs in found.items()
    }
    return [
        (
            shape,
            len(by_run),
            statistics.median(by_run.values()),
            min(by_run.values()),
            max(by_run.values()),
        )
        for shape, by_run in ratios.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("records", nargs="+")
    args = parser.parse_args()
    print("| record | shape | runs | ours / theirs, median | range |")
    print("|---|---|---|---|---|")
    for path in args.records:
        with open(path) as f:
            records = json.load(f)
        rows = summarise(records)
        if not rows:
            sys.exit(f"{path}: no record has ratio_ours_over_theirs (not a comparison benchmark)")
        for shape, runs, median, low, high in rows:
            print(f"| {path} | {shape} | {runs} | {median:.3f}x | {low:.3f}-{high:.3f}x |")


if __name__ == "__main__":
    main()
