"""Corpus-level scores for generated text: detokenized sacreBLEU, tokenized BLEU and
ROUGE-1/2/L.

``bleu`` is sacreBLEU on detokenized text (its own 13a tokenization), reported with its
signature so the number is reproducible; ``lowercase=True`` gives the case-insensitive
variant (the signature then says ``case:lc``).

``tokenized_bleu`` is what the paper's reference reports (``multi-bleu.perl`` on
Moses-tokenized text, lowercased as fairseq's IWSLT14 data is): hypotheses and references
are Moses-tokenized and lowercased, then scored by sacreBLEU with ``tokenize="none"``;
``lowercase=False`` keeps case (``multi-bleu.perl`` without ``-lc``, the reference's own
call), the score of corpora stored cased, such as the Stanford IWSLT15 En-Vi files. The
student writes WordPiece pieces, which carry no word boundaries (BERT splits ``it's`` into
``it ' s`` and ``well-known`` into ``well - known``), so ``moses_tokens`` rebuilds the
tokens Moses keeps whole (``'s``, ``n't``-style clitics, intra-word hyphens, ``--``,
``1,000`` / ``2.5``) before scoring; the reference instead marks in-word pieces in its
vocabulary. The two BLEUs are different numbers: always say which one a figure is.

ROUGE is Google's ``rouge-score`` (F-measure, Porter stemmer), the usual choice for
Gigaword / CNN-DailyMail headline and summary generation.

``detokenize_words`` turns the student's words (WordPiece pieces with their ``##``
continuations glued: every punctuation mark a word of its own) into text as people write
it; ``Vocabulary.decode`` and so ``generate`` and every scored hypothesis go through it.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Sequence

# Tokens Moses keeps whole that the student's WordPiece output splits (see moses_tokens).
_CLITIC = re.compile(r"(?<=\w) ' (s|t|re|ve|ll|d|m)\b", re.IGNORECASE)
_INNER_HYPHEN = re.compile(r"(?<=\w) - (?=\w)")
_DOUBLE_DASH = re.compile(r"(?<!\S)- -(?!\S)")
_THOUSANDS = re.compile(r"(?<=\d) , (?=\d{3}\b)")
_DECIMAL = re.compile(r"(?<=\d) \. (?=\d)")
# More that detokenize_words glues (the text it writes is Moses-tokenized the same way).
_TRUNCATED = re.compile(  # "sport- und", "gitarre-, banjo-" (not "black - and - white")
    r"(?<=\w) - (?=(?:and|or|und|oder|bis|sowie) (?!-)|[,;])"
)
_LEADING_HYPHEN = re.compile(r"(?<!- )(?<!\S)(and|or|und|oder) - (?=\w)")  # "und -handschuhe"
_QUOTE_HYPHEN = re.compile(r"(?<=“) - (?=\w)")  # German „open“-anzeige
_CURLY_CLITIC = re.compile(r" ([’‘]) (s|t|re|ve|ll|d|m)\b", re.IGNORECASE)  # "joe‘s"
_LETTER_AMP = re.compile(r"(?<![^\s-])(\w) & (\w)(?![^\s-])")  # "a&m", "q&a"
_ENTITY = re.compile(r"(?<!\S)& (amp|lt|gt|quot|apos|#\d+) ;(?!\S)")  # "&amp;" split up
_HASH_NUMBER = re.compile(r"(?<!\S)# (?=\d)")  # "#8"
_CLOCK = re.compile(r"(?<=\d) : (?=\d\d\b)")  # "10:30"
_SLASH = re.compile(r"(?<=\w) / (?=\w)")  # "and/or", "24/7"
_ACRONYM = re.compile(r"(?<!\S)\w \.(?: \w \.)+(?!\S)")  # "u.s.", "e.g."
_DOMAIN = re.compile(r"(?<=\w) \. (?=(?:com|org|net|edu|gov)\b)")  # "example.com"
# Placeholders for single quotes whose side detokenize_words decided (private-use chars).
_QUOTE_OPEN, _QUOTE_CLOSE, _QUOTE_INNER = "\ue000", "\ue001", "\ue002"
_WORD = re.compile(r"\w+")


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: "
            "they must be line-aligned"
        )


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


@functools.cache
def _moses(lang: str):
    """(tokenizer, detokenizer) of sacremoses for ``lang``."""
    try:
        from sacremoses import MosesDetokenizer, MosesTokenizer
    except ImportError:
        raise ImportError("tokenized BLEU needs sacremoses (pip install sacremoses)") from None
    return MosesTokenizer(lang=lang), MosesDetokenizer(lang=lang)


def moses_tokens(text: str, lang: str = "en", *, rejoin: bool = False) -> str:
    """``text`` Moses-tokenized (``tokenizer.perl -l LANG``, no escaping; Moses entities
    such as ``&apos;`` in the input are unescaped first). With ``rejoin`` (for WordPiece
    output), the tokens Moses keeps whole are glued back together: `` ' s`` -> `` 's``,
    ``a - b`` -> ``a-b``, ``- -`` -> ``--``, ``1 , 000`` -> ``1,000``, ``2 . 5`` -> ``2.5``.

    A language Moses has no rules for (``vi``, Vietnamese, among them) is tokenized as
    ``tokenizer.perl -l vi`` does it: with the English non-breaking prefixes (sacremoses
    falls back to them silently, the Perl script with a warning) and every apostrophe split
    off (``it ' s``), which ``rejoin`` glues back as for English. Case and precomposed
    (NFC) diacritics are kept; a combining mark would be split off as a token of its own.
    The rejoin rules are the same for every language."""
    tokenizer, _ = _moses(lang)
    tokens = tokenizer.tokenize(html.unescape(text), escape=False, return_str=True)
    return _rejoin(tokens) if rejoin else tokens


def _rejoin(tokens: str) -> str:
    """``moses_tokens``' rejoin rules on space-separated tokens."""
    tokens = _CLITIC.sub(r" '\1", tokens)
    tokens = _INNER_HYPHEN.sub("-", tokens)
    tokens = _DOUBLE_DASH.sub("--", tokens)
    tokens = _THOUSANDS.sub(",", tokens)
    return _DECIMAL.sub(".", tokens)


def _single_quotes(tokens: list[str]) -> list[str]:
    """Decides which side each lone ``'`` attaches to, marking it with a placeholder.

    A quote closes an open one; after a plural word (``girls '``) it is a possessive and
    attaches left, unless a later quote can close it (one after a word not ending in s:
    ``says ' free dinner '``); otherwise it opens when a later quote follows; a last lone
    one is in-word after a single letter (``d ' oeuvres``, ``o ' clock``), opens at the
    start, else attaches left (``adult '``, ``4 '``)."""

    def plural(i: int) -> bool:
        return i >= 0 and bool(_WORD.fullmatch(tokens[i])) and tokens[i][-1] in "sS"

    quotes = [i for i, t in enumerate(tokens) if t == "'"]
    out = list(tokens)
    is_open = False
    for k, i in enumerate(quotes):
        later = quotes[k + 1 :]
        if is_open:
            out[i], is_open = _QUOTE_CLOSE, False
        elif plural(i - 1) and not any(not plural(j - 1) for j in later):
            out[i] = _QUOTE_CLOSE
        elif later:
            out[i], is_open = _QUOTE_OPEN, True
        elif (
            i > 0
            and i + 1 < len(tokens)
            and len(tokens[i - 1]) == 1
            and tokens[i - 1].isalpha()
            and _WORD.fullmatch(tokens[i + 1])
        ):
            out[i] = _QUOTE_INNER
        else:
            out[i] = _QUOTE_OPEN if i == 0 else _QUOTE_CLOSE
    return out


def detokenize_words(words: Sequence[str], lang: str = "en") -> str:
    """Plain text from words split as BERT's pre-tokenizer splits them (every punctuation
    mark alone: ``dog ' s``, ``red - painted``, ``" tenho em mim "``), as people write it:
    ``dog's``, ``red-painted``, ``"tenho em mim"``.

    The tokens Moses keeps whole are glued back first (``moses_tokens``' rejoin rules:
    clitics, intra-word hyphens, ``--``, ``1,000``, ``2.5``; and ``#8``, ``10:30``,
    ``and/or``, ``u.s.``, ``example.com``, ``a&m``, ``joe’s``, German ``sport- und``,
    ``und -handschuhe``, ``„open“-schild``; ``&amp;`` -> ``&``), lone single
    quotes are paired or attached (``_single_quotes``), then the Moses detokenizer
    (``detokenizer.perl -l LANG``) attaches punctuation, brackets and double quotes. The
    words' spacing is lost in WordPiece, so the rules pick the usual form: ``a - b``
    between words becomes ``a-b``."""
    text = " ".join(words)
    text = _ENTITY.sub(lambda m: html.unescape(f"&{m.group(1)};"), text)
    text = _TRUNCATED.sub("- ", text)
    text = _LEADING_HYPHEN.sub(r"\1 -", text)
    text = _CURLY_CLITIC.sub(r"\1\2", text)
    text = _rejoin(text)
    text = _LETTER_AMP.sub(r"\1&\2", text)
    text = _HASH_NUMBER.sub("#", text)
    text = _CLOCK.sub(":", text)
    text = _SLASH.sub("/", text)
    text = _ACRONYM.sub(lambda m: m.group(0).replace(" ", ""), text)
    text = _DOMAIN.sub(".", text)
    _, detokenizer = _moses(lang)
    text = detokenizer.detokenize(_single_quotes(text.split()), unescape=False)
    text = re.sub(f"{_QUOTE_OPEN} ?", "'", text)
    text = re.sub(f" ?{_QUOTE_CLOSE}", "'", text)
    text = re.sub(f" ?{_QUOTE_INNER} ?", "'", text)
    return _QUOTE_HYPHEN.sub("-", text)


def moses_detokenize(text: str, lang: str = "en") -> str:
    """Moses-tokenized text back to plain text (``detokenizer.perl -l LANG``)."""
    _, detokenizer = _moses(lang)
    return detokenizer.detokenize(html.unescape(text).split())


def tokenized_bleu(
    hypotheses: Sequence[str],
    references: Sequence[str],
    *,
    lang: str = "en",
    references_tokenized: bool = False,
    lowercase: bool = True,
) -> dict:
    """Tokenized corpus BLEU (the reference's ``multi-bleu.perl`` score), lowercased unless
    ``lowercase`` is False.

    Hypotheses go through ``moses_tokens(rejoin=True)``; references through ``moses_tokens``
    unless ``references_tokenized`` (they are Moses-tokenized already, like fairseq's IWSLT14
    files; Moses is not idempotent: it would split ``'s`` again), when only their entities are
    unescaped. Both sides are lowercased (or, with ``lowercase=False``, compared with their
    case, as ``multi-bleu.perl`` without ``-lc`` does) and scored by sacreBLEU with
    ``tokenize="none"``. Returns the keys of ``bleu``; the signature starts with
    ``moses-tok:LANG|`` and says ``case:lc`` or ``case:mixed``.
    """
    from sacrebleu.metrics import BLEU

    _check_lengths(hypotheses, references)

    def case(text: str) -> str:
        return text.lower() if lowercase else text

    hyps = [case(moses_tokens(h, lang, rejoin=True)) for h in hypotheses]
    refs = [
        case(" ".join(html.unescape(r).split()))
        if references_tokenized
        else case(moses_tokens(r, lang))
        for r in references
    ]
    metric = BLEU(tokenize="none", lowercase=lowercase, force=True)
    result = metric.corpus_score(hyps, [refs])
    return {
        "bleu": float(result.score),
        "signature": f"moses-tok:{lang}|{metric.get_signature()}",
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
    """Reads a UTF-8 text file (local or ``gs://``) into lines without their line endings.

    Raises ValueError naming the file and the 1-based line of the first invalid byte.
    """
    from distill_jax import storage

    raw = storage.path(path).read_bytes()  # a local path or gs://
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: invalid UTF-8 at byte {err.start} of the line"
            ) from None
    return out
