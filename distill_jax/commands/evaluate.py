"""``distill-jax evaluate``: score generated text against references: detokenized sacreBLEU,
tokenized BLEU (Moses-tokenized, lowercased unless --tok-cased: the paper's reference's
score) and ROUGE-1/2/L."""

from __future__ import annotations

import argparse
import json
import sys

from distill_jax import api
from distill_jax.errors import UserError
from distill_jax.metrics import read_lines

METRICS = ("bleu", "bleu_tok", "rouge", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hyp", required=True, help="generated text, one sentence per line")
    parser.add_argument("--ref", required=True, help="references, line-aligned with --hyp")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="bleu",
        help="bleu: detokenized sacreBLEU; bleu_tok: tokenized lowercased BLEU "
        "(multi-bleu style, what the paper reports); all: both and ROUGE",
    )
    parser.add_argument(
        "--lowercase",
        action="store_true",
        help="case-insensitive detokenized BLEU (tokenized BLEU is, unless --tok-cased)",
    )
    parser.add_argument(
        "--tok-cased",
        action="store_true",
        help="case-sensitive tokenized BLEU (multi-bleu.perl without -lc), for "
        "references stored cased, e.g. a prepared iwslt15_en_vi split",
    )
    parser.add_argument(
        "--lang",
        default="en",
        help="target language of the Moses tokenizer for tokenized BLEU (e.g. "
        "vi: English non-breaking prefixes, apostrophes split)",
    )
    parser.add_argument(
        "--ref-tokenized",
        action="store_true",
        help="the references are Moses-tokenized already (e.g. fairseq's IWSLT14 "
        "files, or a prepared iwslt14_de_en split): tokenized BLEU uses "
        "them as they are",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        hypotheses = read_lines(args.hyp)
        references = read_lines(args.ref)
        if len(hypotheses) != len(references):
            raise ValueError(
                f"{args.hyp} has {len(hypotheses)} lines but {args.ref} has {len(references)}"
            )
        if not hypotheses:
            raise ValueError(f"{args.hyp} and {args.ref} are empty: no sentence to score")
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None
    result = api.score(
        hypotheses,
        references,
        metric=args.metric,
        lowercase=args.lowercase,
        tok_cased=args.tok_cased,
        lang=args.lang,
        references_tokenized=args.ref_tokenized,
    )
    if args.json:
        print(json.dumps(result))
    else:
        if "bleu" in result:
            print(f"BLEU = {result['bleu']:.2f}  (detokenized sacreBLEU, {result['signature']})")
        if "bleu_tok" in result:
            case = "cased" if args.tok_cased else "lowercased"
            print(
                f"tokenized BLEU = {result['bleu_tok']:.2f}  (Moses-tokenized, {case}, "
                f"multi-bleu style, {result['bleu_tok_signature']})"
            )
        for name, label in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
            if name in result:
                print(f"{label} = {result[name]:.2f}")
    sys.stdout.flush()
    return 0
