"""The BLEU of a perfect hypothesis: each Multi30k English reference line sent through the
student vocabulary's encode -> decode (the path of ``generate`` and of every scored test-set
hypothesis) and scored against the references with detokenized, case-insensitive sacreBLEU
(the README's BLEU; the uncased teacher lowercases the pieces).

The vocabulary is built as ``distill-jax prepare --dataset multi30k --direction de-en`` builds
it: the teacher's pieces of train.de and train.en, min_count 1, size a multiple of 8. What
stays below 100 is what WordPiece cannot carry: accents, <unk> characters, spacing the pieces
do not record (``mid - air`` comes back as ``mid-air``).

  python scripts/perfect_hypothesis_bleu.py [--data-dir ../shared/data/multi30k]
      [--teacher $(scripts/fetch_minilm.sh)] [--pre-fix]

``--pre-fix`` renders the text as ``Vocabulary.decode`` did before it detokenized (pieces
joined with spaces, no space before . ? ! ,): the figure every BLEU reported before then was
depressed by.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# Multi30k English references: split -> file.
SPLITS = {"train": "train.en", "val": "val.en", "test2016": "test_2016_flickr.en"}


def _lines(path: pathlib.Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def pre_fix_decode(vocab, ids) -> str:
    """The text ``Vocabulary.decode`` wrote before detokenization (same ids)."""
    from distill_jax.data.vocab import join_pieces

    pieces = [vocab.pieces[i] for i in ids]
    return re.sub(r" ([.?!,])", r"\1", " ".join(join_pieces(pieces)))


def scores(
    data_dir: str | os.PathLike,
    teacher: str | os.PathLike,
    *,
    splits: tuple[str, ...] = tuple(SPLITS),
    pre_fix: bool = False,
) -> dict:
    """split -> detokenized case-insensitive sacreBLEU of the encode -> decode round trip."""
    from distill_jax import metrics
    from distill_jax.data.vocab import TeacherTokenizer, Vocabulary

    data_dir = pathlib.Path(data_dir)
    tokenizer = TeacherTokenizer.load(teacher)
    vocab = Vocabulary.build(
        tokenizer.tokenize_batch(_lines(data_dir / "train.de"))
        + tokenizer.tokenize_batch(_lines(data_dir / "train.en")),
        tokenizer,
    )
    out = {}
    for split in splits:
        references = _lines(data_dir / SPLITS[split])
        ids = vocab.encode_batch(references)
        hypotheses = [pre_fix_decode(vocab, i) if pre_fix else vocab.decode(i) for i in ids]
        out[split] = metrics.bleu(hypotheses, references, lowercase=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        default=str(REPO.parent / "shared" / "data" / "multi30k"),
        help="the Multi30k files (train.de, train.en, val.en, test_2016_flickr.en)",
    )
    parser.add_argument(
        "--teacher",
        default=str(REPO / ".cache" / "distill-jax" / "all-MiniLM-L6-v2"),
        help="the teacher tokenizer (scripts/fetch_minilm.sh prints its path)",
    )
    parser.add_argument(
        "--pre-fix",
        action="store_true",
        help="render as decode did before detokenization, for comparison",
    )
    args = parser.parse_args(argv)
    for name in ("train.de", *SPLITS.values()):
        if not (pathlib.Path(args.data_dir) / name).is_file():
            print(
                f"error: {pathlib.Path(args.data_dir) / name} does not exist (--data-dir)",
                file=sys.stderr,
            )
            return 2
    results = scores(args.data_dir, args.teacher, pre_fix=args.pre_fix)
    for split, result in results.items():
        print(f"{split:9s} BLEU = {result['bleu']:.2f}  ({result['signature']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
