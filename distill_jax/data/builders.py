"""TFDS builders for line-aligned parallel corpora, stored as array_record.

One builder, ``distill_parallel``, turns any line-aligned pair of text files per split into a
TFDS dataset of student token ids (plus the raw text and the line number), with a config per
corpus and direction (``multi30k_de_en``, ``multi30k_en_de``, ``gigaword_sample``, …). It needs
no TensorFlow to build or to read (``file_format="array_record"``; read back with
``tfds.data_source``, or ``tfds.builder_from_directory`` where the class is not imported).

Files come either from a local directory (checked against the ``SHA256SUMS`` found there, or
the checksums known here) or from the corpus's public URLs through the TFDS download manager.
A corpus whose files have no published checksum but published line counts (``iwslt15_en_vi``)
is checked by those counts; a corpus stored already tokenized says so in ``text``, and its
lines may be normalized as they are read (the Moses escapes of ``iwslt15_en_vi`` undone).
Upstream TFDS datasets (``wmt14_translate/de-en``, ``cnn_dailymail``) feed the same builder
through ``UpstreamSpec``; their own builders need TensorFlow. Corpora that come as one archive
with a preprocessing recipe of their own (``iwslt14_de_en``: fairseq's IWSLT14 recipe) are
described by ``ArchiveCorpusSpec``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from distill_jax.data import iwslt14, iwslt15
from distill_jax.data.vocab import EOS, TeacherTokenizer, Vocabulary
from distill_jax.errors import UserError

logger = logging.getLogger(__name__)

BUILDER_NAME = "distill_parallel"


# --------------------------------------------------------------------------------------------
# Corpus descriptions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus of line-aligned text files, one (source, target) pair of files per split."""

    name: str  # corpus name, e.g. "multi30k"
    directions: dict[str, dict[str, tuple[str, str]]]  # direction -> split -> (src file, tgt file)
    train_split: str = "train"  # the split the vocabulary is built from
    urls: dict[str, str] = field(default_factory=dict)  # file -> public URL (.gz/.zip unpacked)
    sha256: dict[str, str] = field(default_factory=dict)  # file -> known SHA-256 of its text
    description: str = ""  # one line for DatasetInfo
    line_counts: dict[str, int] = field(default_factory=dict)  # file -> published line count
    normalize: Callable[[str], str] | None = None  # applied to every line read; None: kept as is
    text: dict = field(default_factory=dict)  # how the stored text is tokenized (dataset.json)

    def files(self, direction: str) -> dict[str, tuple[str, str]]:
        """split -> (source file, target file) for ``direction``."""
        if direction not in self.directions:
            raise UserError(
                f"corpus {self.name!r} has no direction {direction!r}; "
                f"choose one of {sorted(self.directions)}"
            )
        return self.directions[direction]


@dataclass(frozen=True)
class UpstreamSpec:
    """A dataset of the TFDS catalog whose examples hold a source and a target text field."""

    name: str  # TFDS name, e.g. "wmt14_translate/de-en"
    directions: dict[str, tuple[str, str]]  # direction -> (source feature, target feature)
    split_names: dict[str, str]  # our split -> upstream split
    train_split: str = "train"  # the split the vocabulary is built from


_MULTI30K_SPLITS = {
    "train": "train",
    "val": "val",
    "test2016": "test_2016_flickr",
    "test2017": "test_2017_flickr",
    "mscoco2017": "test_2017_mscoco",
    "test2018": "test_2018_flickr",
}
# Raw files of the public multi30k/dataset repository at the commit the local copies come from.
_MULTI30K_URL = "https://github.com/multi30k/dataset/raw/a3d2e0d/data/task1/raw/{}.gz"

