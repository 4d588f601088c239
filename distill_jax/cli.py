"""The ``distill-jax`` command.

Each subcommand lives in its own module under ``distill_jax/commands``, which provides ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``distill-jax --help`` stays fast.

``--verbosity`` (before or after the subcommand) sets which status messages are logged to
standard error (``distill_jax/logs.py``); results stay on standard output.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from distill_jax import logs
from distill_jax.errors import UserError

# (subcommand, module, one-line help)
SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    (
        "prepare",
        "distill_jax.commands.prepare",
        "build a dataset (TFDS, array_record) and the student vocabulary",
    ),
    (
        "train-teacher",
        "distill_jax.commands.train_teacher",
        "fine-tune BERT as a conditional masked language model (C-MLM) over the student vocabulary",
    ),
    (
        "soft-targets",
        "distill_jax.commands.soft_targets",
        "write the fine-tuned teacher's top-K soft targets of a split into its cache (local, gs://)",
    ),
    (
        "train-student",
        "distill_jax.commands.train_student",
        "train the Transformer student: distill.kd=none (baseline), offline or online",
    ),
    (
        "generate",
        "distill_jax.commands.generate",
        "translate / summarize text with a trained student (beam search, greedy, sampling)",
    ),
    (
        "evaluate",
        "distill_jax.commands.evaluate",
        "score generated text against references: sacreBLEU, ROUGE-1/2/L",
    ),
    (
        "export",
        "distill_jax.commands.export",
        "export a trained student to transformers (Marian, M2M100) and CTranslate2",
    ),
)


def _add_verbosity(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--verbosity``; on a subcommand its default is suppressed, so that a value given
    before the subcommand is not overwritten."""
    parser.add_argument(
        "--verbosity",
        type=str.lower,
        choices=list(logs.VERBOSITIES),
        default=argparse.SUPPRESS if default is None else default,
        help="which status messages are logged to standard error (default: info)",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="distill-jax",
        description="Distil a C-MLM fine-tuned BERT into a Transformer seq2seq student.",
    )
    _add_verbosity(parser, "info")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        _add_verbosity(sub_parser, None)
        sub_parser.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = {name for name, _, _ in SUBCOMMANDS}
    command = next((arg for arg in argv if arg in names), None)
    args = build_parser(command).parse_args(argv)
    with logs.configured(args.verbosity):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # Before any JAX computation: keep freed host memory for reuse (distill_jax.runtime).
    from distill_jax import runtime

    try:
        runtime.configure_host()
    except ValueError as err:
        print(f"distill-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    from distill_jax import runlock

    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"distill-jax {args.command}: error: {err}", file=sys.stderr)
        _exit_if_multiprocess(2)
        return 2
    except Exception:
        # In a multi-process run a normal exit would wait in jax.distributed's shutdown
        # barrier while the other processes wait in a collective: fail fast instead, so
        # the launcher (or the cluster) sees the failure and stops the job.
        traceback.print_exc()
        _exit_if_multiprocess(1)
        raise
    finally:
        runlock.release_all()  # the run directory's lock (distill_jax/runlock.py)


def _exit_if_multiprocess(status: int) -> None:
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        from distill_jax import runlock

        runlock.release_all()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
