"""Prints the results table of an experiment work directory and draws its training curves.

  python scripts/report.py WORKDIR [WORKDIR ...] [--runs NAME,...] [--json results/NAME.json]
                          [--metrics bleu,rougeL] [--baseline NAME]
                          [--records FILE.json ... [--records-runs NAME,...]]

Reads WORKDIR/students/*/results.json (BLEU, and ROUGE-1/2/L when the runs recorded it) of
every WORKDIR (e.g. a second work directory with another teacher; run names must not
repeat across them), optionally only the runs named by --runs, and the metrics.jsonl logs;
writes WORKDIR/curves.png (teacher and student losses, validation BLEU) for the first
WORKDIR when matplotlib is installed. Runs named ``STEM`` and ``STEM-s<seed>`` (scripts/seeds.sh) are also summarised
per stem as mean +- sample standard deviation over their seeds.

--records FILE.json adds runs recorded earlier by --json (e.g. baselines whose work
directory is gone; --records-runs NAME,... takes only those) to the table, each keeping
the hardware and commit it was recorded with; a work directory is then optional.
"""

import argparse
import json
import pathlib
import platform
import re
import statistics
import sys
from typing import NoReturn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from provenance import cpu_model, git_commit  # noqa: E402


def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


METRICS = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}


def distillation(r: dict) -> str:
    """How a run used its teacher: ``none``, or e.g. ``offline, K 8, α 0.5, random teacher``."""
    t = r.get("teacher")
    if r["kd"] == "none" or not t:
        return r["kd"]
    parts = [r["kd"]]
    if "top_k" in t:
        parts.append(f"K {t['top_k']}")
    if "alpha" in t:
        parts.append(f"α {t['alpha']}")
    if t.get("temperature") is not None and t.get("top_k", 2) > 1:  # at K 1 T changes nothing
        parts.append(f"T {t['temperature']:g}")
    parts.append(f"{t.get('init', 'pretrained')} teacher")
    return ", ".join(parts)


def _with_temperature(result: dict, path: pathlib.Path) -> dict:
    """``result`` (a results.json) with its teacher's ``temperature`` taken from the run's
    config.json beside it when the results predate recording it."""
    teacher = result.get("teacher")
    config = path.with_name("config.json")
    if teacher and "temperature" not in teacher and config.exists():
        temperature = json.loads(config.read_text()).get("distill", {}).get("temperature")
        result = {**result, "teacher": {**teacher, "temperature": temperature}}
    return result


RECORD_FIELDS = ("system", "kd", "split", "metric", "value", "checkpoint", "steps")


def load_records(path: pathlib.Path, only: list[str] | None = None) -> list[dict]:
    """The runs in ``path`` (records written by ``--json``; only those called ``only`` when
    given) in the shape of a results.json, plus the ``hardware`` and ``commit`` they were
    recorded with."""
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"--records {path}: cannot read it as JSON ({e})")
    if not isinstance(records, list) or not records:
        fail(f"--records {path}: expected a non-empty list of records (report.py --json)")
    runs: dict[str, dict] = {}
    for i, r in enumerate(records):
        missing = [f for f in RECORD_FIELDS if not isinstance(r, dict) or f not in r]
        if missing:
            fail(f"--records {path}: record {i} has no {', '.join(missing)}")
        run = runs.setdefault(
            r["system"],
            {
                "name": r["system"],
                "kd": r["kd"],
                "teacher": r.get("teacher"),
                "seed": r.get("seed"),
                "checkpoint": r["checkpoint"],
                "steps": r["steps"],
                "trained_steps": r.get("trained_steps", r["steps"]),
                "stopped_early": r.get("stopped_early"),
                "hardware": r.get("hardware", "unknown"),
                "commit": r.get("commit", "unknown"),
                "recorded_in": str(path),
                "splits": {},
            },
        )
        if run["stopped_early"] and "patience" not in run:
            # Records before the "patience" field: the stop message names it.
            found = re.search(r"patience (\d+)\)", run["stopped_early"])
            run["patience"] = r.get("patience") or (int(found.group(1)) if found else "?")
        split = run["splits"].setdefault(r["split"], {})
        if r["metric"] in split:
            fail(f"--records {path}: {r['system']} {r['split']} {r['metric']} is recorded twice")
        split[r["metric"]] = r["value"]
        if "signature" in r:
            split["bleu_signature"] = r["signature"]
    if only is None:
        return list(runs.values())
    missing = [n for n in only if n not in runs]
    if missing:
        fail(f"--records {path}: no run called {', '.join(missing)} (it has {', '.join(runs)})")
    return [runs[n] for n in only]


