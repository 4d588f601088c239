"""Multi30k end to end: prepare, read back through tfds.data_source, round-trip, batching."""

import json
import unicodedata

import numpy as np
import pytest

from distill_jax.data.cmlm import masked_capacity, masked_positions
from distill_jax.data.pipeline import BatchPipeline, PipelineConfig
from distill_jax.data.prepared import open_prepared
from distill_jax.data.vocab import BOS, EOS, UNK, TeacherTokenizer, detokenize

SPLITS = {
    "train": 29000,
    "val": 1014,
    "test2016": 1000,
    "test2017": 1000,
    "mscoco2017": 461,
    "test2018": 1071,
}


@pytest.fixture(scope="module")
def prepared(multi30k_de_en):
    """Multi30k de-en prepared once for the session (conftest.multi30k_de_en: `distill-jax
    prepare`, by the quick demo when it runs in the session)."""
    return open_prepared(multi30k_de_en)


def _lines(path):
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _normalise(text: str) -> str:
    """What an uncased WordPiece round trip keeps: lowercase, no accents, no whitespace."""
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if unicodedata.category(c) != "Mn" and not c.isspace())


def test_all_splits_read_back_with_their_counts(prepared, shared_data):
    import tensorflow_datasets as tfds

    meta = json.loads((prepared.path / "dataset.json").read_text())
    assert {s: c["lines"] for s, c in meta["splits"].items()} == SPLITS
    for split, n in SPLITS.items():
        source = tfds.data_source(
            meta["tfds_name"], data_dir=str(prepared.path / "tfds"), split=split
        )
        assert len(source) == n == len(prepared.lengths(split))
    # Record i is line i, and its text is the file's line.
    source = prepared.source("val")
    de, en = (
        _lines(shared_data / "multi30k" / "val.de"),
        _lines(shared_data / "multi30k" / "val.en"),
    )
    for i in (0, 500, 1013):
        ex = source[i]
        assert ex["line"] == i
        assert ex["src_text"].decode() == de[i] and ex["tgt_text"].decode() == en[i]
        assert ex["src"][-1] == EOS and EOS not in ex["tgt"]
        np.testing.assert_array_equal(
            prepared.lengths("val")[i], [len(ex["src"]), len(ex["tgt"]) + 1]
        )


def test_vocabulary_ids(prepared, minilm_dir):
    vocab = prepared.vocab
    assert vocab.pieces[:4] == ("<pad>", "<s>", "</s>", "<unk>")
    assert len(vocab) % 8 == 0
    tok = TeacherTokenizer.load(minilm_dir)
    assert vocab.teacher_ids[:4].tolist() == [
        tok.special_ids[k] for k in ("pad", "cls", "sep", "unk")
    ]
    for i in (4, 100, 5000):
        assert vocab.teacher_ids[i] == tok.vocab[vocab.pieces[i]]
    # Frequency order: "." is among the most frequent pieces of the training split.
    assert vocab.ids["."] < 10


