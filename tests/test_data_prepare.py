"""``distill-jax prepare`` on small local corpora: counts, vocabulary, and every bad input."""

import re
import shutil

import numpy as np
import pytest

from distill_jax.cli import main
from distill_jax.data.prepared import open_prepared
from distill_jax.data.vocab import UNK, TeacherTokenizer, Vocabulary, detokenize

from tiny_experiment import local_corpus_args

TRAIN_SRC = ["ein hund läuft .", "", "zwei katzen schlafen", "ein " * 40, "der mann", "  "]
TRAIN_TGT = ["a dog runs .", "an empty source", "two cats sleep", "a long one", "", "x"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return TeacherTokenizer.load(minilm_dir)


def _write(folder, name, lines=None, raw: bytes | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode())


def _local_args(data, minilm_dir, *extra):
    return local_corpus_args(data, minilm_dir, ["train=train.src,train.tgt"], *extra)


def _fails(args, out, capsys, pattern):
    """prepare exits 2 with an error matching ``pattern`` and leaves nothing behind."""
    assert main(["prepare", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_local_corpus_counts_and_vocabulary(tmp_path, minilm_dir, tokenizer, capsys):
    data = tmp_path / "data"
    _write(data, "train.src", TRAIN_SRC)
    _write(data, "train.tgt", TRAIN_TGT)
    out = tmp_path / "out"
    assert (
        main(
            [
                "prepare",
                *_local_args(data, minilm_dir, "--max-src-len", "20", "--size-multiple", "16"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert re.search(r"train\s+6\s+2\s+3\s+1", printed), printed
    ds = open_prepared(out)
    assert ds.meta["splits"]["train"] == {
        "lines": 6,
        "kept": 2,
        "dropped_empty": 3,
        "dropped_too_long": 1,
    }
    source = ds.source("train")
    assert [int(source[i]["line"]) for i in range(len(source))] == [0, 2]
    # The vocabulary comes from every training line, dropped ones included.
    expected = Vocabulary.build(
        tokenizer.tokenize_batch(TRAIN_SRC) + tokenizer.tokenize_batch(TRAIN_TGT),
        tokenizer,
        size_multiple=16,
    )
    assert ds.vocab.pieces == expected.pieces and len(ds.vocab) % 16 == 0
    assert ds.vocab.decode(source[0]["src"]) == "ein hund lauft."


def test_training_text_encodes_to_its_teacher_pieces(shared_data, tokenizer):
    """With min_count 1 every teacher piece of the training text is a student piece, and the
    student's WordPiece then picks exactly the teacher's pieces; unseen text is spelled with
    student pieces (never <unk> for a word whose characters it has)."""
    train = (shared_data / "multi30k" / "train.de").read_text(encoding="utf-8").splitlines()[:500]
    pieces = tokenizer.tokenize_batch(train)
    vocab = Vocabulary.build(pieces, tokenizer)
    assert vocab.encode_batch(train) == [[vocab.ids[p] for p in line] for line in pieces]
    val = (shared_data / "multi30k" / "val.de").read_text(encoding="utf-8").splitlines()[:200]
    val_ids, val_pieces = vocab.encode_batch(val), tokenizer.tokenize_batch(val)
    unseen = [i for i, line in enumerate(val_pieces) if any(p not in vocab.ids for p in line)]
    spelled = [i for i in unseen if UNK not in val_ids[i]]
    assert len(spelled) > 20  # 500 pairs do not cover val's pieces
    for i in spelled:  # other pieces, the same text
        assert [vocab.pieces[j] for j in val_ids[i]] != val_pieces[i]
        assert vocab.decode(val_ids[i]) == detokenize(val_pieces[i])


def test_vocabulary_order_min_count_and_save_load(tmp_path, tokenizer):
    lines = [["b", "a", "a", "c", "##x"], ["b", "a", "dd", "dd", "dd", "dd"]]
    vocab = Vocabulary.build(lines, tokenizer, min_count=2)
    # dd 4, a 3, b 2; "c" and "##x" are kept (single characters) despite min_count 2.
    assert vocab.pieces[:9] == ("<pad>", "<s>", "</s>", "<unk>", "dd", "a", "b", "##x", "c")
    assert len(vocab) == 16 and vocab.pieces[9:] == tuple(f"<fill_{i}>" for i in range(7))
    assert vocab.teacher_ids[vocab.ids["dd"]] == tokenizer.vocab["dd"]
    assert vocab.teacher_ids[9] == tokenizer.special_ids["unk"]
    vocab.save(tmp_path / "v.json")
    again = Vocabulary.load(tmp_path / "v.json", tokenizer)
    assert again.pieces == vocab.pieces and again.sha256 == vocab.sha256
    np.testing.assert_array_equal(again.teacher_ids, vocab.teacher_ids)
    # Text is spelled with the student's pieces (lowercased as the teacher does); a word
    # they cannot spell is one <unk> ("adda": no "##d…" piece after "a"; "z": no piece).
    assert again.encode("DDXX adda z") == [4, 7, 7, UNK, UNK]
    assert again.encode_batch(["b c", ""]) == [[6, 8], []]
    assert again.decode([1, 4, 7, 2, 5]) == "ddx"
    # A corrupted file is refused.
    (tmp_path / "v.json").write_text((tmp_path / "v.json").read_text().replace('"dd"', '"de"'))
    with pytest.raises(Exception, match="hash"):
        Vocabulary.load(tmp_path / "v.json")


def test_line_count_mismatch(tmp_path, minilm_dir, capsys):
    data = tmp_path / "data"
    _write(data, "train.src", ["a", "b", "c"])
    _write(data, "train.tgt", ["a", "b"])
    _fails(
        _local_args(data, minilm_dir),
        tmp_path / "out",
        capsys,
        r"train\.src has 3 lines but .*train\.tgt has 2",
    )


def test_invalid_utf8(tmp_path, minilm_dir, capsys):
    data = tmp_path / "data"
    _write(data, "train.src", raw=b"good\nfine\nbad \xff byte\n")
    _write(data, "train.tgt", ["a", "b", "c"])
    _fails(
        _local_args(data, minilm_dir),
        tmp_path / "out",
        capsys,
        r"train\.src, line 3: invalid UTF-8",
    )


def test_checksum_mismatch(tmp_path, shared_data, minilm_dir, capsys):
    data = tmp_path / "multi30k"
    shutil.copytree(shared_data / "multi30k", data)
    with open(data / "val.en", "a", encoding="utf-8") as f:
        f.write("one more line\n")
    args = ["--dataset", "multi30k", "--data-dir", str(data), "--teacher", str(minilm_dir)]
    _fails(
        args,
        tmp_path / "out",
        capsys,
        r"val\.en: SHA-256 [0-9a-f]{64} differs from "
        r"1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    )


def test_upstream_dataset_without_tensorflow(tmp_path, minilm_dir, capsys):
    try:
        import tensorflow  # noqa: F401

        pytest.skip("TensorFlow is installed")
    except ImportError:
        pass
    _fails(
        ["--dataset", "wmt14_translate/de-en", "--teacher", str(minilm_dir)],
        tmp_path / "out",
        capsys,
        r"needs TensorFlow.*distill-jax\[tf\]",
    )


def test_existing_output_is_not_overwritten(tmp_path, minilm_dir, capsys):
    data = tmp_path / "data"
    _write(data, "train.src", ["a"])
    _write(data, "train.tgt", ["b"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prepare", *_local_args(data, minilm_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_saved_vocabulary_encodes_without_the_teacher(tmp_path, tokenizer, monkeypatch):
    """The teacher's text pipeline is saved with the vocabulary, so a saved vocabulary
    encodes (and exports) text as at prepare time with no teacher folder to read; a file
    saved before it was kept loads the teacher's tokenizer, as then; an edited pipeline is
    refused."""
    import json

    from distill_jax.data import vocab as vocab_module

    text = ["Zwei Männer, die ein rotes Auto waschen.", "ein hund läuft über die wiese ."]
    built = Vocabulary.build(tokenizer.tokenize_batch(text), tokenizer)
    expected = built.encode_batch(text + ["UNGESEHENE Wörter: zzz"])
    built.save(tmp_path / "v.json")
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["text_pipeline"]["normalizer"]["type"] == "BertNormalizer"

    def no_teacher(path):
        raise AssertionError(f"the teacher's tokenizer was loaded ({path})")

    with monkeypatch.context() as patch:
        patch.setattr(vocab_module.TeacherTokenizer, "load", no_teacher)
        again = Vocabulary.load(tmp_path / "v.json")
        assert again.encode_batch(text + ["UNGESEHENE Wörter: zzz"]) == expected
        assert again.sha256 == built.sha256  # the identity datasets record is unchanged

    # A vocabulary saved before the pipeline was kept: the teacher's tokenizer is read.
    legacy = {k: v for k, v in saved.items() if not k.startswith("text_pipeline")}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    loaded = []
    monkeypatch.setattr(
        vocab_module.TeacherTokenizer, "load", lambda path: loaded.append(path) or tokenizer
    )
    old = Vocabulary.load(tmp_path / "old.json")
    assert old.encode_batch(text + ["UNGESEHENE Wörter: zzz"]) == expected
    assert loaded == [built.teacher]

    edited = dict(saved, text_pipeline=dict(saved["text_pipeline"], normalizer=None))
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(Exception, match="text pipeline's hash"):
        Vocabulary.load(tmp_path / "edited.json")
