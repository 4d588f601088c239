"""IWSLT15 en-vi (the Stanford NMT group's files) through ``distill-jax prepare --dataset
iwslt15_en_vi`` on a small synthetic copy of the six files, with the published line counts
replaced by the copy's; tokenized BLEU on Vietnamese, with and without case."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from distill_jax import configlib, metrics
from distill_jax.cli import main
from distill_jax.data import builders, iwslt15
from distill_jax.data.prepared import open_prepared

import tiny_experiment

pytest.importorskip("sacremoses")

# As the Stanford files are: Moses-tokenized, cased, Moses' XML escapes, one sentence a line.
TRAIN_EN = [
    f"It &apos;s sentence {i} , &quot; Mr. Pike &quot; said &#91; laughter &#93; ."
    for i in range(10)
]
TRAIN_VI = [
    f"Đây là câu {i} , &quot; ông Pike &quot; nói &#91; tiếng cười &#93; ." for i in range(10)
]
TRAIN_EN[3], TRAIN_VI[3] = (
    "R &amp; D costs &amp;quot; a lot &amp;quot; ; a &#124; b",
    "Nghiên cứu &amp; Phát triển tốn &amp;quot; nhiều &amp;quot; ; a &#124; b",
)
TRAIN_EN[7], TRAIN_VI[7] = "   ", "Một dòng tiếng Anh trống ."  # empty side
VALID_EN = ["Thank you .", "We &apos;re in Việt Nam &lt; 3 &gt; .", "Hello"]
VALID_VI = ["Cảm ơn .", "Chúng tôi ở Việt Nam &lt; 3 &gt; .", "Xin chào"]
TEST_EN = ["Applause .", "THE END ."]
TEST_VI = ["Vỗ tay .", "HẾT ."]
FILES = {
    "train.en": TRAIN_EN,
    "train.vi": TRAIN_VI,
    "tst2012.en": VALID_EN,
    "tst2012.vi": VALID_VI,
    "tst2013.en": TEST_EN,
    "tst2013.vi": TEST_VI,
}
COUNTS = {"train": 10, "tst2012": 3, "tst2013": 2}


@pytest.fixture
def small_corpus(monkeypatch):
    """The iwslt15_en_vi corpus with this module's line counts in place of the published."""
    spec = dataclasses.replace(
        builders.IWSLT15_EN_VI,
        line_counts={f"{stem}.{lang}": n for stem, n in COUNTS.items() for lang in ("en", "vi")},
    )
    monkeypatch.setitem(builders.CORPORA, "iwslt15_en_vi", spec)
    return spec


def _write_files(data: Path, files=FILES) -> Path:
    data.mkdir(exist_ok=True)
    for name, lines in files.items():
        (data / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return data


def _prepare(data, out, minilm_dir, *extra):
    return tiny_experiment.prepare_in_process("iwslt15_en_vi", data, minilm_dir, out, *extra)


def test_published_line_counts():
    spec = builders.IWSLT15_EN_VI
    assert spec.line_counts == {
        "train.en": 133317,
        "train.vi": 133317,
        "tst2012.en": 1553,
        "tst2012.vi": 1553,
        "tst2013.en": 1268,
        "tst2013.vi": 1268,
    }
    assert spec.files("en-vi") == {
        "train": ("train.en", "train.vi"),
        "valid": ("tst2012.en", "tst2012.vi"),
        "test": ("tst2013.en", "tst2013.vi"),
    }
    assert (
        spec.urls["tst2013.vi"]
        == "https://nlp.stanford.edu/projects/nmt/data/iwslt15.en-vi/tst2013.vi"
    )
    assert builders.config_name("iwslt15_en_vi", "en-vi") == "iwslt15_en_vi"


def test_prepare_iwslt15_from_files(tmp_path, small_corpus, minilm_dir, capsys):
    data = _write_files(tmp_path / "data")
    # A SHA256SUMS beside the files is honoured (here: the right hashes).
    (data / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((data / n).read_bytes()).hexdigest()}  {n}\n" for n in FILES)
    )
    out = tmp_path / "out"
    assert _prepare(data, out, minilm_dir) == 0
    printed = capsys.readouterr().out
    for name in FILES:
        digest = hashlib.sha256((data / name).read_bytes()).hexdigest()
        assert f"{name}: SHA-256 {digest} (no published checksum; line count checked" in printed

    ds = open_prepared(out)
    assert ds.meta["corpus"] == "iwslt15_en_vi" and ds.meta["direction"] == "en-vi"
    assert ds.meta["tfds_name"].endswith("/iwslt15_en_vi")
    assert ds.meta["text"] == {
        "tokenizer": "moses",
        "lowercase": False,
        "src_lang": "en",
        "tgt_lang": "vi",
    }
    splits = ds.meta["splits"]
    assert {s: (c["lines"], c["kept"], c["dropped_empty"]) for s, c in splits.items()} == {
        "train": (10, 9, 1),
        "valid": (3, 3, 0),
        "test": (2, 2, 0),
    }
    config = configlib.load_config_file("configs/iwslt15_en_vi.py")
    assert config.data.valid_split in splits and set(config.data.test_splits) <= set(splits)

    def texts(split):
        source = ds.source(split)
        records = [source[i] for i in range(len(source))]
        return [(r["src_text"].decode(), r["tgt_text"].decode(), int(r["line"])) for r in records]

    train = texts("train")
    assert [t[2] for t in train] == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # line 7: empty English
    assert train[0][:2] == (
        'It \'s sentence 0 , " Mr. Pike " said [ laughter ] .',
        'Đây là câu 0 , " ông Pike " nói [ tiếng cười ] .',
    )
    # &amp; last, as Moses' deescape script: "&amp;quot;" is the text "&quot;".
    assert train[3][:2] == (
        "R & D costs &quot; a lot &quot; ; a | b",
        "Nghiên cứu & Phát triển tốn &quot; nhiều &quot; ; a | b",
    )
    assert [t[:2] for t in texts("valid")] == [
        ("Thank you .", "Cảm ơn ."),
        ("We 're in Việt Nam < 3 > .", "Chúng tôi ở Việt Nam < 3 > ."),
        ("Hello", "Xin chào"),
    ]
    assert [t[:2] for t in texts("test")] == [("Applause .", "Vỗ tay ."), ("THE END .", "HẾT .")]


