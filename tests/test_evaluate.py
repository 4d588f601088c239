"""BLEU / ROUGE wrappers and the `distill-jax evaluate` command."""

import collections
import math
import subprocess
import sys

import pytest

from distill_jax import metrics


def _ngrams(tokens, n):
    return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _reference_bleu(hyps, refs):
    """Textbook corpus BLEU-4 (no smoothing needed: every precision is non-zero here)."""
    matches, totals, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, ref in zip(hyps, refs):
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_precision)


def test_bleu_matches_textbook_formula():
    # Already tokenized the way 13a would (spaces around punctuation), so tokenization is neutral.
    hyps = ["a man is riding a red bike down the street .", "two dogs play in the green grass"]
    refs = ["a man rides a red bike down the street .", "two dogs are playing in the grass"]
    got = metrics.bleu(hyps, refs)
    assert got["bleu"] == pytest.approx(_reference_bleu(hyps, refs), abs=1e-6)
    assert "tok:13a" in got["signature"] and "case:mixed" in got["signature"]
    assert metrics.bleu(refs, refs)["bleu"] == pytest.approx(100.0)


def test_bleu_lowercase_option():
    hyps, refs = ["A Man Runs ."], ["a man runs ."]
    assert metrics.bleu(hyps, refs, lowercase=True)["bleu"] == pytest.approx(100.0)
    assert metrics.bleu(hyps, refs)["bleu"] < 100.0
    assert "case:lc" in metrics.bleu(hyps, refs, lowercase=True)["signature"]


def test_rouge_unigram_f_measure():
    # No word here changes under stemming, so ROUGE-1 is plain unigram overlap.
    hyp, ref = "police arrest man in city", "police arrest two man in old city"
    overlap = 5
    precision, recall = overlap / 5, overlap / 7
    scores = metrics.rouge([hyp], [ref])
    assert scores["rouge1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert metrics.rouge([ref], [ref])["rougeL"] == pytest.approx(100.0)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.bleu(["a", "b"], ["a"])


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "distill_jax.cli", "evaluate", *args], capture_output=True, text=True
    )


def test_cli_reports_line_count_mismatch(tmp_path):
    (tmp_path / "hyp.txt").write_text("a b c\nd e\n")
    (tmp_path / "ref.txt").write_text("a b c\n")
    result = _cli("--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref.txt"))
    assert result.returncode == 2
    assert "hyp.txt has 2 lines" in result.stderr and "ref.txt has 1" in result.stderr


def test_cli_reports_invalid_utf8_with_line(tmp_path):
    (tmp_path / "hyp.txt").write_bytes(b"fine\nbad \xff byte\n")
    (tmp_path / "ref.txt").write_text("fine\nalso fine\n")
    result = _cli("--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref.txt"))
    assert result.returncode == 2
    assert "hyp.txt, line 2: invalid UTF-8" in result.stderr


def test_cli_prints_scores(tmp_path):
    (tmp_path / "hyp.txt").write_text("the cat sat on the mat\n")
    (tmp_path / "ref.txt").write_text("the cat sat on the mat\n")
    result = _cli(
        "--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref.txt"), "--metric", "all"
    )
    assert result.returncode == 0, result.stderr
    assert "BLEU = 100.00" in result.stdout and "ROUGE-L = 100.00" in result.stdout
