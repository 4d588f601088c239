"""The student's shared source/target vocabulary, made of the teacher's WordPiece pieces.

Ids (``docs/interfaces.md``): 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, then the pieces of
the training split by decreasing frequency (ties by piece), then ``<fill_i>`` fillers so that
the size is a multiple of 8 (or of a given multiple). ``teacher_ids`` maps every student id to
the teacher (BERT) id of the same string.

Text is encoded by the teacher's normalizer and pre-tokenizer, then WordPiece over the
student pieces (``Vocabulary.wordpiece_tokenizer``). That text pipeline is saved with the
vocabulary, so a prepared dataset encodes and exports text without the teacher's folder
(and without importing ``transformers``); a vocabulary saved before it was kept loads the
teacher's tokenizer for it, as then. The vocabulary is built from the
teacher's pieces of the training split, so (with ``min_count`` 1) a training sentence gets
exactly its teacher pieces; text with pieces the student lacks is spelled with the longest
student pieces.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill_jax.errors import UserError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
FILLER = "<fill_{}>"
VOCAB_FORMAT = "distill-jax-vocab/1"


class TeacherTokenizer:
    """The teacher's WordPiece tokenizer, splitting text into pieces without specials.

    Wraps a Hugging Face tokenizer's fast backend with padding and truncation turned off (a
    checkpoint's ``tokenizer.json`` may pad or truncate to 128, which would corrupt data).
    """

    def __init__(self, hf_tokenizer, name: str):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.name = name  # path or hub name it came from
        self.vocab: dict[str, int] = hf_tokenizer.get_vocab()  # teacher piece -> teacher id
        self.special_ids = {  # the teacher ids the data code uses
            "cls": hf_tokenizer.cls_token_id,
            "sep": hf_tokenizer.sep_token_id,
            "pad": hf_tokenizer.pad_token_id,
            "unk": hf_tokenizer.unk_token_id,
            "mask": hf_tokenizer.mask_token_id,
        }
        missing = [k for k, v in self.special_ids.items() if v is None]
        if missing:
            raise UserError(f"teacher tokenizer {name!r} lacks the special tokens {missing}")

    @classmethod
    def load(cls, path_or_name: str | os.PathLike) -> TeacherTokenizer:
        """Loads ``AutoTokenizer.from_pretrained(path_or_name)``. A path that does not
        exist is reported as such (not as a bad Hugging Face Hub id)."""
        from transformers import AutoTokenizer

        from distill_jax.hf import CheckpointError, local_folder_or_hub_id, not_a_local_folder

        try:
            folder = local_folder_or_hub_id(path_or_name)
        except CheckpointError as err:
            raise UserError(f"cannot load the teacher tokenizer: {err}") from None
        try:
            hf = AutoTokenizer.from_pretrained(str(path_or_name))
        except (OSError, ValueError) as err:
            hub = "" if folder is not None else f" {not_a_local_folder(path_or_name)} it failed:"
            raise UserError(
                f"cannot load the teacher tokenizer {str(path_or_name)!r}:{hub} {err}"
            ) from err
        return cls(hf, str(path_or_name))

    @property
    def vocab_sha256(self) -> str:
        """Hash of the teacher's piece -> id table (identifies the tokenizer's vocabulary)."""
        items = sorted(self.vocab.items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()

    @property
    def spec(self) -> dict:
        """The backend's ``tokenizer.json`` as a dict (normalizer, pre-tokenizer, model)."""
        return json.loads(self._backend.to_str())

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[str]]:
        """WordPiece pieces of each text (lowercased / accents stripped when uncased)."""
        return [e.tokens for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]


def text_pipeline(tokenizer: TeacherTokenizer) -> dict:
    """What of the teacher's tokenizer the student's encodes text with: its normalizer and
    pre-tokenizer (as ``tokenizer.json`` writes them) and its WordPiece continuation prefix
    and word-length bound."""
    spec = tokenizer.spec
    model = spec.get("model") or {}
    if model.get("type") != "WordPiece":
        raise UserError(
            f"teacher tokenizer {tokenizer.name!r} is not WordPiece ({model.get('type')!r})"
        )
    return {
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "continuing_subword_prefix": model.get("continuing_subword_prefix", "##"),
        "max_input_chars_per_word": model.get("max_input_chars_per_word", 100),
    }