def test_download_path_fetches_the_stanford_files(tmp_path, small_corpus):
    """Without --data-dir the six files come from the Stanford URLs (through TFDS's download
    manager, here a stand-in that serves local copies under download names)."""
    data = _write_files(tmp_path / "data")
    requested = []

    class Downloads:
        def download_and_extract(self, urls):
            requested.extend(urls)
            paths = []
            for url in urls:
                path = tmp_path / "dl" / f"nlp.stanford.edu_{url.rsplit('/', 1)[-1]}_0a1b"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes((data / url.rsplit("/", 1)[-1]).read_bytes())
                paths.append(str(path))
            return paths

    texts = builders.read_corpus(small_corpus, "en-vi", None, Downloads())
    assert sorted(requested) == sorted(
        f"https://nlp.stanford.edu/projects/nmt/data/iwslt15.en-vi/{n}" for n in FILES
    )
    assert texts["test"] == (["Applause .", "THE END ."], ["Vỗ tay .", "HẾT ."])
    assert texts["valid"][1][1] == "Chúng tôi ở Việt Nam < 3 > ."

    (data / "train.vi").write_text("".join(line + "\n" for line in TRAIN_VI[:4]))
    with pytest.raises(
        Exception,
        match=r"_0a1b \(downloaded train\.vi\) has 4 lines, but "
        r"iwslt15_en_vi's train\.vi has 10",
    ):
        builders.read_corpus(small_corpus, "en-vi", None, Downloads())


def _fails(tmp_path, minilm_dir, capsys, data, pattern, *extra):
    out = tmp_path / "out"
    assert _prepare(data, out, minilm_dir, *extra) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize(
    "case",
    ["missing file", "unequal lines", "wrong line count", "invalid utf-8", "checksum", "direction"],
)
def test_bad_input_is_named(tmp_path, small_corpus, minilm_dir, capsys, case):
    data = _write_files(tmp_path / "data")
    extra = ()
    if case == "missing file":
        (data / "tst2013.vi").unlink()
        pattern = r"tst2013\.vi: no such file"
    elif case == "unequal lines":
        _write_files(data, {"tst2012.vi": VALID_VI + ["Một dòng nữa ."]})
        pattern = r"tst2012\.vi has 4 lines, but iwslt15_en_vi's tst2012\.vi has 3"
    elif case == "wrong line count":  # aligned, but not the published size
        _write_files(data, {"train.en": TRAIN_EN[:9], "train.vi": TRAIN_VI[:9]})
        pattern = (
            r"train\.en has 9 lines, but iwslt15_en_vi's train\.en has 10: a truncated "
            r"download or a different copy"
        )
    elif case == "invalid utf-8":
        raw = (data / "train.vi").read_bytes().split(b"\n")
        raw[4] = raw[4].replace("câu".encode(), b"c\xe2u")
        (data / "train.vi").write_bytes(b"\n".join(raw))
        pattern = r"train\.vi, line 5: invalid UTF-8"
    elif case == "checksum":
        (data / "SHA256SUMS").write_text(f"{'0' * 64}  train.en\n")
        pattern = r"train\.en: SHA-256 [0-9a-f]{64} differs from 0{64} in .*SHA256SUMS"
    else:
        extra = ("--direction", "vi-en")
        pattern = r"corpus 'iwslt15_en_vi' has no direction 'vi-en'; choose one of \['en-vi'\]"
    _fails(tmp_path, minilm_dir, capsys, data, pattern, *extra)


def test_real_line_counts_apply_without_the_patch(tmp_path, minilm_dir, capsys):
    """The published counts are what a real run checks: the small copy is refused."""
    data = _write_files(tmp_path / "data")
    _fails(
        tmp_path,
        minilm_dir,
        capsys,
        data,
        r"train\.en has 10 lines, but iwslt15_en_vi's train\.en has 133317",
    )


