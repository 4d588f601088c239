"""``distill-jax soft-targets``: run the fine-tuned teacher over a split with stride
masking and write its top-K logits and ids into the soft-target cache
(``WORKDIR/soft_targets/SPLIT``, local or ``gs://``): argument parsing around
``api.extract_soft_targets``. How the cache is filled, resumed and tied to the teacher's
checkpoint (``--teacher-step N`` picks one; the default is the best of a finished run):
``distill_jax/extraction.py``.
"""

from __future__ import annotations

import argparse

from distill_jax import api
from distill_jax.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from distill_jax.soft_target_cache import DEFAULT_CHUNK_ROWS

    common.add_common_arguments(parser)
    parser.add_argument("--split", default=None, help="split to score (default: data.train_split)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="recompute: remove the cache of this split (finished or not) first",
    )
    parser.add_argument(
        "--teacher-step",
        type=int,
        default=None,
        metavar="N",
        help="take the soft targets from the teacher checkpoint of step N (it "
        "must be saved), even if the teacher run has not finished; by "
        "default the best checkpoint of a finished run (one that saved "
        "step teacher.steps), and an unfinished run is refused",
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        help="target positions per stored chunk (the unit of writing and of "
        "resuming; an unfinished cache keeps its own)",
    )


def run(args: argparse.Namespace) -> int:
    common.initialize_processes(args)
    api.extract_soft_targets(
        common.load_experiment(args),
        args.workdir,
        split=args.split,
        force=args.force,
        teacher_step=args.teacher_step,
        chunk_rows=args.chunk_rows,
        no_progress=args.no_progress,
    )
    return 0
