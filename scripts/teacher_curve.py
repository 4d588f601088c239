"""A teacher's learning curve from its run: validation masked accuracy and stride-masked
soft-target quality (``distill_jax.teacher_quality``) at every validation step.

  distill-jax train-teacher --config configs/multi30k_full.py --workdir W \
      --set teacher.steps=1600 --set teacher.eval_every=200 --set teacher.save_every=200 \
      --set teacher.quality_examples=0 [--set teacher.checkpoint=...]
  python scripts/teacher_curve.py W [--json results/multi30k_full_teacher_curve.json]

Prints one row per validation (step, loss, masked accuracy, stride top-1 / top-K, p(ref));
``--json`` writes them with the run's teacher config,
this machine and the commit. A run that is still going (or was stopped) gives the steps it
reached, and the record says how far it got.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from provenance import cpu_model, git_commit  # noqa: E402

COLUMNS = ("loss", "masked_accuracy", "stride_top1", "stride_topk", "stride_p_ref")


def curve(workdir: pathlib.Path) -> tuple[list[dict], dict]:
    """(validation records in step order, the run's saved teacher config)."""
    run = workdir / "teacher"
    lines = (
        (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    )
    records = [json.loads(line) for line in lines if line.strip()]
    valid = {r["step"]: r for r in records if r.get("split") == "valid"}
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    return [valid[s] for s in sorted(valid)], config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--json", type=pathlib.Path, help="also write the curve here")
    args = parser.parse_args(argv)
    points, config = curve(args.workdir)
    if not points:
        print(f"teacher_curve: no validation record in {args.workdir / 'teacher'}", file=sys.stderr)
        return 2
    print("| step | val loss | masked acc. | stride top-1 | stride top-K | p(ref) |")
    print("|---|---|---|---|---|---|")
    for p in points:
        print(
            f"| {p['step']} | {p['loss']:.3f} | {100 * p['masked_accuracy']:.1f}% | "
            f"{100 * p.get('stride_top1', float('nan')):.1f}% | "
            f"{100 * p.get('stride_topk', float('nan')):.1f}% | "
            f"{p.get('stride_p_ref', float('nan')):.3f} |"
        )
    steps = config.get("steps")
    reached = points[-1]["step"]
    if steps and reached < steps:
        print(f"(the run reached step {reached} of teacher.steps={steps})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "teacher_config": config,
                    "reached_step": reached,
                    "points": [
                        {"step": p["step"], **{k: p[k] for k in COLUMNS if k in p}} for p in points
                    ],
                    "hardware": cpu_model(),
                    "commit": git_commit(),
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
