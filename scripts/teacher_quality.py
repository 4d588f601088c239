"""How good a teacher's soft targets are, next to the students that learn from them.

On a split whose soft targets are cached (``distill-jax soft-targets --split SPLIT``, the
same stride masking the training targets get), over every target position (``</s>``
included):

* top-1: the share of positions where the teacher's most likely piece is the reference;
* top-K: the share where the reference is among the K kept pieces;
* p(ref): the mean probability the paper's soft target (softmax of the K logits / T)
  gives the reference (0 where it is not among the K).

Beside them, each named student's last validation accuracy (teacher-forced next-token
accuracy from its ``metrics.jsonl``): a teacher whose top-1 is below the student's own
accuracy mostly teaches it its mistakes.

  distill-jax soft-targets --config C --workdir W --split val [--set ...]
  python scripts/teacher_quality.py --config C --workdir W --split val [--set ...] \
      [--students baseline,distilled] [--temperatures 1,2,5] [--json PATH]

``--temperatures`` adds p(ref) at other temperatures: how flat the kept K pieces become at
the configured T is what decides whether the distillation term sharpens or blurs the
student.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from distill_jax import runner, storage
from distill_jax import teacher_quality as quality
from distill_jax.commands import common
from distill_jax.data.prepared import open_prepared
from distill_jax.data.vocab import EOS
from distill_jax.errors import UserError

from provenance import cpu_model, git_commit  # noqa: E402


def agreement(
    logits: list[np.ndarray],
    indices: list[np.ndarray],
    references: list[list[int]],
    temperature: float,
) -> dict:
    """Top-1 accuracy, top-K recall and mean soft-target probability of the references
    (``distill_jax.teacher_quality.agreement_sums`` over every example).

    ``logits[i]`` / ``indices[i]``: ``[T_i, K]`` (sorted decreasing) for example i;
    ``references[i]``: its ``T_i`` reference ids."""
    total = None
    for values, ids, ref in zip(logits, indices, references):
        ref = np.asarray(ref)
        if ids.shape[0] != ref.shape[0]:
            raise ValueError(
                f"soft targets of {ids.shape[0]} positions for a reference of {ref.shape[0]}"
            )
        total = quality.add_sums(
            total,
            quality.agreement_sums(
                np.asarray(values, np.float64)[None], np.asarray(ids)[None], ref[None], temperature
            ),
        )
    figures = quality.rates(total or {"positions": 0, "top1": 0, "topk": 0, "p_ref": 0})
    return {
        "positions": int(total["positions"]) if total else 0,
        "top1": figures["stride_top1"],
        "topk": figures["stride_topk"],
        "p_ref": figures["stride_p_ref"],
    }


def student_accuracy(workdir, name: str) -> float | None:
    """The last validation accuracy in a student run's metrics.jsonl (None if it has none)."""
    path = storage.path(workdir) / "students" / name / "metrics.jsonl"
    if not path.exists():
        return None
    valid = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    valid = [r for r in valid if r.get("split") == "valid" and "accuracy" in r]
    return float(valid[-1]["accuracy"]) if valid else None


def main(argv=None) -> int:
    from distill_jax import student
    from distill_jax.soft_target_cache import CacheError, open_cache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    common.add_overrides_argument(parser, help="the overrides the teacher was made with")
    parser.add_argument("--split", default=None, help="cached split (default: data.valid_split)")
    parser.add_argument("--students", default="", help="comma-separated student run names")
    parser.add_argument(
        "--temperatures",
        default="",
        help="comma-separated temperatures to report p(ref) at as well",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        try:
            temperatures = [float(t) for t in filter(None, args.temperatures.split(","))]
        except ValueError:
            raise UserError(
                f"--temperatures: not a comma-separated list of numbers: {args.temperatures!r}"
            ) from None
        if any(not t > 0 for t in temperatures):
            raise UserError(
                f"--temperatures: every temperature must be > 0, got {args.temperatures!r}"
            )
        config = common.load_experiment(args)
        split = args.split or config.data.valid_split
        dataset = open_prepared(runner.prepared_dir(config, args.workdir))
        records, lengths = dataset.records(split, config.data.example_limit(split))
        try:
            cache = open_cache(
                storage.path(args.workdir) / "soft_targets" / split,
                student.cache_identity(config, dataset, split, config.teacher.top_k),
                num_examples=len(lengths),
            )
        except CacheError as err:
            raise UserError(
                f"{err} (run `distill-jax soft-targets --split {split}` first)"
            ) from None
        examples = list(range(len(lengths)))
        logits, indices = cache.read_async(examples).result()
        references = [[int(t) for t in r["tgt"]] + [EOS] for r in records.__getitems__(examples)]
        figures = agreement(logits, indices, references, config.distill.temperature)
        others = {
            f"{t:g}": agreement(logits, indices, references, t)["p_ref"] for t in temperatures
        }
    except UserError as err:
        print(f"teacher_quality: {err}", file=sys.stderr)
        return 2
    step = cache.header.get("teacher_step")  # the checkpoint the soft targets come from
    figures.update(
        split=split,
        top_k=cache.top_k,
        temperature=config.distill.temperature,
        teacher_steps=config.teacher.steps,
        teacher_step=step,
    )
    made_by = (
        f"step {step} of a {config.teacher.steps}-step run"
        if step is not None
        else f"{config.teacher.steps} steps"
    )
    print(
        f"teacher ({made_by}) on {split}, {figures['positions']} target "
        f"positions, stride-{config.teacher.stride} masking: top-1 {100 * figures['top1']:.1f}%, "
        f"top-{cache.top_k} {100 * figures['topk']:.1f}%, mean soft-target probability of the "
        f"reference (T {config.distill.temperature:g}) {figures['p_ref']:.3f}"
    )
    for t, p in others.items():
        print(f"  at T {t}: {p:.3f}")
    students = {}
    for name in filter(None, args.students.split(",")):
        students[name] = student_accuracy(args.workdir, name)
        shown = "no validation record" if students[name] is None else f"{100 * students[name]:.1f}%"
        print(f"student {name}: validation accuracy {shown}")
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps(
                {
                    **figures,
                    "p_ref_at": others,
                    "students": students,
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
