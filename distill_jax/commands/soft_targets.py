"""``distill-jax soft-targets``: run the fine-tuned teacher over a split with stride
masking and write its top-K logits and ids into the soft-target cache
(``WORKDIR/soft_targets/SPLIT``, local or ``gs://``, see ``soft_target_cache``;
``api.extract_soft_targets``, ``distill_jax/extraction.py``).

The cache is filled chunk by chunk. Every process takes part in every batch (each scores
its own rows of the global batch); the rows of a chunk are gathered on every process and
the chunk's owner (chunks are dealt round-robin over the processes) writes it, so each
stored object has one writer. Each chunk's batches are planned from that chunk's examples
alone, so a chunk's values do not depend on which chunks were computed before it: an
interrupted extraction resumes with the chunks that are not stored yet and ends with the
cache an uninterrupted one writes. ``header.json`` is written last, by process 0.

The targets come from the best checkpoint of a *finished* teacher run (an unfinished one
is refused), or from the checkpoint ``--teacher-step N`` names; its step and digest are
part of the cache's identity, so a finished cache made from another checkpoint is remade,
not reused (``teacher.select_finetuned``, docs/interfaces.md).
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