def fail(message: str) -> NoReturn:
    """Stops on bad input: the message on stderr, exit status 2."""
    print(f"report.py: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def results_table(
    workdir: pathlib.Path | list[pathlib.Path],
    metrics: list[str] | None = None,
    names: list[str] | None = None,
    baseline: str | None = None,
    recorded: list[dict] | None = None,
) -> tuple[str, list[dict]]:
    """The per-run table (and per-seed summary) of ``metrics`` on every scored split of the
    runs in ``workdir`` (one or several; only those called ``names``, in that order, when
    given); by default BLEU, plus ROUGE-1/2/L when every run recorded them. With
    ``baseline`` (a run name), every score also shows its difference from that run's, and
    every seed group its mean's difference from the baseline's group. ``recorded``: runs
    from :func:`load_records`, tabled beside the work directories' (with their own
    hardware and commit). Returns (text, records)."""
    workdirs = [workdir] if isinstance(workdir, pathlib.Path) else list(workdir)
    recorded = list(recorded or [])
    runs: list[tuple[str, str, pathlib.Path | dict]] = []  # (name, where, results.json | run)
    for w in workdirs:
        found = sorted((w / "students").glob("*/results.json"))
        if not found:
            sys.exit(f"no students/*/results.json in {w}: run train-student first")
        runs += [(p.parent.name, str(w), p) for p in found]
    runs += [(r["name"], "the --records", r) for r in recorded]
    if not runs:
        fail("nothing to table: give a work directory or --records")
    by_name: dict[str, tuple[str, str, pathlib.Path | dict]] = {}
    for run in runs:
        name = run[0]
        if name in by_name and (names is None or name in names):
            sys.exit(
                f"run name {name!r} is in both {by_name[name][1]} and {run[1]}: "
                "rename one (train-student --name) or choose with --runs"
            )
        by_name.setdefault(name, run)
    if names is not None:
        missing = [n for n in names if n not in by_name]
        if missing:
            where = [*map(str, workdirs), *(["the --records"] if recorded else [])]
            sys.exit(f"no finished run called {', '.join(missing)} in {', '.join(where)}")
        runs = [by_name[n] for n in names]
    results = [
        src if isinstance(src, dict) else _with_temperature(json.loads(src.read_text()), src)
        for _, _, src in runs
    ]
    splits = list(results[0]["splits"])
    if metrics is None:
        metrics = [
            m for m in METRICS if all(m in r["splits"][s] for r in results for s in r["splits"])
        ]
    for (_, _, src), r in zip(runs, results):
        path = src if isinstance(src, pathlib.Path) else f"{r['name']} (--records)"
        for s in splits:
            missing = [m for m in metrics if m not in r["splits"].get(s, {})]
            if missing:
                sys.exit(
                    f"{path}: split {s!r} has no {', '.join(missing)} "
                    "(rerun train-student to rescore, or choose --metrics)"
                )
    columns = [(s, m) for s in splits for m in metrics]
    reference = None
    if baseline is not None:
        reference = next((r for r in results if r["name"] == baseline), None)
        if reference is None:
            sys.exit(
                f"--baseline {baseline!r} is not among the tabled runs "
                f"({', '.join(r['name'] for r in results)})"
            )

    def cell(r: dict, s: str, m: str) -> str:
        value = r["splits"][s][m]
        if reference is None or r is reference:
            return f"{value:.2f}"
        return f"{value:.2f} ({value - reference['splits'][s][m]:+.2f})"

    lines = [
        "| student | distillation | steps | checkpoint | "
        + " | ".join(f"{s} {METRICS[m]}" for s, m in columns)
        + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    records = []
    hardware, commit = f"{cpu_model()} ({platform.machine()}), CPU", git_commit()
    for r in results:
        lines.append(
            f"| {r['name']} | {distillation(r)} | {steps_cell(r)} | {r['checkpoint']} | "
            + " | ".join(cell(r, s, m) for s, m in columns)
            + " |"
        )
        for s, m in columns:
            records.append(
                {
                    "system": r["name"],
                    "kd": r["kd"],
                    "teacher": r.get("teacher"),
                    "seed": r.get("seed"),
                    "split": s,
                    "metric": m,
                    "value": r["splits"][s][m],
                    **(
                        {"signature": r["splits"][s].get("bleu_signature", "unknown")}
                        if m == "bleu"
                        else {}
                    ),
                    "checkpoint": r["checkpoint"],
                    "steps": r["steps"],
                    "trained_steps": r.get("trained_steps", r["steps"]),
                    "stopped_early": r.get("stopped_early"),
                    "patience": r.get("patience"),
                    "hardware": r["hardware"] if "recorded_in" in r else hardware,
                    "commit": r["commit"] if "recorded_in" in r else trained_commit(r, commit),
                }
            )
    table = "\n".join(lines)
    if reference is not None:
        table += f"\n\n(in brackets: the difference from {baseline})"
    if "bleu" in metrics:
        signature = results[0]["splits"][splits[0]].get("bleu_signature", "unknown")
        table += f"\n\nsacreBLEU signature: {signature}"
    sources: dict[tuple[str, str, str], list[str]] = {}
    for r in results:
        if "recorded_in" in r:
            key = (r["recorded_in"], r["commit"], r["hardware"])
            sources.setdefault(key, []).append(r["name"])
    for (path, run_commit, run_hardware), run_names in sources.items():
        table += (
            f"\n\nrecorded earlier (--records {path}, commit {run_commit}, {run_hardware}): "
            + ", ".join(run_names)
        )
    summary = seed_summary(records, columns, seed_stem(baseline) if reference else None)
    return table + ("\n\n" + summary if summary else ""), records


def steps_cell(r: dict) -> str:
    """How long a run trained: ``train.steps``, or the step where val stopped improving
    (``train.patience``) and the budget it stopped short of."""
    trained = r.get("trained_steps", r["steps"])
    if r.get("stopped_early"):
        return f"{trained} of {r['steps']} (val stopped improving, patience {r['patience']})"
    return str(trained)


def seed_stem(name: str) -> str:
    """The system a run belongs to: ``STEM`` for ``STEM`` and ``STEM-s<seed>``."""
    return re.sub(r"-s\d+$", "", name)


def seed_summary(
    records: list[dict], columns: list[tuple[str, str]], reference: str | None = None
) -> str:
    """Mean +- sample std over the seeds of every ``STEM[-s<seed>]`` group with >= 2 runs;
    with ``reference`` (a stem), every other group's mean also shows its difference."""
    groups: dict[str, dict[tuple[str, str], list[float]]] = {}
    for r in records:
        stem = seed_stem(r["system"])
        groups.setdefault(stem, {}).setdefault((r["split"], r["metric"]), []).append(r["value"])
    groups = {k: v for k, v in groups.items() if min(len(x) for x in v.values()) >= 2}
    if not groups:
        return ""
    lines = [
        "| system | seeds | "
        + " | ".join(f"{s} {METRICS[m]} (mean ± std)" for s, m in columns)
        + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for stem, by_column in groups.items():
        cells = []
        for c in columns:
            mean = statistics.mean(by_column[c])
            cell = f"{mean:.2f} ± {statistics.stdev(by_column[c]):.2f}"
            if reference in groups and stem != reference:
                cell += f" ({mean - statistics.mean(groups[reference][c]):+.2f})"
            cells.append(cell)
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


def distilled_steps(workdir: pathlib.Path) -> set[int]:
    """The teacher checkpoints the distilled students of ``workdir`` read (results.json's
    ``teacher.checkpoint_step``)."""
    steps = set()
    for path in (workdir / "students").glob("*/results.json"):
        teacher = json.loads(path.read_text()).get("teacher") or {}
        if teacher.get("checkpoint_step") is not None:
            steps.add(int(teacher["checkpoint_step"]))
    return steps


def trained_commit(result: dict, fallback: str) -> str:
    """The commit a run was trained with (results.json's ``code.commit``); ``fallback``
    (this checkout's) for runs that predate it or were not made from a git checkout."""
    return (result.get("code") or {}).get("commit") or fallback


def teacher_line(workdir: pathlib.Path) -> str | None:
    """The teacher's validation (masked accuracy, stride-masked soft-target quality) at the
    checkpoint the distilled students read (the last validation when they name none or
    several), beside the students' last validation accuracy: a teacher helps only when its
    stride top-1 is clearly above the baseline's accuracy. None without a teacher run."""
    valid = [
        r for r in read_jsonl(workdir / "teacher" / "metrics.jsonl") if r.get("split") == "valid"
    ]
    if not valid:
        return None
    used = distilled_steps(workdir)
    at = [r for r in valid if len(used) == 1 and r["step"] in used]
    last = at[-1] if at else valid[-1]
    parts = [
        f"teacher at step {last['step']}"
        + (" (the distilled students' soft targets)" if at else "")
        + f": masked accuracy {100 * last.get('masked_accuracy', float('nan')):.1f}%"
    ]
    if "stride_top1" in last:
        parts.append(
            f"val stride top-1 {100 * last['stride_top1']:.1f}%, top-K "
            f"{100 * last['stride_topk']:.1f}%"
        )
    for run in sorted((workdir / "students").glob("*/metrics.jsonl")):
        accuracy = [
            r["accuracy"] for r in read_jsonl(run) if r.get("split") == "valid" and "accuracy" in r
        ]
        if accuracy:
            parts.append(f"{run.parent.name} val accuracy {100 * accuracy[-1]:.1f}%")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", type=pathlib.Path, nargs="*")
    parser.add_argument(
        "--records",
        type=pathlib.Path,
        action="append",
        default=[],
        help="a JSON file of records (--json) whose runs join the table; repeatable",
    )
    parser.add_argument(
        "--records-runs",
        default=None,
        help="comma-separated: take only these runs from every --records file",
    )
    parser.add_argument(
        "--runs",
        default=None,
        help="comma-separated run names to table, in this order (default: all)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="a run name: also show every score's difference from that run's",
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the records as JSON")
    parser.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated, from {', '.join(METRICS)} (default: BLEU, and "
        "ROUGE when every run has it)",
    )
    args = parser.parse_args()
    metrics = None
    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            parser.error(
                f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}"
            )
    names = [n.strip() for n in args.runs.split(",") if n.strip()] if args.runs else None
    if not args.workdir and not args.records:
        parser.error("give a work directory or --records")
    only = None
    if args.records_runs:
        only = [n.strip() for n in args.records_runs.split(",") if n.strip()]
    recorded = [run for path in args.records for run in load_records(path, only)]
    table, records = results_table(args.workdir, metrics, names, args.baseline, recorded)
    print(table)
    teacher = teacher_line(args.workdir[0]) if args.workdir else None
    if teacher:
        print(teacher)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
    out = plot(args.workdir[0]) if args.workdir else None
    if out:
        print(f"training curves: {out}")


if __name__ == "__main__":
    main()
