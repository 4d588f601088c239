"""Corpus-level scores for generated text: detokenized sacreBLEU and ROUGE-1/2/L.

BLEU is sacreBLEU on detokenized text (its own 13a tokenization), reported with its
signature so the number is reproducible. The paper's reference scored lowercased,
tokenized BLEU; ``lowercase=True`` gives the case-insensitive variant (the signature then
says ``case:lc``). ROUGE is Google's ``rouge-score`` (F-measure, Porter stemmer), the
usual choice for Gigaword / CNN-DailyMail headline and summary generation.

Also the ``distill-jax evaluate`` subcommand: ``--hyp FILE --ref FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from distill_jax.errors import UserError


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: "
            "they must be line-aligned")


def bleu(hypotheses: Sequence[str], references: Sequence[str], *, lowercase: bool = False) -> dict:
    """Detokenized corpus BLEU with one reference per sentence.

    Returns ``{"bleu": score, "signature": str, "precisions": [4 floats], "bp": float,
    "sys_len": int, "ref_len": int}``.
    """
    from sacrebleu.metrics import BLEU

    _check_lengths(hypotheses, references)
    metric = BLEU(lowercase=lowercase)
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": float(result.score),
        "signature": str(metric.get_signature()),
        "precisions": [float(p) for p in result.precisions],
        "bp": float(result.bp),
        "sys_len": int(result.sys_len),
        "ref_len": int(result.ref_len),
    }


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F-measures (×100) over sentences, with stemming."""
    from rouge_score import rouge_scorer

    _check_lengths(hypotheses, references)
    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for name in names:
            totals[name] += scores[name].fmeasure
    count = max(len(hypotheses), 1)
    return {name: 100.0 * total / count for name, total in totals.items()}


def read_lines(path: str) -> list[str]:
    """Reads a UTF-8 text file into lines without their line endings.

    Raises ValueError naming the file and the 1-based line of the first invalid byte.
    """
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: invalid UTF-8 at byte {err.start} of the line") from None
    return out


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
