"""IWSLT15 English-Vietnamese as the Stanford NMT group preprocessed it (Luong and Manning,
2015), the data of the paper's En-Vi result: https://nlp.stanford.edu/projects/nmt/

* train: ``train.{en,vi}``, 133,317 TED talk sentence pairs;
* valid: ``tst2012.{en,vi}``, 1,553 pairs (the usual development set);
* test: ``tst2013.{en,vi}``, 1,268 pairs.

The files are Moses-tokenized already (case kept, not lowercased) and carry Moses' XML
escapes (``&apos;``, ``&quot;``, ``&amp;``, ``&#91;`` ...). They are used as they are, except
that the escapes are undone (``unescape_moses``) before BERT tokenization, which would split
an entity into pieces; the reference implementation unescapes them too. Token boundaries,
and so tokenized BLEU, are the same either way.

No checksum of the files is published. Their line counts are (``LINE_COUNTS``); see
``builders.IWSLT15_EN_VI`` for how they are checked.
"""

from __future__ import annotations

import re

# The Stanford NMT group's copy; each file is fetched on its own (there is no archive).
URL = "https://nlp.stanford.edu/projects/nmt/data/iwslt15.en-vi/{}"
LANGS = ("en", "vi")
SPLITS = {"train": "train", "valid": "tst2012", "test": "tst2013"}  # our split -> file stem
# Published sizes of the files, in lines ("\n"-terminated, as wc -l counts them; every
# line is one sentence, empty ones included). A file without its final newline counts
# the same.
LINE_COUNTS = {"train": 133317, "tst2012": 1553, "tst2013": 1268}


def files() -> dict[str, tuple[str, str]]:
    """split -> (English file, Vietnamese file)."""
    return {split: (f"{stem}.en", f"{stem}.vi") for split, stem in SPLITS.items()}


# Moses' deescape-special-chars.perl (the escapes tokenizer.perl writes, and the legacy
# &bar; &bra; &ket;), in one pass: "&amp;quot;" is the text "&quot;", as the script's
# order (&amp; last) makes it. Any other "&...;" is left alone (html.unescape would also
# turn bare "&copy" and the like into symbols).
_MOSES_ENTITIES = {
    "&amp;": "&",
    "&#124;": "|",
    "&bar;": "|",
    "&lt;": "<",
    "&gt;": ">",
    "&apos;": "'",
    "&quot;": '"',
    "&#91;": "[",
    "&bra;": "[",
    "&#93;": "]",
    "&ket;": "]",
}
_MOSES_ENTITY = re.compile("|".join(re.escape(e) for e in _MOSES_ENTITIES))


def unescape_moses(line: str) -> str:
    """``line`` with Moses' XML escapes undone: ``it &apos;s`` -> ``it 's``."""
    return _MOSES_ENTITY.sub(lambda m: _MOSES_ENTITIES[m.group(0)], line)
