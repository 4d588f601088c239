"""Text as people write it: Vocabulary.decode (generate's and every scored hypothesis's text)
detokenizes the student's pieces: clitics, intra-word hyphens, quotes and brackets attached."""

import os
import sys

import pytest

from distill_jax.data.vocab import TeacherTokenizer, Vocabulary, join_pieces
from distill_jax.metrics import detokenize_words, moses_tokens

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import perfect_hypothesis_bleu  # noqa: E402

# (text as written, lowercased: the uncased teacher lowercases) -> round trips unchanged.
WRITTEN = [
    "a woman holds her dog's face in her hands.",  # issue #32's three examples
    "a typical scene in front of a red-painted building.",
    'a man holds a sign: "tenho em mim"',
    "i don't know what they're doing, it's 10:30 (maybe later).",
    "the players' uniforms and the coaches' hats.",  # plural possessives
    "a sign that says 'free dinner' and michael jackson's 'thriller' video.",
    "hors d'oeuvres at the u.s. embassy, example.com and a&m -- the #8 jersey.",
    "1,000 people paid $2.50 each; 50% left... why?!",
    "a black-and-white dog and a salt-and-pepper-haired man.",
    "sport- und freizeitkleidung, schutzhelm und -handschuhe, ein „open“-schild.",
]


@pytest.fixture(scope="module")
def vocab(minilm_dir):
    """A vocabulary of the examples' own pieces (every piece spelled as the teacher does)."""
    tokenizer = TeacherTokenizer.load(minilm_dir)
    return Vocabulary.build(tokenizer.tokenize_batch(WRITTEN), tokenizer)


@pytest.mark.parametrize("text", WRITTEN)
def test_written_text_round_trips(vocab, text):
    assert vocab.decode(vocab.encode(text)) == text


def test_issue_examples_from_split_words():
    """The words the pre-fix decode wrote (issue #32) come back as written."""
    assert (
        detokenize_words("a woman holds her dog ' s face".split()) == "a woman holds her dog's face"
    )
    assert detokenize_words("a red - painted building".split()) == "a red-painted building"
    assert detokenize_words('sign : " tenho em mim "'.split()) == 'sign: "tenho em mim"'


def test_decode_keeps_ids_and_specials(vocab):
    """Only the rendering changed: EOS stops, pad/BOS dropped, <unk> visible; the words
    joined are the pieces' own."""
    ids = vocab.encode(WRITTEN[0])
    assert vocab.decode([1] + ids + [2] + ids) == WRITTEN[0]
    assert vocab.decode([3] + vocab.encode("dog's face")) == "<unk> dog's face"
    assert join_pieces(["dog", "##s", "'", "s"]) == ["dogs", "'", "s"]


def test_tokenized_bleu_input_unchanged():
    """Tokenized BLEU Moses-tokenizes hypotheses with rejoin: the detokenized text gives the
    tokens the split words gave."""
    for words in (
        "a woman holds her dog ' s face .",
        "a red - painted building",
        "it ' s 1 , 000 - - or 2 . 5",
        'a sign : " tenho em mim "',
    ):
        assert moses_tokens(detokenize_words(words.split()), rejoin=True) == moses_tokens(
            words, rejoin=True
        )


@pytest.mark.slow
def test_perfect_hypothesis_scores_over_99_5(shared_data, minilm_dir):
    """Every Multi30k English split we may use: each reference through encode -> decode,
    detokenized case-insensitive sacreBLEU against the references (96.94 val / 97.68
    test2016 before the fix: --pre-fix)."""
    scores = perfect_hypothesis_bleu.scores(shared_data / "multi30k", minilm_dir)
    print({split: round(s["bleu"], 2) for split, s in scores.items()})
    assert set(scores) == {"train", "val", "test2016"}
    assert all(s["bleu"] >= 99.5 for s in scores.values()), scores
    before = perfect_hypothesis_bleu.scores(
        shared_data / "multi30k", minilm_dir, splits=("val",), pre_fix=True
    )
    assert before["val"]["bleu"] < 97.5