MULTI30K = CorpusSpec(
    name="multi30k",
    directions={
        f"{s}-{t}": {
            split: (f"{stem}.{s}", f"{stem}.{t}") for split, stem in _MULTI30K_SPLITS.items()
        }
        for s, t in (("de", "en"), ("en", "de"))
    },
    urls={
        f"{stem}.{lang}": _MULTI30K_URL.format(f"{stem}.{lang}")
        for stem in _MULTI30K_SPLITS.values()
        for lang in ("de", "en")
    },
    sha256={
        "test_2016_flickr.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
        "test_2016_flickr.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
        "test_2017_flickr.de": "c3078bc3b36808bf9d20eb2347ed6137016179ef59ec0d2b9b8ecc3fb2880081",
        "test_2017_flickr.en": "ce1450ddc5ab0834502579d77a170849952e15a2938b34cc503bdc25ebb4fb98",
        "test_2017_mscoco.de": "58277df3c75f92f7145a11b910b553d1cf82c439249d4dc237c899609eafac22",
        "test_2017_mscoco.en": "43051fdfa86fd5395182e718a94ca67b1b227b9f7c79596ff0f6b813216981d2",
        "test_2018_flickr.de": "39fcc8b3331d76fb42d648d019c6898b0d5e58baac87bc2a0bb93f44ec8db207",
        "test_2018_flickr.en": "4e585c2dd525911a6ea7730e9d0b516239af3f1b1ffae6a2130223cfb639f25e",
        "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
        "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
        "val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
        "val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    },
    description="Multi30k task 1 (Flickr30k captions), English-German.",
)

# The Rush et al. (2015) Gigaword headline data; the sample is the one committed in the
# public dongjun-Lee/text-summarization-tensorflow repository (sample_data.zip). The full
# data set is the TFDS catalog's "gigaword" (see UPSTREAM).
_GIGAWORD_SAMPLE_URL = (
    "https://github.com/dongjun-Lee/text-summarization-tensorflow/raw/master/sample_data.zip"
)
GIGAWORD_SAMPLE = CorpusSpec(
    name="gigaword_sample",
    directions={
        "article-title": {
            "train": ("train.article.txt", "train.title.txt"),
            "valid": ("valid.article.filter.txt", "valid.title.filter.txt"),
        }
    },
    urls={
        f: _GIGAWORD_SAMPLE_URL
        for f in (
            "train.article.txt",
            "train.title.txt",
            "valid.article.filter.txt",
            "valid.title.filter.txt",
        )
    },
    description="Gigaword headline generation (Rush et al. 2015), sample.",
)

# The Stanford NMT group's IWSLT15 English-Vietnamese (see distill_jax.data.iwslt15): six
# Moses-tokenized, cased files, read as they are with the Moses escapes undone. No checksum
# of them is published, so each file's line count must equal the published one, or prepare
# stops. Unlike iwslt14_de_en, whose split sizes come out of our own tokenization and
# cleaning (sacremoses may differ from tokenizer.perl on a few lines, so there a difference
# is only a note), nothing of ours runs before the count: the files are fixed, so any
# difference means a truncated download or another copy (cleaned, re-tokenized, the raw
# IWSLT15 release), whose scores would not compare with the paper's. A SHA256SUMS beside
# the files in --data-dir is checked as for any corpus; prepare prints each file's SHA-256
# for writing one.
IWSLT15_EN_VI = CorpusSpec(
    name="iwslt15_en_vi",
    directions={"en-vi": iwslt15.files()},
    urls={name: iwslt15.URL.format(name) for pair in iwslt15.files().values() for name in pair},
    line_counts={
        f"{stem}.{lang}": count
        for stem, count in iwslt15.LINE_COUNTS.items()
        for lang in iwslt15.LANGS
    },
    normalize=iwslt15.unescape_moses,
    text={"tokenizer": "moses", "lowercase": False, "src_lang": "en", "tgt_lang": "vi"},
    description="IWSLT15 English-Vietnamese (TED talks), the Stanford NMT group's copy.",
)

CORPORA: dict[str, CorpusSpec] = {c.name: c for c in (MULTI30K, GIGAWORD_SAMPLE, IWSLT15_EN_VI)}


@dataclass(frozen=True)
class ArchiveCorpusSpec:
    """A corpus made from one archive by a preprocessing step of its own (tokenization,
    cleaning, split assembly) rather than read from line-aligned files."""

    name: str  # the --dataset name, e.g. "iwslt14_de_en"
    direction: str  # source-target, e.g. "de-en"
    archive: str  # archive file name (in --data-dir, or fetched)
    url: str  # public URL of the archive
    sha256: str | None  # published SHA-256 of the archive; None: none is
    read: Callable[[Path], dict[str, tuple[list[str], list[str]]]]  # archive -> split texts
    text: dict = field(default_factory=dict)  # how the stored text is tokenized (dataset.json)
    train_split: str = "train"  # the split the vocabulary is built from


# fairseq's IWSLT14 recipe (see distill_jax.data.iwslt14). Neither fairseq nor the IWSLT
# organisers publish a checksum of de-en.tgz, so the archive is checked by its layout (every
# file the recipe reads) and the split sizes are compared with fairseq's; pin the archive you
# have with a SHA256SUMS file beside it in --data-dir.
IWSLT14_DE_EN = ArchiveCorpusSpec(
    name="iwslt14_de_en",
    direction="de-en",
    archive=iwslt14.ARCHIVE,
    url=iwslt14.URL,
    sha256=None,
    read=iwslt14.read_archive,
    text={"tokenizer": "moses", "lowercase": True, "src_lang": "de", "tgt_lang": "en"},
)

ARCHIVE_CORPORA: dict[str, ArchiveCorpusSpec] = {IWSLT14_DE_EN.name: IWSLT14_DE_EN}

UPSTREAM: dict[str, UpstreamSpec] = {
    "wmt14_translate/de-en": UpstreamSpec(
        "wmt14_translate/de-en",
        {"de-en": ("de", "en"), "en-de": ("en", "de")},
        {"train": "train", "valid": "validation", "test": "test"},
    ),
    "cnn_dailymail": UpstreamSpec(
        "cnn_dailymail",
        {"article-highlights": ("article", "highlights")},
        {"train": "train", "valid": "validation", "test": "test"},
    ),
    "gigaword": UpstreamSpec(
        "gigaword",
        {"document-summary": ("document", "summary")},
        {"train": "train", "valid": "validation", "test": "test"},
    ),
}


def local_corpus(split_files: dict[str, tuple[str, str]], train_split: str = "train") -> CorpusSpec:
    """A ``CorpusSpec`` for user files: split -> (source file, target file), one direction."""
    if train_split not in split_files:
        raise UserError(
            f"the local corpus has no {train_split!r} split to build the vocabulary "
            f"from (splits: {sorted(split_files)})"
        )
    return CorpusSpec(
        name="local",
        directions={"src-tgt": dict(split_files)},
        train_split=train_split,
        description="Local line-aligned corpus.",
    )


# --------------------------------------------------------------------------------------------
# Fetching and reading text
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_sha256sums(path: Path) -> dict[str, str]:
    """Parses a ``sha256sum`` output file: file name -> hash."""
    sums = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise UserError(f"{path}, line {number}: not a 'HASH  FILE' line: {line!r}")
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


def verify_local_files(data_dir: Path, names: list[str], known: dict[str, str]) -> None:
    """Checks each file against ``data_dir/SHA256SUMS`` (else the ``known`` hashes).

    Files listed nowhere are not checked (only possible for local corpora).
    """
    sums_path = data_dir / "SHA256SUMS"
    expected = read_sha256sums(sums_path) if sums_path.is_file() else dict(known)
    for name in names:
        path = data_dir / name
        if not path.is_file():
            raise UserError(f"{path}: no such file (needed by the corpus)")
        if name not in expected:
            if known:
                raise UserError(f"{sums_path} has no checksum for {name}")
            continue
        actual = sha256_file(path)
        if actual != expected[name]:
            source = sums_path if sums_path.is_file() else "the checksums known for this corpus"
            raise UserError(f"{path}: SHA-256 {actual} differs from {expected[name]} in {source}")


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (without line endings; a final newline ends the last line)."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise UserError(
                f"{path}, line {number}: invalid UTF-8 ({err.reason} at byte {err.start})"
            ) from None
    return out