def test_test2016_round_trips(prepared, shared_data, minilm_dir):
    """decode(encode(line)) equals the line up to lowercasing, accents and whitespace,
    and equals the detokenized text of the teacher tokenizer's own pieces."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(minilm_dir))
    vocab = prepared.vocab
    source = prepared.source("test2016")
    unk_lines = 0
    for side, suffix in (("src", "de"), ("tgt", "en")):
        lines = _lines(shared_data / "multi30k" / f"test_2016_flickr.{suffix}")
        for i, line in enumerate(lines):
            ids = source[i][side].tolist()
            if UNK in ids:  # a character never seen in training
                unk_lines += 1
                continue
            text = vocab.decode(ids)
            assert _normalise(text) == _normalise(line), (i, line, text)
            reference = detokenize(hf.tokenize(line))
            assert text == reference, (i, text, reference)
    print(f"test2016: {unk_lines} of 2000 lines contain <unk> (not compared)")
    assert unk_lines <= 5


def _pipeline(prepared, **overrides):
    index, count = overrides.pop("process_index", 0), overrides.pop("process_count", 1)
    config = PipelineConfig(**{"seed": 3, "tokens_per_batch": 4096, **overrides})
    return BatchPipeline(
        prepared.source("train"),
        prepared.lengths("train"),
        config,
        process_index=index,
        process_count=count,
    )


def test_bucketing_padding_and_shapes(prepared):
    lengths = prepared.lengths("train")
    for step in (8, 4):
        stats = _pipeline(prepared, bucket_step=step).statistics()
        padded = -(-lengths // step) * step
        floor = 1 - lengths.sum() / padded.sum()  # padding from rounding lengths alone
        print(
            f"bucket_step {step}: padding {stats['padding_fraction']:.4f} "
            f"(rounding alone {floor:.4f}), {len(stats['shapes'])} shapes, "
            f"{stats['batches']} batches"
        )
        assert all(s % step == 0 and t % step == 0 and r % 8 == 0 for r, s, t in stats["shapes"])
        assert stats["padding_fraction"] < floor + 0.025  # batching adds little
        assert len(stats["shapes"]) <= 40
    # Multiples of 8 alone pad 15.4% of Multi30k train; multiples of 4 get under 15%.
    assert _pipeline(prepared, bucket_step=4).statistics()["padding_fraction"] < 0.15


def test_padded_lengths_stay_within_the_cap(prepared):
    """max_padded_len (the student's position table) caps rounded-up lengths: with
    bucket_step 16 and a cap of 20, pairs of 17-20 ids pad to 20, not 32; longer pairs are
    truncated (truncate=True) or dropped, and counted."""
    lengths = prepared.lengths("train")
    over = int((lengths > 20).any(axis=1).sum())
    assert over > 0
    for truncate in (True, False):
        pipeline = _pipeline(prepared, bucket_step=16, max_padded_len=20, truncate=truncate)
        shapes = pipeline.statistics()["shapes"]
        assert {s for _, s, _ in shapes} <= {16, 20} and {t for _, _, t in shapes} <= {16, 20}
        assert any(s == 20 for _, s, _ in shapes)
        counts = pipeline.counts
        assert counts["truncated" if truncate else "dropped_too_long"] == over
        batch = pipeline.load_batch(0)
        assert batch["src"].shape[1] <= 20 and batch["tgt_in"].shape[1] <= 20


def test_student_evaluation_batches_fit_the_position_table(prepared):
    """Validation keeps every pair but never pads past student.max_len: with bucket_step
    48 and max_len 64, a 50-id sentence pads to 64, not 96 (which gave a NaN validation
    loss before the cap)."""
    import dataclasses

    from distill_jax import configlib
    from distill_jax.student import student_pipeline

    config = configlib.load_config_file("configs/tiny.py")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, bucket_step=48))
    pipeline = student_pipeline(config, prepared, "val", 8, training=False)
    assert pipeline.counts["kept"] == 1014
    shapes = pipeline.statistics()["shapes"]
    assert max(max(s, t) for _, s, t in shapes) <= config.student.max_len
    assert any(s == 64 or t == 64 for _, s, t in shapes)  # some pair is longer than 48


def test_batches_hold_every_record_once_and_are_well_formed(prepared):
    pipeline = _pipeline(prepared, num_epochs=1, mlm_mask_rate=0.15)
    source = prepared.source("train")
    seen = []
    for batch in pipeline:
        rows = batch["index"]
        assert batch["src"].shape[0] % 8 == 0
        assert batch["src"].shape[0] * max(batch["src"].shape[1], batch["tgt_in"].shape[1]) <= 4096
        seen += rows[rows >= 0].tolist()
        for row in np.flatnonzero(rows >= 0)[:2]:
            ex = source[int(rows[row])]
            n, m = len(ex["src"]), len(ex["tgt"])
            assert batch["src"][row, :n].tolist() == ex["src"].tolist()
            assert batch["tgt_in"][row, : m + 1].tolist() == [BOS] + ex["tgt"].tolist()
            assert batch["tgt_out"][row, : m + 1].tolist() == ex["tgt"].tolist() + [EOS]
            assert not batch["src"][row, n:].any() and not batch["tgt_out"][row, m + 1 :].any()
        # C-MLM masks: only real target positions, at least one per real row.
        mask = batch["mlm_mask"]
        assert not (mask & (batch["tgt_out"] == 0)).any()
        assert mask[rows >= 0].any(axis=1).all()
        # ... and their positions, the width the teacher's output layer runs on.
        assert batch["mlm_positions"].shape == (
            len(rows),
            masked_capacity(batch["tgt_out"].shape[1], 0.15),
        )
        np.testing.assert_array_equal(
            batch["mlm_positions"], masked_positions(mask, batch["mlm_positions"].shape[1])
        )
    assert sorted(seen) == list(range(29000))


def test_hosts_split_disjoint_and_complete(prepared):
    per_host = []
    for host in range(4):
        p = _pipeline(prepared, num_epochs=1, process_index=host, process_count=4)
        it = iter(p)
        first = next(it)
        per_host.append(
            [i for i in first["index"].tolist()] + [i for b in it for i in b["index"].tolist()]
        )
    real = [set(i for i in h if i >= 0) for h in per_host]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not real[a] & real[b]
    assert set().union(*real) == set(range(29000))
    assert sum(len(r) for r in real) == 29000


def test_resume_gives_the_same_batches(prepared):
    # Short sources only (fewer batches per epoch), so the test crosses an epoch boundary fast.
    pipeline = _pipeline(prepared, num_threads=1, max_src_len=16, mlm_mask_rate=0.15)
    assert 0 < pipeline.counts["kept"] < 29000 and pipeline.counts["dropped_too_long"] > 0
    n = pipeline.batches_per_epoch
    reference = iter(pipeline)
    expected = [next(reference) for _ in range(n + 3)]  # into the second epoch
    it = iter(pipeline)
    for _ in range(n - 2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["epoch"] == 0 and state["position"] == n - 2
    resumed = iter(_pipeline(prepared, num_threads=1, max_src_len=16, mlm_mask_rate=0.15))
    resumed.set_state(state)
    for want in expected[n - 2 :]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Epochs differ in order.
    assert not np.array_equal(expected[0]["index"], expected[n]["index"])
    with pytest.raises(Exception, match="seed"):
        iter(_pipeline(prepared, seed=4, max_src_len=16)).set_state(state)


def test_global_arrays_on_the_mesh(prepared):
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    batch = next(iter(_pipeline(prepared)))
    from distill_jax import sharding

    arrays = sharding.shard_batch(batch, mesh)
    assert arrays["src"].shape == batch["src"].shape
    assert arrays["src"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(arrays["tgt_out"]), batch["tgt_out"])


def test_other_vocabulary_is_refused(prepared, tmp_path):
    from distill_jax.cli import UserError

    other = prepared.vocab
    other_pieces = other.pieces[:-1] + ("<fill_x>",)
    from distill_jax.data.vocab import Vocabulary

    changed = Vocabulary(
        other_pieces,
        other.teacher_ids,
        other.teacher,
        other.teacher_vocab_sha256,
        other.teacher_special_ids,
    )
    changed.save(tmp_path / "v.json")
    with pytest.raises(UserError, match=f"{other.name}.*{changed.name}"):
        open_prepared(prepared.path, tmp_path / "v.json")
    assert open_prepared(prepared.path, other).vocab.sha256 == other.sha256
