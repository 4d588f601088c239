"""IWSLT14 de-en (fairseq's recipe) through ``distill-jax prepare --dataset iwslt14_de_en`` on a
small synthetic ``de-en.tgz`` with the real archive's layout, and tokenized BLEU."""

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile

import pytest

from distill_jax import metrics
from distill_jax.cli import main
from distill_jax.data import iwslt14
from distill_jax.data.prepared import open_prepared

import tiny_experiment

pytest.importorskip("sacremoses")

# 50 aligned talk lines: pair i is "Satz Nummer i hier." / "Sentence number i here."; a few
# are made to be dropped by the cleaning step. (German Moses keeps "23." whole: an ordinal.)
TOO_LONG = 60 * "sehr lange "  # 120 words + ... > 175 tokens once "." and more are added
TRAIN_DE = [f"Satz Nummer {i} hier." for i in range(50)]
TRAIN_EN = [f"Sentence number {i} here." for i in range(50)]
TRAIN_DE[5], TRAIN_EN[5] = "Ja.", "Yes, of course it is, my friend."  # ratio > 1.5
TRAIN_DE[9], TRAIN_EN[9] = TOO_LONG * 2, "long " * 176  # > 175 tokens
TRAIN_DE[12], TRAIN_EN[12] = "   ", "An empty German side."  # empty
TRAIN_DE[20], TRAIN_EN[20] = "Es ist „gut“, oder?", "It's \"good\", isn't it?"
HEADER_DE = [
    "<url>http://www.ted.com/talks/x.html</url>",
    "<keywords>talks, de</keywords>",
    "<talkid>1</talkid>",
    "<title>Ein Titel</title>",
    "<description>Eine Beschreibung.</description>",
]
HEADER_EN = [
    "<url>http://www.ted.com/talks/x.html</url>",
    "<keywords>talks, en</keywords>",
    "<talkid>1</talkid>",
    "<title>A Title</title>",
    "<description>A description.</description>",
]


def _xml(lang, name, segments):
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<mteval>",
        f'<srcset setid="{name}" srclang="{lang}">',
        '<doc docid="1" genre="lectures">',
        "<url>http://www.ted.com/talks/x.html</url>",
    ]
    lines += [f'<seg id="{i}"> {text} </seg>' for i, text in enumerate(segments, 1)]
    return "\n".join(lines + ["</doc>", "</srcset>", "</mteval>"]) + "\n"


def _test_segments(name, lang):
    word = {"de": "Prüfung", "en": "Test"}[lang]
    return [f"{word} {name} eins.", f"{word} {name} zwei\u2019s."]