def _check_aligned(src_path: Path, src: list[str], tgt_path: Path, tgt: list[str]) -> None:
    """The source and target lines of a split must be as many."""
    if len(src) != len(tgt):
        raise UserError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
            f"the files of a split must be line-aligned"
        )


def _find_downloaded(root: Path, name: str) -> Path:
    """``root`` itself if it is the file, else the file called ``name`` below it."""
    if root.is_file():
        return root
    found = sorted(root.rglob(name))
    if not found:
        raise UserError(f"the download {root} contains no {name}")
    return found[0]


def fetch_corpus_files(
    spec: CorpusSpec, direction: str, data_dir: Path | None, dl_manager
) -> dict[str, tuple[Path, Path]]:
    """Local paths of every split's (source, target) files, verified.

    With ``data_dir`` the files are read there; without it they are downloaded from the
    corpus's URLs (decompressed) and checked against the known checksums.
    """
    files = spec.files(direction)
    names = sorted({n for pair in files.values() for n in pair})
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir}: no such directory")
        verify_local_files(data_dir, names, spec.sha256)
        return {split: (data_dir / s, data_dir / t) for split, (s, t) in files.items()}
    missing = [n for n in names if n not in spec.urls]
    if missing:
        raise UserError(f"corpus {spec.name!r} has no download URL for {missing}; pass --data-dir")
    urls = sorted({spec.urls[n] for n in names})
    extracted = dict(zip(urls, dl_manager.download_and_extract(urls)))
    paths = {n: _find_downloaded(Path(extracted[spec.urls[n]]), n) for n in names}
    for name, path in paths.items():
        if name in spec.sha256 and sha256_file(path) != spec.sha256[name]:
            raise UserError(
                f"downloaded {name} ({spec.urls[name]}): SHA-256 {sha256_file(path)} "
                f"differs from the known {spec.sha256[name]}"
            )
    return {split: (paths[s], paths[t]) for split, (s, t) in files.items()}


