"""Prints the results table of an experiment work directory and draws its training curves.

  python scripts/report.py WORKDIR [--json results/NAME.json] [--metrics bleu,rougeL]

Reads WORKDIR/students/*/results.json (BLEU, and ROUGE-1/2/L when the runs recorded it) and the metrics.jsonl logs; writes
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


METRICS = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}


def results_table(workdir: pathlib.Path, metrics: list[str] | None = None
                  ) -> tuple[str, list[dict]]:
    """The per-run table (and per-seed summary) of ``metrics`` on every scored split; by
    default BLEU, plus ROUGE-1/2/L when every run recorded them. Returns (text, records)."""
    runs = sorted((workdir / "students").glob("*/results.json"))
    if not runs:
        sys.exit(f"no students/*/results.json in {workdir}: run train-student first")
    results = [json.loads(p.read_text()) for p in runs]
    splits = list(results[0]["splits"])
    if metrics is None:
        metrics = [m for m in METRICS
                   if all(m in r["splits"][s] for r in results for s in r["splits"])]
    for path, r in zip(runs, results):
        for s in splits:
            missing = [m for m in metrics if m not in r["splits"].get(s, {})]
            if missing:
                sys.exit(f"{path}: split {s!r} has no {', '.join(missing)} "
                         "(rerun train-student to rescore, or choose --metrics)")
    columns = [(s, m) for s in splits for m in metrics]
    lines = ["| student | distillation | steps | checkpoint | "
             + " | ".join(f"{s} {METRICS[m]}" for s, m in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    records = []
    for r in results:
        lines.append(f"| {r['name']} | {r['kd']} | {r['steps']} | {r['checkpoint']} | "
                     + " | ".join(f"{r['splits'][s][m]:.2f}" for s, m in columns) + " |")
        for s, m in columns:
            records.append({"system": r["name"], "kd": r["kd"], "teacher": r.get("teacher"),
                            "seed": r.get("seed"), "split": s, "metric": m,
                            "value": r["splits"][s][m],
                            **({"signature": r["splits"][s]["bleu_signature"]}
                               if m == "bleu" else {}),
                            "checkpoint": r["checkpoint"], "steps": r["steps"],
                            "hardware": f"{cpu_model()} ({platform.machine()}), CPU"})
    table = "\n".join(lines)
    if "bleu" in metrics:
        table += f"\n\nsacreBLEU signature: {results[0]['splits'][splits[0]]['bleu_signature']}"
    summary = seed_summary(records, columns)
    return table + ("\n\n" + summary if summary else ""), records


def seed_summary(records: list[dict], columns: list[tuple[str, str]]) -> str:
    """Mean +- sample std over the seeds of every ``STEM[-s<seed>]`` group with >= 2 runs."""
    groups: dict[str, dict[tuple[str, str], list[float]]] = {}
    for r in records:
        stem = re.sub(r"-s\d+$", "", r["system"])
        groups.setdefault(stem, {}).setdefault((r["split"], r["metric"]), []).append(r["value"])
    groups = {k: v for k, v in groups.items() if min(len(x) for x in v.values()) >= 2}
    if not groups:
        return ""
    lines = ["| system | seeds | "
             + " | ".join(f"{s} {METRICS[m]} (mean ± std)" for s, m in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for stem, by_column in groups.items():
        cells = [f"{statistics.mean(by_column[c]):.2f} ± {statistics.stdev(by_column[c]):.2f}"
                 for c in columns]
        lines.append(f"| {stem} | {len(by_column[columns[0]])} | " + " | ".join(cells) + " |")
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
    parser.add_argument("--metrics", default=None,
                        help=f"comma-separated, from {', '.join(METRICS)} (default: BLEU, and "
                             "ROUGE when every run has it)")
    args = parser.parse_args()
    metrics = None
    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            parser.error(f"--metrics: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(METRICS)}")
    table, records = results_table(args.workdir, metrics)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
    out = plot(args.workdir)
    if out:
        print(f"training curves: {out}")


if __name__ == "__main__":
    main()
