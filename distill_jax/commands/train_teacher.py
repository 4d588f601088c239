"""``distill-jax train-teacher``: fine-tune BERT as a conditional masked language model
(C-MLM) over the student vocabulary; validation reports masked-token loss and accuracy, and
the soft targets' quality with stride masking (``teacher_quality``: top-1, top-K, p(ref))
on the first ``teacher.quality_examples`` validation pairs."""

from __future__ import annotations

import argparse

from distill_jax import api, observe
from distill_jax.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    observe.add_profile_argument(parser)


def run(args: argparse.Namespace) -> int:
    common.initialize_processes(args)
    api.train_teacher(
        common.load_experiment(args),
        args.workdir,
        no_progress=args.no_progress,
        profile_steps=args.profile_steps,
    )
    return 0