def read_corpus(
    spec: CorpusSpec, direction: str, data_dir: Path | None, dl_manager
) -> dict[str, tuple[list[str], list[str]]]:
    """Every split's (source, target) lines: the files found in ``data_dir`` or downloaded,
    verified (``fetch_corpus_files``), each file's line count checked against the corpus's
    published one, the pair checked line-aligned, then every line normalized by
    ``spec.normalize``. Prints the SHA-256 of the files checked by line count alone, so
    that they can be pinned in a SHA256SUMS."""
    paths = fetch_corpus_files(spec, direction, data_dir, dl_manager)
    texts = {}
    for split, names in spec.files(direction).items():
        sides = []
        for name, path in zip(names, paths[split]):
            if name in spec.line_counts and name not in spec.sha256:
                print(
                    f"{name}: SHA-256 {sha256_file(path)} (no published checksum; "
                    f"line count checked instead)",
                    flush=True,
                )
            lines = read_lines(path)
            expected = spec.line_counts.get(name)
            if expected is not None and len(lines) != expected:
                shown = path if Path(path).name == name else f"{path} (downloaded {name})"
                raise UserError(
                    f"{shown} has {len(lines)} lines, but {spec.name}'s {name} has "
                    f"{expected}: a truncated download or a different copy"
                )
            sides.append(lines)
        _check_aligned(paths[split][0], sides[0], paths[split][1], sides[1])
        if spec.normalize is not None:
            sides = [[spec.normalize(line) for line in lines] for lines in sides]
        texts[split] = (sides[0], sides[1])
    return texts


