"""IWSLT14 German-English, preprocessed as fairseq's ``examples/translation/prepare-iwslt14.sh``
does (the data of the paper's main result), from the ``de-en.tgz`` archive of the
IWSLT 2014 evaluation campaign:

* train: ``train.tags.de-en.{de,en}`` without the lines holding ``<url>``, ``<talkid>`` or
  ``<keywords>``, with the ``<title>`` / ``<description>`` tags (not their text) removed;
  Moses-tokenized; pairs cleaned as Moses' ``clean-corpus-n.perl -ratio 1.5 ... 1 175``
  does (whitespace collapsed, a pair dropped when either side has fewer than 1 or more
  than 175 tokens, a word longer than 1000 characters, or one side more than 1.5 times
  as many tokens as the other); lowercased;
* valid: every 23rd cleaned training pair (lines 23, 46, ...), which train then lacks;
* test: the ``<seg>`` lines of the TED dev2010, TEDX dev2012 and TED tst2010-2012 XML files,
  concatenated in that order, ``’`` written as ``'``, Moses-tokenized, lowercased (not
  cleaned).

Moses tokenization is ``sacremoses`` (the Python port of ``tokenizer.perl``). One
difference from the shell script, on purpose: the text is kept unescaped (``'s``, not
``&apos;s``), since BERT's tokenizer would split the entities into pieces; the reference
implementation unescapes them before BERT tokenization too. Token boundaries, and so the
cleaning and tokenized BLEU, are the same either way.
"""

from __future__ import annotations

import logging
import re
import tarfile
from pathlib import Path

from distill_jax.errors import UserError

logger = logging.getLogger(__name__)

ARCHIVE = "de-en.tgz"
# The mirror fairseq's prepare-iwslt14.sh downloads from (over http there; the host serves
# https too), the original wit3.fbk.eu archive being no longer served. No checksum of it is
# published; see builders.IWSLT14_DE_EN.
URL = "https://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
LANGS = ("de", "en")
TRAIN_FILE = "train.tags.de-en.{}"
TEST_SETS = (
    "IWSLT14.TED.dev2010",
    "IWSLT14.TEDX.dev2012",
    "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011",
    "IWSLT14.TED.tst2012",
)
TEST_FILE = "{}.de-en.{}.xml"
VALID_EVERY = 23  # every 23rd cleaned training pair goes to valid
MAX_RATIO = 1.5  # clean-corpus-n -ratio
MIN_TOKENS, MAX_TOKENS = 1, 175  # clean-corpus-n min / max
MAX_WORD_CHARS = 1000  # clean-corpus-n -max-word-length (its default)
# Split sizes fairseq's script gives on this archive (its preprocessing log).
PUBLISHED_SIZES = {"train": 160239, "valid": 7283, "test": 6750}

_DROPPED_TAGS = ("<url>", "<talkid>", "<keywords>")
_STRIPPED_TAGS = ("<title>", "</title>", "<description>", "</description>")
_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def member_names() -> list[str]:
    """File names the archive must hold (below its top folder)."""
    return [TRAIN_FILE.format(lang) for lang in LANGS] + [
        TEST_FILE.format(name, lang) for name in TEST_SETS for lang in LANGS
    ]


def read_members(archive: Path) -> dict[str, list[str]]:
    """The needed files of ``archive`` (by base name) as lists of lines; checks the layout."""
    wanted = set(member_names())
    found: dict[str, list[str]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted and name not in found:
                    raw = tar.extractfile(member).read()
                    try:
                        found[name] = raw.decode("utf-8").splitlines()
                    except UnicodeDecodeError as err:
                        raise UserError(
                            f"{archive}: {member.name} is not UTF-8 "
                            f"({err.reason} at byte {err.start})"
                        ) from None
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"{archive}: not a readable tar archive ({err})") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise UserError(f"{archive} lacks {missing}: not the IWSLT14 de-en archive ({URL})")
    return found


def training_text(lines: list[str]) -> list[str]:
    """``train.tags`` lines without the metadata lines and tags (prepare-iwslt14.sh's greps
    and seds)."""
    out = []
    for line in lines:
        if any(tag in line for tag in _DROPPED_TAGS):
            continue
        for tag in _STRIPPED_TAGS:
            line = line.replace(tag, "")
        out.append(line)
    return out


