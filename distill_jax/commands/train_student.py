"""``distill-jax train-student``: the Transformer student with ``--set distill.kd=none``
(baseline), ``offline`` (soft-target cache) or ``online`` (teacher inside the step).

Validation reports loss / accuracy, BLEU and ROUGE on the validation split; the best
checkpoint by ``train.select_metric`` (BLEU unless configured) is kept. At the end the best
(or averaged) parameters translate the validation and test splits into
``WORKDIR/students/NAME/SPLIT.hyp.txt`` and their scores go to ``results.json``.
"""

from __future__ import annotations

import argparse

from distill_jax import api, observe
from distill_jax.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    parser.add_argument(
        "--name",
        default=None,
        help="run name under WORKDIR/students (default: baseline / distilled / "
        "distilled-online from distill.kd)",
    )
    observe.add_profile_argument(parser)
    parser.add_argument(
        "--teacher-step",
        type=int,
        default=None,
        metavar="N",
        help="distil from the teacher checkpoint of step N (it must be saved) "
        "instead of the best one of the finished teacher run; with "
        "distill.kd=offline the soft-target cache must come from it",
    )


def run(args: argparse.Namespace) -> int:
    common.initialize_processes(args)
    api.train_student(
        common.load_experiment(args),
        args.workdir,
        name=args.name,
        teacher_step=args.teacher_step,
        no_progress=args.no_progress,
        profile_steps=args.profile_steps,
    )
    return 0