def read_archive_corpus(
    spec: ArchiveCorpusSpec, data_dir: Path | None, dl_manager
) -> dict[str, tuple[list[str], list[str]]]:
    """Split texts of an archive corpus: the archive from ``data_dir`` (checked against its
    ``SHA256SUMS`` if that lists it, else the published hash if there is one) or downloaded
    from ``spec.url`` (checked against the published hash if there is one), then
    preprocessed. Prints the archive's SHA-256 so that it can be pinned."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir}: no such directory")
        verify_local_files(
            data_dir, [spec.archive], {spec.archive: spec.sha256} if spec.sha256 else {}
        )
        path = data_dir / spec.archive
    else:
        path = Path(dl_manager.download(spec.url))
        if spec.sha256 and sha256_file(path) != spec.sha256:
            raise UserError(
                f"downloaded {spec.url}: SHA-256 {sha256_file(path)} differs from "
                f"the published {spec.sha256}"
            )
    print(
        f"{spec.archive}: SHA-256 {sha256_file(path)}"
        f"{'' if spec.sha256 else ' (no published checksum; layout checked instead)'}",
        flush=True,
    )
    return spec.read(path)


def read_upstream(
    spec: UpstreamSpec, direction: str, data_dir: Path | None
) -> dict[str, tuple[list[str], list[str]]]:
    """Source and target texts of an upstream TFDS dataset (needs TensorFlow)."""
    try:
        import tensorflow  # noqa: F401  (the upstream builders read and write TFRecord)
    except ImportError:
        raise UserError(
            f"dataset {spec.name!r} is built by TFDS's own builder, which needs "
            f"TensorFlow; install it (pip install 'distill-jax[tf]') or use one of the "
            f"TensorFlow-free corpora {sorted(CORPORA)}"
        ) from None
    if direction not in spec.directions:
        raise UserError(
            f"dataset {spec.name!r} has no direction {direction!r}; choose one of "
            f"{sorted(spec.directions)}"
        )
    src_key, tgt_key = spec.directions[direction]
    builder = tfds.builder(spec.name, data_dir=None if data_dir is None else str(data_dir))
    builder.download_and_prepare()
    texts = {}
    for ours, theirs in spec.split_names.items():
        if theirs not in builder.info.splits:
            continue
        pairs = [
            (ex[src_key].decode("utf-8"), ex[tgt_key].decode("utf-8"))
            for ex in tfds.as_numpy(builder.as_dataset(split=theirs))
        ]
        texts[ours] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return texts


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthLimits:
    """Pairs over these limits are dropped at prepare time (counted and reported)."""

    max_src_len: int = 256  # most source pieces, </s> included
    max_tgt_len: int = 256  # most target pieces, </s> included


@dataclass
class SplitCounts:
    """What happened to the lines of one split."""

    lines: int = 0  # line pairs read
    kept: int = 0  # pairs stored
    dropped_empty: int = 0  # pairs with an empty (or whitespace-only) side
    dropped_too_long: int = 0  # pairs over a length limit


@dataclass
class EncodedSplit:
    """Kept pairs of one split, encoded."""

    src: list[list[int]]  # source ids + </s>
    tgt: list[list[int]]  # target ids (no specials)
    src_text: list[str]  # the raw source lines
    tgt_text: list[str]  # the raw target lines
    line: list[int]  # 0-based line number in the original files
    counts: SplitCounts

    def lengths(self) -> np.ndarray:
        """[n, 2] int32: source length (with </s>), target length (with </s> / <s>)."""
        return np.array(
            [[len(s), len(t) + 1] for s, t in zip(self.src, self.tgt)], dtype=np.int32
        ).reshape(-1, 2)


def encode_split(
    src_lines: list[str], tgt_lines: list[str], vocab: Vocabulary, limits: LengthLimits
) -> EncodedSplit:
    """Encodes with the student's tokenizer, and drops empty or over-long pairs (counting them)."""
    out = EncodedSplit([], [], [], [], [], SplitCounts(lines=len(src_lines)))
    for i, (s_text, t_text, s_ids, t_ids) in enumerate(
        zip(src_lines, tgt_lines, vocab.encode_batch(src_lines), vocab.encode_batch(tgt_lines))
    ):
        if not s_text.strip() or not t_text.strip() or not s_ids or not t_ids:
            out.counts.dropped_empty += 1
            continue
        src = s_ids + [EOS]
        if len(src) > limits.max_src_len or len(t_ids) + 1 > limits.max_tgt_len:
            out.counts.dropped_too_long += 1
            continue
        out.src.append(src)
        out.tgt.append(t_ids)
        out.src_text.append(s_text)
        out.tgt_text.append(t_text)
        out.line.append(i)
    out.counts.kept = len(out.src)
    return out