def segments(lines: list[str]) -> list[str]:
    """The text of the ``<seg id="N">`` lines of an IWSLT XML file, ``’`` written as ``'``."""
    return [
        _SEG_CLOSE.sub("", _SEG_OPEN.sub("", line)).replace("\u2019", "'")
        for line in lines
        if "<seg id" in line
    ]


class MosesTokenizers:
    """One ``sacremoses`` tokenizer per language: ``tokenizer.perl -l LANG`` without escaping."""

    def __init__(self):
        try:
            from sacremoses import MosesTokenizer
        except ImportError:
            raise UserError(
                "IWSLT14 preprocessing needs sacremoses (pip install sacremoses)"
            ) from None
        self._make = MosesTokenizer
        self._by_lang: dict = {}

    def __call__(self, lines: list[str], lang: str) -> list[str]:
        if lang not in self._by_lang:
            self._by_lang[lang] = self._make(lang=lang)
        tok = self._by_lang[lang]
        return [tok.tokenize(line, escape=False, return_str=True) for line in lines]


def keep_pair(src: str, tgt: str) -> bool:
    """Whether clean-corpus-n (ratio 1.5, 1-175 tokens) keeps a tokenized pair (both sides
    already whitespace-collapsed)."""
    if not src or not tgt:
        return False
    ns, nt = len(src.split(" ")), len(tgt.split(" "))
    if not (MIN_TOKENS <= ns <= MAX_TOKENS and MIN_TOKENS <= nt <= MAX_TOKENS):
        return False
    if ns / nt > MAX_RATIO or nt / ns > MAX_RATIO:
        return False
    return max(len(w) for w in src.split(" ") + tgt.split(" ")) <= MAX_WORD_CHARS


def _collapse(line: str) -> str:
    return re.sub(r"\s+", " ", line).strip()


def preprocess(members: dict[str, list[str]]) -> dict[str, tuple[list[str], list[str]]]:
    """split -> (German lines, English lines): train / valid / test as described above."""
    tokenize = MosesTokenizers()
    train = {}
    for lang in LANGS:
        train[lang] = tokenize(training_text(members[TRAIN_FILE.format(lang)]), lang)
    if len(train["de"]) != len(train["en"]):
        raise UserError(
            f"{TRAIN_FILE.format('de')} has {len(train['de'])} text lines but "
            f"{TRAIN_FILE.format('en')} has {len(train['en'])}: not line-aligned"
        )
    cleaned = [
        (de.lower(), en.lower())
        for de, en in ((_collapse(d), _collapse(e)) for d, e in zip(train["de"], train["en"]))
        if keep_pair(de, en)
    ]
    pairs = {
        "train": [p for i, p in enumerate(cleaned, 1) if i % VALID_EVERY],
        "valid": [p for i, p in enumerate(cleaned, 1) if not i % VALID_EVERY],
    }
    test = {
        lang: [
            line.lower()
            for name in TEST_SETS
            for line in tokenize(segments(members[TEST_FILE.format(name, lang)]), lang)
        ]
        for lang in LANGS
    }
    if len(test["de"]) != len(test["en"]):
        raise UserError(
            f"the test XML files hold {len(test['de'])} German but "
            f"{len(test['en'])} English segments"
        )
    pairs["test"] = list(zip(test["de"], test["en"]))
    return {
        split: ([de for de, _ in rows], [en for _, en in rows]) for split, rows in pairs.items()
    }


def read_archive(archive: Path) -> dict[str, tuple[list[str], list[str]]]:
    """The preprocessed splits of an IWSLT14 ``de-en.tgz``; warns when their sizes differ
    from the ones fairseq's script gives (sacremoses and tokenizer.perl may differ on a
    few lines; a different archive differs by more)."""
    texts = preprocess(read_members(Path(archive)))
    sizes = {split: len(src) for split, (src, _) in texts.items()}
    if sizes != PUBLISHED_SIZES:
        logger.warning("IWSLT14 split sizes %s differ from fairseq's %s", sizes, PUBLISHED_SIZES)
    return texts
