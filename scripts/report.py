"""Prints the results table of an experiment work directory and draws its training curves.

  python scripts/report.py WORKDIR [--json results/NAME.json]

Reads WORKDIR/students/*/results.json and the metrics.jsonl logs; writes
WORKDIR/curves.png (teacher and student losses, validation BLEU) when matplotlib is
installed. Runs named ``STEM`` and ``STEM-s<seed>`` (scripts/seeds.sh) are also summarised
per stem as mean +- sample standard deviation over their seeds.
"""

import argparse
import json
import pathlib
import platform
import re
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from benchlib import cpu_model  # noqa: E402


def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results_table(workdir: pathlib.Path) -> tuple[str, list[dict]]:
    runs = sorted((workdir / "students").glob("*/results.json"))
    if not runs:
        sys.exit(f"no students/*/results.json in {workdir}: run train-student first")
    results = [json.loads(p.read_text()) for p in runs]
    splits = list(results[0]["splits"])
    lines = ["| student | distillation | steps | checkpoint | "
             + " | ".join(f"{s} BLEU" for s in splits) + " |",
             "|---|---|---|---|" + "---|" * len(splits)]
    records = []
    for r in results:
        lines.append(f"| {r['name']} | {r['kd']} | {r['steps']} | {r['checkpoint']} | "
                     + " | ".join(f"{r['splits'][s]['bleu']:.2f}" for s in splits) + " |")
        for s in splits:
            records.append({"system": r["name"], "kd": r["kd"], "teacher": r.get("teacher"),
                            "seed": r.get("seed"), "split": s, "metric": "bleu",
                            "value": r["splits"][s]["bleu"],
                            "signature": r["splits"][s]["bleu_signature"],
                            "checkpoint": r["checkpoint"], "steps": r["steps"],
                            "hardware": f"{cpu_model()} ({platform.machine()}), CPU"})
    signature = results[0]["splits"][splits[0]]["bleu_signature"]
    table = "\n".join(lines) + f"\n\nsacreBLEU signature: {signature}"
    summary = seed_summary(records, splits)
    return table + ("\n\n" + summary if summary else ""), records


def seed_summary(records: list[dict], splits: list[str]) -> str:
    """Mean +- sample std over the seeds of every ``STEM[-s<seed>]`` group with >= 2 runs."""
    groups: dict[str, dict[str, list[float]]] = {}
    for r in records:
        stem = re.sub(r"-s\d+$", "", r["system"])
        groups.setdefault(stem, {}).setdefault(r["split"], []).append(r["value"])
    groups = {k: v for k, v in groups.items() if min(len(x) for x in v.values()) >= 2}
    if not groups:
        return ""
    lines = ["| system | seeds | " + " | ".join(f"{s} BLEU (mean ± std)" for s in splits) + " |",
             "|---|---|" + "---|" * len(splits)]
    for stem, by_split in groups.items():
        cells = [f"{statistics.mean(by_split[s]):.2f} ± {statistics.stdev(by_split[s]):.2f}"
                 for s in splits]
        lines.append(f"| {stem} | {len(by_split[splits[0]])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(workdir: pathlib.Path) -> pathlib.Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    teacher = read_jsonl(workdir / "teacher" / "metrics.jsonl")
    for split, style in (("train", "-"), ("valid", "o-")):
        points = [(r["step"], r["loss"]) for r in teacher if r["split"] == split]
        if points:
            axes[0].plot(*zip(*points), style, label=f"teacher {split}")
    axes[0].set(title="C-MLM teacher: masked-token loss", xlabel="step", ylabel="loss")
    for run in sorted((workdir / "students").glob("*/metrics.jsonl")):
        records = read_jsonl(run)
        name = run.parent.name
        train = [(r["step"], r["nll"]) for r in records if r["split"] == "train"]
        valid = [(r["step"], r["bleu"]) for r in records if r["split"] == "valid"]
        if train:
            axes[1].plot(*zip(*train), label=name)
        if valid:
            axes[2].plot(*zip(*valid), "o-", label=name)
    axes[1].set(title="student: training NLL", xlabel="step", ylabel="nll")
    axes[2].set(title="student: validation BLEU", xlabel="step", ylabel="BLEU")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = workdir / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--json", type=pathlib.Path, help="also write the records as JSON")
    args = parser.parse_args()
    table, records = results_table(args.workdir)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
    out = plot(args.workdir)
    if out:
        print(f"training curves: {out}")


if __name__ == "__main__":
    main()
