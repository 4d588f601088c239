"""Scores finished student runs once on the release-only test sets (never used for a choice).

  python scripts/release_eval.py --config CONFIG --workdir WORKDIR --runs NAME,NAME,... \
      --json results/NAME_release.json [--splits test2017,mscoco2017,test2018] \
      [--set FIELD=VALUE ...]

Each run is loaded with the parameters its ``results.json`` reports (the best validation
checkpoint, the last step or the average of the last checkpoints, as training chose them on
val), decodes every split with the config's decoding settings and is scored as
``train-student`` scores its splits (detokenized, case-insensitive sacreBLEU). The run's
reported split (``data.test_splits``, test2016 for Multi30k) is decoded again first and
must reproduce the reported BLEU, so the release figures come from exactly the systems in
the results table. The hypotheses go to ``WORKDIR/students/NAME/SPLIT.hyp.txt``. Per run
and split the BLEU, and per stem (``NAME`` and ``NAME-s<seed>``) the mean and sample
standard deviation, are printed and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys

import distill_jax as dj
from distill_jax import storage
from distill_jax.errors import UserError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import seed_stem  # noqa: E402

from provenance import cpu_model, git_commit  # noqa: E402

RELEASE_SPLITS = ("test2017", "mscoco2017", "test2018")


def checkpoint_of(reported: str) -> str:
    """The ``Student.load`` checkpoint of a results.json ``checkpoint`` description."""
    if reported.startswith("average of the last"):
        return "averaged"
    match = re.search(r"step (\d+)$", reported)
    if not match:
        raise UserError(f"results.json names an unknown checkpoint {reported!r}")
    return match.group(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--runs", required=True, help="comma-separated finished run names")
    parser.add_argument("--splits", default=",".join(RELEASE_SPLITS))
    parser.add_argument("--json", required=True, help="where to write the record")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = dj.load_config(args.config, args.set)
        splits = [s for s in args.splits.split(",") if s]
        records = {}
        for name in [r for r in args.runs.split(",") if r]:
            run_dir = storage.path(args.workdir) / "students" / name
            results_file = run_dir / "results.json"
            if not results_file.exists():
                raise UserError(f"{results_file}: no such file (the run {name!r} has not finished)")
            results = json.loads(results_file.read_text())
            student = dj.Student.load(
                config, args.workdir, name, checkpoint_of(results["checkpoint"])
            )
            record = {"checkpoint": results["checkpoint"], "splits": {}}
            for split in config.data.test_splits:
                again = student.score(split, progress=not args.no_progress)["bleu"]
                reported = results["splits"][split]["bleu"]
                if abs(again - reported) > 0.01:
                    raise UserError(
                        f"{name}: {split} BLEU {again:.2f} decoded again, but "
                        f"results.json reports {reported:.2f}"
                    )
                record["splits"][split] = {"bleu": again, "reported": reported}
            for split in splits:
                scores = student.score(split, progress=not args.no_progress)
                storage.write_text_atomic(
                    run_dir / f"{split}.hyp.txt", "\n".join(scores["hypotheses"]) + "\n"
                )
                record["splits"][split] = {
                    "bleu": scores["bleu"],
                    "bleu_signature": scores["bleu_signature"],
                }
                print(f"{name} {split}: BLEU {scores['bleu']:.2f}", flush=True)
            records[name] = record
    except UserError as err:
        print(f"release_eval.py: {err}", file=sys.stderr)
        return 2
    summary = {}
    for stem in dict.fromkeys(seed_stem(n) for n in records):
        names = [n for n in records if seed_stem(n) == stem]
        summary[stem] = {"runs": names}
        for split in [*config.data.test_splits, *splits]:
            values = [records[n]["splits"][split]["bleu"] for n in names]
            summary[stem][split] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    print(
        "| system | runs | "
        + " | ".join(f"{s} BLEU" for s in [*config.data.test_splits, *splits])
        + " |"
    )
    print("|---|---|" + "---|" * (len(config.data.test_splits) + len(splits)))
    for stem, row in summary.items():
        cells = [
            f"{row[s]['mean']:.2f} ± {row[s]['std']:.2f}"
            for s in [*config.data.test_splits, *splits]
        ]
        print(f"| {stem} | {len(row['runs'])} | " + " | ".join(cells) + " |")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "config": args.config,
                "machine": cpu_model(),
                "commit": git_commit(),
                "runs": records,
                "systems": summary,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