def encode_corpus(
    texts: dict[str, tuple[list[str], list[str]]],
    train_split: str,
    tokenizer: TeacherTokenizer,
    vocab: Vocabulary | None,
    min_count: int,
    size_multiple: int,
    limits: LengthLimits,
) -> tuple[Vocabulary, dict[str, EncodedSplit]]:
    """Builds the vocabulary from the teacher's pieces of ``train_split`` unless given, then
    encodes every split with it."""
    if vocab is None:
        if train_split not in texts:
            raise UserError(f"no {train_split!r} split to build the vocabulary from")
        train_src, train_tgt = texts[train_split]
        logger.info("building the vocabulary from the %d %s pairs", len(train_src), train_split)
        vocab = Vocabulary.build(
            tokenizer.tokenize_batch(train_src) + tokenizer.tokenize_batch(train_tgt),
            tokenizer,
            min_count=min_count,
            size_multiple=size_multiple,
        )
    else:
        vocab.attach_tokenizer(tokenizer)
    encoded = {}
    for split in texts:
        logger.info("encoding %s: %d pairs", split, len(texts[split][0]))
        encoded[split] = encode_split(*texts[split], vocab, limits)
    return vocab, encoded


# --------------------------------------------------------------------------------------------
# The TFDS builder
# --------------------------------------------------------------------------------------------


class ParallelCorpusConfig(tfds.core.BuilderConfig):
    """One corpus in one direction."""

    def __init__(self, *, corpus: str, direction: str, **kwargs):
        super().__init__(**kwargs)
        self.corpus = corpus  # key of CORPORA / UPSTREAM, or "local"
        self.direction = direction  # e.g. "de-en"


def config_name(corpus: str, direction: str) -> str:
    """TFDS config name of a corpus and direction, e.g. ``multi30k_de_en``."""
    base = corpus.replace("/", "_").replace("-", "_")
    spec_directions = CORPORA[corpus].directions if corpus in CORPORA else None
    if (spec_directions is not None and len(spec_directions) == 1) or corpus in ARCHIVE_CORPORA:
        return base
    return f"{base}_{direction.replace('-', '_')}"


class DistillParallel(tfds.core.GeneratorBasedBuilder):
    """Line-aligned parallel text as student token ids (see the module docstring).

    Construct with ``encoded=`` (split -> ``EncodedSplit``, from ``encode_corpus``); the text
    is fetched, checked and encoded before the builder writes anything.
    """

    name = BUILDER_NAME
    # TFDS looks for a checksums.tsv beside the builder's module through ``code_path``, which
    # needs the ``importlib_resources`` package (not installed with tfds 4.9.10 on Python >= 3.9).
    # This builder downloads nothing through TFDS (files are fetched and verified before), so
    # there is no checksums file to find.
    code_path = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: student ids, raw text, line numbers."}
    BUILDER_CONFIGS = [
        ParallelCorpusConfig(
            name=config_name(c.name, d),
            corpus=c.name,
            direction=d,
            description=f"{c.description} Direction {d}.",
        )
        for c in CORPORA.values()
        for d in c.directions
    ]

    def __init__(self, *, encoded: dict[str, EncodedSplit] | None = None, **kwargs):
        self._encoded = encoded
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Parallel text encoded with a distill-jax student vocabulary "
            "(the vocabulary is saved beside the dataset).",
            features=tfds.features.FeaturesDict(
                {
                    "src": tfds.features.Tensor(shape=(None,), dtype=np.int32),  # ids + </s>
                    "tgt": tfds.features.Tensor(shape=(None,), dtype=np.int32),  # ids
                    "src_text": tfds.features.Text(),
                    "tgt_text": tfds.features.Text(),
                    "line": np.int64,  # 0-based
                }
            ),
            disable_shuffling=True,  # record i is the i-th kept line; the loader shuffles
        )

    def _split_generators(self, dl_manager):
        if self._encoded is None:
            raise UserError(
                "DistillParallel needs the encoded corpus (encoded=...); build it with "
                "`distill-jax prepare`"
            )
        return {split: self._generate_examples(enc) for split, enc in self._encoded.items()}

    def _generate_examples(self, enc: EncodedSplit) -> Iterator[tuple[int, dict]]:
        for i in range(len(enc.src)):
            yield (
                i,
                {
                    "src": np.asarray(enc.src[i], np.int32),
                    "tgt": np.asarray(enc.tgt[i], np.int32),
                    "src_text": enc.src_text[i],
                    "tgt_text": enc.tgt_text[i],
                    "line": enc.line[i],
                },
            )
