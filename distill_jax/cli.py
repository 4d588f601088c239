"""The ``distill-jax`` command.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``distill-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module, one-line help)
SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("prepare", "distill_jax.data.prepare",
     "build a dataset (TFDS, array_record) and the student vocabulary"),
)


class UserError(Exception):
    """An error caused by the user's input: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-jax",
        description="Distil a C-MLM fine-tuned BERT into a Transformer seq2seq student.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        # Arguments are added lazily (see main) so --help of one command imports only it.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # First pass: find the subcommand, then let its module add its own arguments.
    known, _ = parser.parse_known_args(argv) if argv and argv[0] not in ("-h", "--help") \
        else (parser.parse_args(argv), None)
    module = importlib.import_module(known._module)
    sub_parser = next(
        action.choices[known.command] for action in parser._subparsers._group_actions
        if isinstance(action, argparse._SubParsersAction))
    module.add_arguments(sub_parser)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"distill-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
