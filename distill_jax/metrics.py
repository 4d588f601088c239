"""Corpus-level scores for generated text: detokenized sacreBLEU and ROUGE-1/2/L.

BLEU is sacreBLEU on detokenized text (its own 13a tokenization), reported with its
signature so the number is reproducible. The paper's reference scored lowercased,
tokenized BLEU; ``lowercase=True`` gives the case-insensitive variant (the signature then
says ``case:lc``). ROUGE is Google's ``rouge-score`` (F-measure, Porter stemmer), the
usual choice for Gigaword / CNN-DailyMail headline and summary generation.
"""

from __future__ import annotations

from typing import Sequence


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
