"""``distill-jax generate``: translate / summarize text with a trained student."""

from __future__ import annotations

import argparse
import sys
from distill_jax import runner, storage, student
from distill_jax.commands import common
from distill_jax.errors import UserError
from distill_jax.metrics import read_lines
from distill_jax.translate import translate_texts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_trained_student_arguments(parser)
    parser.add_argument("--input", default="-", help="source sentences, one per line (- = stdin)")
    parser.add_argument("--output", default="-",
                        help="where to write outputs: a local path or gs://... (- = stdout)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def run(args: argparse.Namespace) -> int:
    from distill_jax import sharding

    common.initialize_processes(args)
    config = common.load_experiment(args)
    workdir = common.workdir(args)
    name = args.name or student.default_name(config)
    mesh = sharding.make_mesh(config.mesh)
    model, params, vocab = student.load_trained(config, workdir, name, args.checkpoint, mesh)
    try:
        texts = sys.stdin.read().splitlines() if args.input == "-" else read_lines(args.input)
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None
    outputs = translate_texts(model, params, vocab, texts, config.decode, mesh, seed=args.seed,
                              progress=not args.no_progress and args.output != "-")
    if not runner.is_chief():
        return 0
    text = "".join(line + "\n" for line in outputs)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        storage.write_text_atomic(args.output, text)
    return 0