def _archive(path, *, drop=None):
    """A de-en.tgz laid out as the IWSLT14 one (top folder de-en/)."""
    files = {
        "train.tags.de-en.de": "\n".join(HEADER_DE + TRAIN_DE) + "\n",
        "train.tags.de-en.en": "\n".join(HEADER_EN + TRAIN_EN) + "\n",
        "README": "synthetic\n",
    }
    for name in iwslt14.TEST_SETS + ("IWSLT14.TED.tst2013",):  # tst2013: not in test
        for lang in ("de", "en"):
            files[f"{name}.de-en.{lang}.xml"] = _xml(lang, name, _test_segments(name, lang))
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            if name == drop:
                continue
            data = text.encode()
            info = tarfile.TarInfo(f"de-en/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _prepare(data, out, minilm_dir):
    return tiny_experiment.prepare_in_process("iwslt14_de_en", data, minilm_dir, out)


def test_prepare_iwslt14_from_archive(tmp_path, minilm_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    archive = _archive(data / "de-en.tgz")
    out = tmp_path / "out"
    assert _prepare(data, out, minilm_dir) == 0
    captured = capsys.readouterr()
    printed = captured.out
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert f"de-en.tgz: SHA-256 {digest} (no published checksum" in printed
    assert "differ from fairseq's" in captured.err  # a warning, through logging

    ds = open_prepared(out)
    assert ds.meta["corpus"] == "iwslt14_de_en" and ds.meta["direction"] == "de-en"
    assert ds.meta["tfds_name"].endswith("/iwslt14_de_en")
    assert ds.meta["text"] == {
        "tokenizer": "moses",
        "lowercase": True,
        "src_lang": "de",
        "tgt_lang": "en",
    }
    # 2 tag-stripped metadata lines (title, description) + 50 talk lines - 3 cleaned away
    # = 49 pairs; the 23rd and 46th go to valid.
    assert {s: c["lines"] for s, c in ds.meta["splits"].items()} == {
        "train": 47,
        "valid": 2,
        "test": 10,
    }

    def texts(split):
        source = ds.source(split)
        records = [source[i] for i in range(len(source))]
        return [(r["src_text"].decode(), r["tgt_text"].decode()) for r in records]

    train, valid, test = texts("train"), texts("valid"), texts("test")
    assert train[:3] == [
        ("ein titel", "a title"),
        ("eine beschreibung .", "a description ."),
        ("satz nummer 0 hier .", "sentence number 0 here ."),
    ]
    cleaned = [("ein titel", "a title"), ("eine beschreibung .", "a description .")] + [
        (f"satz nummer {i} hier .", f"sentence number {i} here .")
        for i in range(50)
        if i not in (5, 9, 12)
    ]
    cleaned[20 + 2 - 3] = ("es ist „ gut “ , oder ?", "it 's \" good \" , isn 't it ?")
    assert valid == [cleaned[22], cleaned[45]]
    assert train == [p for i, p in enumerate(cleaned, 1) if i % 23]
    # test: dev2010, dev2012, tst2010-2012 in that order, ’ -> ', not tst2013
    assert [t[1] for t in test[:2]] == [
        "test iwslt14.ted.dev2010 eins .",
        "test iwslt14.ted.dev2010 zwei 's .",
    ]
    assert test[-1][0] == "prüfung iwslt14.ted.tst2012 zwei ' s."  # German Moses rules
    assert not any("tst2013" in t[0] for t in test)


def test_iwslt14_archive_checks(tmp_path, minilm_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _archive(data / "de-en.tgz", drop="IWSLT14.TED.tst2011.de-en.en.xml")
    assert _prepare(data, tmp_path / "out", minilm_dir) == 2
    assert "lacks ['IWSLT14.TED.tst2011.de-en.en.xml']" in capsys.readouterr().err

    _archive(data / "de-en.tgz")
    (data / "SHA256SUMS").write_text(f"{'0' * 64}  de-en.tgz\n")
    assert _prepare(data, tmp_path / "out", minilm_dir) == 2
    assert re.search(r"de-en.tgz: SHA-256 [0-9a-f]{64} differs", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()

    assert (
        main(
            [
                "prepare",
                "--dataset",
                "iwslt14_de_en",
                "--direction",
                "en-de",
                "--data-dir",
                str(data),
                "--teacher",
                str(minilm_dir),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "only the direction 'de-en'" in capsys.readouterr().err


def test_cleaning_rules():
    assert iwslt14.keep_pair("a b", "c d e")  # ratio 1.5 is kept
    assert not iwslt14.keep_pair("a b", "c d e f")  # 2.0
    assert not iwslt14.keep_pair("", "a")
    assert iwslt14.keep_pair(" ".join("a" * 175), " ".join("b" * 175))
    assert not iwslt14.keep_pair(" ".join("a" * 176), " ".join("b" * 176))
    assert not iwslt14.keep_pair("x" * 1001, "y")
    assert iwslt14.training_text(["<url>u</url>", "<title>T</title>", "text"]) == ["T", "text"]
    assert iwslt14.segments(['<seg id="3">  It\u2019s  </seg>', "<doc>"]) == ["It's"]


# ----------------------------------------------------------------------------- tokenized BLEU


REFS = ["It's a well-known fact -- really, isn't it?", "We sold 1,000 cars at 2.5 dollars."]
# What the student's WordPiece output looks like for the same sentences (vocab.decode).
WORDPIECE = [
    "it ' s a well - known fact - - really, isn ' t it?",
    "we sold 1, 000 cars at 2. 5 dollars.",
]


def test_tokenized_bleu_rebuilds_moses_tokens():
    assert (
        metrics.moses_tokens(WORDPIECE[0], rejoin=True)
        == "it 's a well-known fact -- really , isn 't it ?"
    )
    tokenized_refs = [metrics.moses_tokens(r).lower() for r in REFS]
    assert tokenized_refs[1] == "we sold 1,000 cars at 2.5 dollars ."
    for refs, flag in ((REFS, False), (tokenized_refs, True)):
        got = metrics.tokenized_bleu(WORDPIECE, refs, references_tokenized=flag)
        assert got["bleu"] == pytest.approx(100.0)
        assert got["signature"].startswith("moses-tok:en|") and "tok:none" in got["signature"]
    # Detokenized sacreBLEU sees the WordPiece spacing as errors.
    assert metrics.bleu(WORDPIECE, REFS, lowercase=True)["bleu"] < 60
    # Escaped references (fairseq's files) score the same.
    escaped = [r.replace("'", "&apos;") for r in tokenized_refs]
    assert metrics.tokenized_bleu(WORDPIECE, escaped, references_tokenized=True)[
        "bleu"
    ] == pytest.approx(100.0)
    assert (
        metrics.moses_detokenize("it 's a well-known fact , isn 't it ?")
        == "it's a well-known fact, isn't it?"
    )


def test_evaluate_reports_both_bleus(tmp_path):
    (tmp_path / "hyp.txt").write_text("\n".join(WORDPIECE) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n")
    args = [
        sys.executable,
        "-m",
        "distill_jax.cli",
        "evaluate",
        "--hyp",
        str(tmp_path / "hyp.txt"),
        "--ref",
        str(tmp_path / "ref.txt"),
        "--lowercase",
    ]
    result = subprocess.run(args + ["--metric", "all"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^BLEU = \d+\.\d\d  \(detokenized sacreBLEU, ", result.stdout, re.M)
    assert "tokenized BLEU = 100.00  (Moses-tokenized, lowercased" in result.stdout
    result = subprocess.run(
        args + ["--metric", "bleu_tok", "--json"], capture_output=True, text=True
    )
    scores = json.loads(result.stdout)
    assert set(scores) == {"bleu_tok", "bleu_tok_signature"}
    assert scores["bleu_tok"] == pytest.approx(100.0)


@pytest.mark.slow
def test_score_split_adds_tokenized_bleu_on_the_iwslt14_corpus(tmp_path, minilm_dir):
    """On a corpus stored Moses-tokenized, the student's scores carry bleu_tok (tokenized
    BLEU) beside bleu (detokenized sacreBLEU), each with its signature; a tiny untrained
    student decodes 4 test sentences."""
    import jax
    from flax import linen as nn

    from distill_jax import configlib, sharding, student, trainer
    from distill_jax.translate import TrainedModel

    data = tmp_path / "data"
    data.mkdir()
    _archive(data / "de-en.tgz")
    assert _prepare(data, tmp_path / "out", minilm_dir) == 0
    ds = open_prepared(tmp_path / "out")
    config = configlib.load_config_file("configs/tiny.py")
    model = student.build_model(config, ds.vocab, jax.numpy.float32)
    params = nn.meta.unbox(trainer.abstract_init(model, jax.random.PRNGKey(0), 2)())
    trained = TrainedModel(model, params, ds.vocab, sharding.make_mesh(config.mesh))
    scores, hypotheses = student.score_split(trained, ds, "test", config.decode, limit=4)
    assert len(hypotheses) == 4
    assert {"bleu", "bleu_signature", "bleu_tok", "bleu_tok_signature"} <= set(scores)
    assert "tok:13a" in scores["bleu_signature"]
    assert scores["bleu_tok_signature"].startswith("moses-tok:en|")
