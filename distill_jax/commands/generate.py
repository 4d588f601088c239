"""``distill-jax generate``: translate / summarize text with a trained student.

Lines on stdin are translated as they arrive (``translate.translate_stream``: length-bucketed
micro-batches, each written and flushed when decoded), so ``generate`` works as a filter in
a pipe or interactively; a file (``--input``) is read whole. Both give the same outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from distill_jax import api, runner, storage
from distill_jax.commands import common
from distill_jax.errors import UserError
from distill_jax.experiment import DecodeConfig
from distill_jax.metrics import read_lines
from distill_jax.translate import STREAM_WAIT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_trained_student_arguments(parser)
    parser.add_argument(
        "--input",
        default="-",
        help="source sentences, one per line (- = stdin, translated as lines arrive)",
    )
    parser.add_argument(
        "--output",
        default="-",
        help="where to write outputs: a local path or gs://... (- = stdout)",
    )
    parser.add_argument(
        "--nbest",
        type=int,
        default=None,
        metavar="N",
        help="write the N best hypotheses of each source (N <= "
        "decode.beam_size; N > 1 needs beam search), one per line as "
        "INDEX<TAB>SCORE<TAB>TEXT, best first: INDEX the source's 0-based "
        "line number, SCORE the beam score (summed log-probs / GNMT "
        "length penalty; greedy and sampling: summed log-probs); "
        "docs/interfaces.md",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="nucleus sampling (sets decode.method=sample): sample each token "
        "from the fewest most probable ones whose probability reaches P, "
        "0 < P <= 1; combines with --set decode.temperature=T and "
        "decode.top_k=K",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed (source i samples with the seed folded with i)",
    )
    parser.add_argument(
        "--stream-wait",
        type=float,
        default=STREAM_WAIT,
        metavar="SECONDS",
        help="stdin: translate the lines that arrived once no new line came "
        f"for this long (default {STREAM_WAIT})",
    )


def decode_options(args: argparse.Namespace, decode: DecodeConfig) -> DecodeConfig:
    """``decode`` with ``--top-p``'s sampling; raises UserError (naming the flag) for
    --nbest, --top-p and --stream-wait values the settings cannot take."""
    if args.top_p is not None:
        if not 0.0 < args.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
        decode = dataclasses.replace(decode, method="sample")
    if args.nbest is not None:
        if args.nbest < 1:
            raise UserError(f"--nbest must be >= 1, got {args.nbest}")
        if args.nbest > 1 and decode.method != "beam":
            why = (
                "--top-p samples" if args.top_p is not None else f"decode.method is {decode.method}"
            )
            raise UserError(
                f"--nbest {args.nbest} needs beam search ({why}, which gives one "
                f"hypothesis per source)"
            )
        if decode.method == "beam" and args.nbest > decode.beam_size:
            raise UserError(
                f"--nbest {args.nbest} is larger than the beam (decode.beam_size "
                f"{decode.beam_size}); widen it with --set "
                f"decode.beam_size={args.nbest}"
            )
    if not args.stream_wait > 0:
        raise UserError(f"--stream-wait must be > 0 seconds, got {args.stream_wait}")
    return decode


def format_outputs(outputs: list, first_index: int, nbest: bool) -> str:
    """Output lines: one text per source, or with ``nbest`` one INDEX<TAB>SCORE<TAB>TEXT line
    per hypothesis (sources numbered from ``first_index``)."""
    if not nbest:
        return "".join(line + "\n" for line in outputs)
    return "".join(
        f"{first_index + i}\t{t.score:.4f}\t{t.text}\n"
        for i, hyps in enumerate(outputs)
        for t in hyps
    )


def _stdin_lines():
    """stdin's lines as they arrive (a UTF-8 error names the line)."""
    number = 0
    try:
        for number, line in enumerate(iter(sys.stdin.readline, ""), start=1):  # noqa: B007 (the except names it)
            yield line
    except UnicodeDecodeError as err:
        raise UserError(
            f"stdin, line {number + 1}: cannot decode the text ({err.reason})"
        ) from None


def run(args: argparse.Namespace) -> int:
    common.initialize_processes(args)
    config = common.load_experiment(args)
    config = dataclasses.replace(config, decode=decode_options(args, config.decode))
    student = api.Student.load(config, args.workdir, args.name, args.checkpoint)
    options = dict(seed=args.seed, nbest=args.nbest, top_p=args.top_p or 1.0)
    nbest = args.nbest is not None
    if args.input == "-" and _single_process():
        pieces = []
        written = 0
        for outputs in student.translate_stream(_stdin_lines(), wait=args.stream_wait, **options):
            text = format_outputs(outputs, written, nbest)
            written += len(outputs)
            if args.output == "-":
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                pieces.append(text)
        if args.output != "-":
            storage.write_text_atomic(args.output, "".join(pieces))
        return 0
    try:
        texts = list(_stdin_lines()) if args.input == "-" else read_lines(args.input)
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None
    texts = [t.rstrip("\r\n") for t in texts]
    outputs = student.translate(
        texts, progress=not args.no_progress and args.output != "-", **options
    )
    if not runner.is_chief():
        return 0
    text = format_outputs(outputs, 0, nbest)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        storage.write_text_atomic(args.output, text)
    return 0


def _single_process() -> bool:
    import jax

    return jax.process_count() == 1
