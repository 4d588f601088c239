"""``distill-jax evaluate``: score generated text against references (sacreBLEU,
ROUGE-1/2/L)."""

from __future__ import annotations

import argparse
import json
import sys

from distill_jax.errors import UserError
from distill_jax.metrics import bleu, read_lines, rouge


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hyp", required=True, help="generated text, one sentence per line")
    parser.add_argument("--ref", required=True, help="references, line-aligned with --hyp")
    parser.add_argument("--metric", choices=("bleu", "rouge", "all"), default="bleu")
    parser.add_argument("--lowercase", action="store_true",
                        help="case-insensitive BLEU (the paper's reference lowercases)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        hypotheses = read_lines(args.hyp)
        references = read_lines(args.ref)
        if len(hypotheses) != len(references):
            raise ValueError(
                f"{args.hyp} has {len(hypotheses)} lines but {args.ref} has {len(references)}")
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None
    result: dict = {}
    if args.metric in ("bleu", "all"):
        result.update(bleu(hypotheses, references, lowercase=args.lowercase))
    if args.metric in ("rouge", "all"):
        result.update(rouge(hypotheses, references))
    if args.json:
        print(json.dumps(result))
    else:
        if "bleu" in result:
            print(f"BLEU = {result['bleu']:.2f}  ({result['signature']})")
        for name, label in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
            if name in result:
                print(f"{label} = {result[name]:.2f}")
    sys.stdout.flush()
    return 0