def test_prepare_help_lists_the_dataset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--help"])
    assert exit_info.value.code == 0
    assert "'iwslt15_en_vi'" in capsys.readouterr().out


def test_unescape_moses():
    assert (
        iwslt15.unescape_moses("It &apos;s &quot; A &quot; &amp; &#91; b &#93; &#124; &lt; &gt;")
        == 'It \'s " A " & [ b ] | < >'
    )
    assert iwslt15.unescape_moses("&amp;quot; &amp;amp; AT&amp;T") == "&quot; &amp; AT&T"
    assert iwslt15.unescape_moses("&bar; &bra; &ket;") == "| [ ]"  # legacy escapes
    assert iwslt15.unescape_moses("&copy &nbsp; & ;") == "&copy &nbsp; & ;"  # not Moses'


# ----------------------------------------------------------------------------- tokenized BLEU

# Stored (unescaped, tokenized, cased) Vietnamese references and the student's WordPiece
# output for them (vocab.decode: no space before . , ? !, apostrophes split).
REFS_VI = [
    'Tôi nói , " xin chào " với Nguyễn ( ở Hà Nội ) .',
    "Đó là chiếc xe của John 's , giá 1,000 đô .",
]
WORDPIECE_VI = [
    'Tôi nói, " xin chào " với Nguyễn ( ở Hà Nội ).',
    "Đó là chiếc xe của John ' s, giá 1, 000 đô.",
]


def test_tokenized_bleu_in_vietnamese_keeps_case_when_asked():
    assert metrics.moses_tokens(WORDPIECE_VI[1], "vi", rejoin=True) == REFS_VI[1]
    cased = metrics.tokenized_bleu(
        WORDPIECE_VI, REFS_VI, lang="vi", references_tokenized=True, lowercase=False
    )
    assert cased["bleu"] == pytest.approx(100.0)
    assert cased["signature"].startswith("moses-tok:vi|") and "case:mixed" in cased["signature"]
    # Escaped references (the Stanford files as they are) score the same.
    escaped = [r.replace('"', "&quot;").replace("'", "&apos;") for r in REFS_VI]
    assert metrics.tokenized_bleu(
        WORDPIECE_VI, escaped, lang="vi", references_tokenized=True, lowercase=False
    )["bleu"] == pytest.approx(100.0)
    # Case differences count only when case is kept; diacritics always count.
    lower = [h.lower() for h in WORDPIECE_VI]
    assert (
        metrics.tokenized_bleu(
            lower, REFS_VI, lang="vi", references_tokenized=True, lowercase=False
        )["bleu"]
        < 80
    )
    lowercased = metrics.tokenized_bleu(lower, REFS_VI, lang="vi", references_tokenized=True)
    assert lowercased["bleu"] == pytest.approx(100.0) and "case:lc" in lowercased["signature"]
    no_marks = [h.replace("ó", "o") for h in WORDPIECE_VI]
    assert (
        metrics.tokenized_bleu(no_marks, REFS_VI, lang="vi", references_tokenized=True)["bleu"]
        < 100
    )


def test_evaluate_tok_cased(tmp_path, capsys):
    (tmp_path / "hyp.txt").write_text("\n".join(h.lower() for h in WORDPIECE_VI) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(REFS_VI) + "\n")
    args = [
        "evaluate",
        "--metric",
        "bleu_tok",
        "--lang",
        "vi",
        "--ref-tokenized",
        "--hyp",
        str(tmp_path / "hyp.txt"),
        "--ref",
        str(tmp_path / "ref.txt"),
    ]
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bleu_tok"] == pytest.approx(100.0)
    assert main(args + ["--tok-cased"]) == 0
    printed = capsys.readouterr().out
    assert re.search(
        r"tokenized BLEU = (\d+\.\d\d)  \(Moses-tokenized, cased, .*case:mixed", printed
    ), printed
    assert float(re.search(r"= (\d+\.\d\d)", printed).group(1)) < 80


@pytest.mark.slow
def test_score_split_scores_the_cased_corpus_with_cased_tokenized_bleu(
    tmp_path, small_corpus, minilm_dir
):
    """dataset.json says the En-Vi text is cased, so the student's bleu_tok keeps case (the
    reference's multi-bleu.perl without -lc), beside detokenized sacreBLEU."""
    import jax
    from flax import linen as nn

    from distill_jax import sharding, student, trainer
    from distill_jax.translate import TrainedModel

    assert _prepare(_write_files(tmp_path / "data"), tmp_path / "out", minilm_dir) == 0
    ds = open_prepared(tmp_path / "out")
    config = configlib.load_config_file("configs/tiny.py")
    model = student.build_model(config, ds.vocab, jax.numpy.float32)
    params = nn.meta.unbox(trainer.abstract_init(model, jax.random.PRNGKey(0), 2)())
    trained = TrainedModel(model, params, ds.vocab, sharding.make_mesh(config.mesh))
    scores, hypotheses = student.score_split(trained, ds, "test", config.decode)
    assert len(hypotheses) == 2
    assert scores["bleu_tok_signature"].startswith("moses-tok:vi|")
    assert "case:mixed" in scores["bleu_tok_signature"]
    assert "case:lc" in scores["bleu_signature"]