def _pipeline_sha256(pipeline) -> str:
    return hashlib.sha256(json.dumps(pipeline, sort_keys=True).encode()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def join_pieces(pieces: Iterable[str]) -> list[str]:
    """WordPiece pieces -> words: ``##`` continuations glued to the piece before them."""
    words: list[str] = []
    for piece in pieces:
        if piece.startswith("##") and words:
            words[-1] += piece[2:]
        else:
            words.append(piece)
    return words


def detokenize(pieces: Iterable[str]) -> str:
    """Text of WordPiece pieces as people write it: ``join_pieces``, then
    ``metrics.detokenize_words`` (clitics, intra-word hyphens, punctuation, brackets and
    quotes attached: ``dog's``, ``red-painted``, ``sign: "tenho em mim"``)."""
    from distill_jax.metrics import detokenize_words

    return detokenize_words(join_pieces(pieces))


@dataclass
class Vocabulary:
    """Student vocabulary: ``pieces[i]`` is the string of id ``i``; see the module docstring."""

    pieces: tuple[str, ...]  # every token string, indexed by student id
    teacher_ids: np.ndarray  # [V] int32, student id -> teacher id
    teacher: str  # the teacher tokenizer's path or hub name
    teacher_vocab_sha256: str  # hash of the teacher vocabulary the ids refer to
    teacher_special_ids: dict  # teacher ids of cls, sep, pad, unk, mask
    tokenizer: TeacherTokenizer | None = field(default=None, repr=False, compare=False)
    # the teacher's text pipeline the ids were made with (``text_pipeline``); None: unknown
    # yet (a vocabulary saved before it was kept), taken from the teacher's tokenizer
    pipeline: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.ids = {p: i for i, p in enumerate(self.pieces)}  # piece -> student id
        self._wordpiece = None  # built by wordpiece_tokenizer

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def sha256(self) -> str:
        """Content hash: pieces, teacher ids and the teacher vocabulary's hash."""
        payload = json.dumps(
            [list(self.pieces), self.teacher_ids.tolist(), self.teacher_vocab_sha256],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def name(self) -> str:
        """A short readable identifier: teacher folder name, size and hash prefix."""
        return f"{Path(self.teacher).name}-{len(self)}-{self.sha256[:12]}"

    # --- building -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        tokenized_train: Iterable[Sequence[str]],
        tokenizer: TeacherTokenizer,
        *,
        min_count: int = 1,
        size_multiple: int = 8,
    ) -> Vocabulary:
        """Vocabulary of the pieces in ``tokenized_train`` (source and target lines).

        Pieces seen fewer than ``min_count`` times are left out, except single characters
        (``x`` and ``##x``), which are kept so that rarer pieces can be spelled with them.
        """
        if min_count < 1 or size_multiple < 1:
            raise UserError(
                f"min_count ({min_count}) and size_multiple ({size_multiple}) must be >= 1"
            )
        counts = collections.Counter(p for line in tokenized_train for p in line)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        kept = sorted(
            (p for p, c in counts.items() if c >= min_count or len(p.removeprefix("##")) == 1),
            key=lambda p: (-counts[p], p),
        )
        pieces = list(SPECIAL_TOKENS) + kept
        pieces += [FILLER.format(i) for i in range(-len(pieces) % size_multiple)]
        sp = tokenizer.special_ids
        special_teacher = {"<pad>": sp["pad"], "<s>": sp["cls"], "</s>": sp["sep"]}
        teacher_ids = np.array(
            [special_teacher.get(p, tokenizer.vocab.get(p, sp["unk"])) for p in pieces],
            dtype=np.int32,
        )
        return cls(
            tuple(pieces),
            teacher_ids,
            tokenizer.name,
            tokenizer.vocab_sha256,
            dict(sp),
            tokenizer,
            text_pipeline(tokenizer),
        )

    # --- encoding / decoding ---------------------------------------------------------------

    def wordpiece_tokenizer(self):
        """The student's own tokenizer (a ``tokenizers.Tokenizer``): the teacher's normalizer
        and pre-tokenizer (BERT's lowercasing, accent stripping, whitespace and punctuation
        splitting), then WordPiece over the student pieces with the teacher's ``##`` prefix
        and word-length bound; a word the pieces cannot spell is one ``<unk>``. No specials
        are added, no padding or truncation. ``export`` adds a post-processor and decoder to
        this same tokenizer, so the exported tokenizer's ids are ours by construction."""
        if self._wordpiece is None:
            from tokenizers import Tokenizer, models

            if self.pipeline is None:  # saved without it: attaching the teacher's sets it
                self._require_tokenizer()
            pipeline = self.pipeline
            model = models.WordPiece(
                dict(self.ids),
                unk_token=self.pieces[UNK],
                continuing_subword_prefix=pipeline["continuing_subword_prefix"],
                max_input_chars_per_word=pipeline["max_input_chars_per_word"],
            )
            spec = json.loads(Tokenizer(model).to_str())
            spec["normalizer"] = pipeline["normalizer"]
            spec["pre_tokenizer"] = pipeline["pre_tokenizer"]
            self._wordpiece = Tokenizer.from_str(json.dumps(spec))
        return self._wordpiece

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Student ids of each text (no ``</s>`` added), by ``wordpiece_tokenizer``."""
        encodings = self.wordpiece_tokenizer().encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode(self, text: str) -> list[int]:
        """Student ids of ``text`` (no ``</s>`` added)."""
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of student ids: stops at the first ``</s>``, drops ``<pad>``, ``<s>`` and
        fillers, then ``detokenize`` (``##`` continuations joined, the words written as
        text: ``dog's``, ``red-painted``). ``<unk>`` stays visible as ``<unk>``. Only the
        rendering is text-level: ``encode(decode(ids))`` need not give ``ids`` back."""
        pieces = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if (
                i in (PAD, BOS)
                or not 0 <= i < len(self.pieces)
                or self.pieces[i].startswith("<fill_")
            ):
                continue
            pieces.append(self.pieces[i])
        return detokenize(pieces)

    def _require_tokenizer(self) -> TeacherTokenizer:
        """The attached teacher tokenizer; loaded from ``self.teacher`` on first use."""
        if self.tokenizer is None:
            self.attach_tokenizer(TeacherTokenizer.load(self.teacher))
        return self.tokenizer

    def attach_tokenizer(self, tokenizer: TeacherTokenizer) -> None:
        """Attaches the teacher's ``tokenizer`` after checking its vocabulary. A vocabulary
        that has its text pipeline keeps encoding with it (the one its ids were made with);
        one saved without takes the tokenizer's."""
        if tokenizer.vocab_sha256 != self.teacher_vocab_sha256:
            raise UserError(
                f"tokenizer {tokenizer.name!r} (vocabulary sha256 {tokenizer.vocab_sha256[:16]}) "
                f"is not the one this vocabulary was built with, {self.teacher!r} "
                f"(vocabulary sha256 {self.teacher_vocab_sha256[:16]})"
            )
        self.tokenizer = tokenizer
        if self.pipeline is None:
            self.pipeline = text_pipeline(tokenizer)
        self._wordpiece = None

    # --- persistence -----------------------------------------------------------------------

    def to_json(self) -> dict:
        """A JSON-able dict with everything needed to rebuild the vocabulary and encode text
        with it (the text pipeline, with its own hash: the vocabulary's ``sha256``, which
        datasets and caches record, is what it was before the pipeline was kept)."""
        data = {
            "format": VOCAB_FORMAT,
            "name": self.name,
            "sha256": self.sha256,
            "teacher": self.teacher,
            "teacher_vocab_sha256": self.teacher_vocab_sha256,
            "teacher_special_ids": self.teacher_special_ids,
            "pieces": list(self.pieces),
            "teacher_ids": self.teacher_ids.tolist(),
        }
        if self.pipeline is not None:
            data["text_pipeline"] = self.pipeline
            data["text_pipeline_sha256"] = _pipeline_sha256(self.pipeline)
        return data

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary as JSON (atomically)."""
        _atomic_write_text(Path(path), json.dumps(self.to_json(), ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: TeacherTokenizer | None = None) -> Vocabulary:
        """Reads a vocabulary saved by ``save``; checks its format and hash."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the vocabulary {path}: {err}") from err
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise UserError(
                f"{path} is not a distill-jax vocabulary (format "
                f"{data.get('format') if isinstance(data, dict) else None!r}, "
                f"expected {VOCAB_FORMAT!r})"
            )
        pipeline = data.get("text_pipeline")
        if pipeline is not None and _pipeline_sha256(pipeline) != data.get("text_pipeline_sha256"):
            raise UserError(
                f"{path}: the text pipeline's hash {_pipeline_sha256(pipeline)} differs from "
                f"the recorded {data.get('text_pipeline_sha256')} (the file was edited or is "
                f"corrupt)"
            )
        vocab = cls(
            tuple(data["pieces"]),
            np.asarray(data["teacher_ids"], np.int32),
            data["teacher"],
            data["teacher_vocab_sha256"],
            data["teacher_special_ids"],
            pipeline=pipeline,
        )
        if vocab.sha256 != data["sha256"]:
            raise UserError(
                f"{path}: content hash {vocab.sha256} differs from the recorded "
                f"{data['sha256']} (the file was edited or is corrupt)"
            )
        if tokenizer is not None:
            vocab.attach_tokenizer(tokenizer)
        return vocab
