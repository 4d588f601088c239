"""``distill-jax export``: students as transformers Marian / M2M100 / FSMT checkpoints and as
CTranslate2 models.

Fast tests convert random students of both layouts and compare teacher-forced logits with
transformers' (and log-probabilities with CTranslate2's), check the refusals by name and
the target checks of ``--overwrite``. The slow ones train a tiny student of each layout
(post-LN -> Marian, pre-LN -> M2M100, both also -> CTranslate2) through the CLI, export
it and compare logits, greedy and beam search token for token, and text in -> text out
with ``distill-jax generate``."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import export
from distill_jax.errors import UserError
from distill_jax.experiment import DecodeConfig
from distill_jax.models.transformer import Transformer, TransformerConfig

import tiny_experiment

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = "configs/tiny.py"
PIECES = tuple(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(44)])


# ----------------------------------------------------------------------------- helpers


def _hf_logits(model, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
    """Teacher-forced logits of a transformers model; ``use_cache=False`` keeps the causal
    mask (FSMT drops it when called with use_cache=True on a full prefix)."""
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(src, dtype=torch.long),
            attention_mask=torch.tensor(src != 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(tgt_in, dtype=torch.long),
            decoder_attention_mask=torch.tensor(tgt_in != 0, dtype=torch.long),
            use_cache=False,
        ).logits.numpy()


def _padded(rows: list, width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _random_student(
    positions: str = "sinusoidal", pre_layer_norm: bool = False, layer_norm_eps: float = 1e-5
):
    config = TransformerConfig(
        vocab_size=48,
        d_model=16,
        num_heads=4,
        mlp_dim=24,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_len=20,
        positions=positions,
        pre_layer_norm=pre_layer_norm,
        layer_norm_eps=layer_norm_eps,
    )
    model = Transformer(config)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), dummy, dummy)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    # non-trivial biases and LayerNorm parameters
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(tree, leaves)


def _batch():
    """Sources ending in </s> and targets starting with <s>, of different lengths, padded."""
    rng = np.random.default_rng(0)
    lengths = [(9, 7), (5, 3), (2, 6)]  # (source with </s>, target with <s>)
    src = _padded([list(rng.integers(3, 48, s - 1)) + [2] for s, _ in lengths], 9)
    tgt = _padded([[1] + list(rng.integers(3, 48, t - 1)) for _, t in lengths], 7)
    return src, tgt


def _write_weights(folder, params, config, fmt):
    from safetensors.numpy import save_file

    folder.mkdir(exist_ok=True)
    save_file(
        export.transformers_state_dict(params, config, fmt),
        str(folder / export.WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(
        json.dumps(export.transformers_config(config, DecodeConfig(), fmt))
    )


# ----------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize(
    "fmt,pre_layer_norm,positions",
    [
        ("marian", False, "sinusoidal"),
        ("m2m100", True, "sinusoidal"),
        pytest.param("marian", False, "learned", marks=pytest.mark.slow),
        pytest.param("fsmt", False, "sinusoidal", marks=pytest.mark.slow),
        pytest.param("fsmt", False, "learned", marks=pytest.mark.slow),
    ],
)
def test_random_student_logits_match_transformers(tmp_path, fmt, pre_layer_norm, positions):
    model, params = _random_student(positions, pre_layer_norm)
    _write_weights(tmp_path, params, model.config, fmt)
    hf, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert type(hf).__name__ == export.ARCHITECTURES[fmt]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    src, tgt = _batch()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt)))
    valid = tgt != 0
    assert np.abs(ours - _hf_logits(hf.eval(), src, tgt))[valid].max() < 1e-4
    hf.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "again").eval()
    moved = np.abs(ours - _hf_logits(again, src, tgt))[valid].max()
    if fmt == "fsmt":  # FSMT's shifted position tables survive save_pretrained
        assert moved < 1e-4
    elif fmt == "marian" and positions == "sinusoidal":
        # Marian's are not saved, and come back as Marian's own sinusoids (docs/export.md:
        # upload the export's files, do not re-save it)
        assert moved > 1e-2


@pytest.mark.parametrize(
    "pre_layer_norm,eps,positions",
    [(False, 1e-5, "sinusoidal"), (True, 1e-6, "sinusoidal"), (True, 1e-6, "learned")],
)
def test_random_student_log_probs_match_ctranslate2(tmp_path, pre_layer_norm, eps, positions):
    """Both layouts, OpenNMT's epsilon 1e-6 and learned positions: CTranslate2 scores every
    target token as the student does."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    model, params = _random_student(positions, pre_layer_norm, eps)
    vocab = types.SimpleNamespace(pieces=PIECES)
    export.write_ctranslate2(tmp_path / "ct2", params, model.config, vocab)
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), compute_type="float32")
    src, tgt = _batch()
    sources = [[PIECES[i] for i in row if i not in (0, 2)] for row in src]  # </s> added by CT2
    targets = [[PIECES[i] for i in row[1:] if i != 0] for row in tgt]
    scored = translator.score_batch(sources, targets)
    logits = model.apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt))
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for row, (target, result) in enumerate(zip(targets, scored)):
        ids = [PIECES.index(p) for p in target] + [2]  # CT2 scores </s> too
        ours = [log_probs[row, t, i] for t, i in enumerate(ids)]
        np.testing.assert_allclose(result.log_probs, ours, atol=1e-4)


def test_inexpressible_students_are_refused_by_name():
    post = TransformerConfig(vocab_size=48)
    pre = dataclasses.replace(post, pre_layer_norm=True)
    assert export.check_exportable(post, "auto") == "marian"
    assert export.check_exportable(pre, "auto") == "m2m100"
    for fmt in ("marian", "fsmt"):
        with pytest.raises(UserError, match=f"as {fmt}: student.pre_layer_norm=True"):
            export.check_exportable(pre, fmt)
    with pytest.raises(UserError, match="as m2m100: student.pre_layer_norm=False"):
        export.check_exportable(post, "m2m100")
    with pytest.raises(UserError, match="student.positions='learned'"):
        export.check_exportable(dataclasses.replace(pre, positions="learned"), "m2m100")
    for config in (post, pre):  # OpenNMT's 1e-6: transformers fixes 1e-5
        with pytest.raises(UserError, match="student.layer_norm_eps=1e-06"):
            export.check_exportable(dataclasses.replace(config, layer_norm_eps=1e-6), "auto")
        assert (
            export.check_exportable(
                dataclasses.replace(config, layer_norm_eps=1e-6, positions="learned"), "ctranslate2"
            )
            == "ctranslate2"
        )
    with pytest.raises(UserError, match="--format 'onnx'"):
        export.check_exportable(post, "onnx")


def test_max_new_tokens_is_the_students_bound():
    from distill_jax import decode

    model = Transformer(TransformerConfig(vocab_size=48, max_len=20))
    config = DecodeConfig(max_len_a=1.2, max_len_b=3)
    sources = [[5, 6, 7, 2], [5] * 15 + [2], [2], [5] * 19 + [2]]
    src = jnp.asarray(_padded(sources, 20), jnp.int32)
    _, limits = decode.length_limits(model, src, (config.max_len_a, config.max_len_b))
    assert [export.max_new_tokens(s, config, 20) for s in sources] == list(np.asarray(limits))


def test_model_card_metadata_from_the_run(tmp_path):
    """ModelCardData: language, datasets, license, library and BLEU per split in
    model-index, read back with huggingface_hub."""
    from huggingface_hub import ModelCard

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "distill": {"kd": "offline", "alpha": 0.5, "temperature": 10, "top_k": 8},
                "teacher": {"checkpoint": "teacher/", "steps": 400},
                "train": {"steps": 100},
                "data": {"dataset": "multi30k"},
            }
        )
    )
    (tmp_path / "results.json").write_text(
        json.dumps(
            {
                "kd": "offline",
                "splits": {"val": {"bleu": 31.456, "rouge1": 60.0}, "test2016": {"bleu": 30.014}},
            }
        )
    )
    vocab = types.SimpleNamespace(pieces=PIECES, name="minilm-48-abc")
    config = TransformerConfig(vocab_size=48, pre_layer_norm=True)
    student = export.ExportedStudent(None, config, vocab, DecodeConfig(), ("de", "en"))
    info = export.CardInfo("distilled", "best", {"tfds_name": "multi30k/de-en"}, "cc-by-4.0")
    text = export.model_card(tmp_path, student, info, "m2m100")
    card = ModelCard(text)
    assert card.data.language == ["de", "en"] and card.data.license == "cc-by-4.0"
    assert card.data.datasets == ["multi30k/de-en"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "translation"
    assert {(r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("val", "bleu", 31.46),
        ("test2016", "bleu", 30.01),
    }
    assert "pre-LN" in card.text and "alpha 0.5" in card.text
    card = ModelCard(
        export.model_card(
            tmp_path,
            dataclasses.replace(student, langs=("src", "tgt")),
            export.CardInfo("x", "best"),
            "ctranslate2",
        )
    )
    assert card.data.language is None and card.data.library_name == "ctranslate2"
    assert "ctranslate2.Translator" in card.text


# ----------------------------------------------------------------------------- --overwrite


def _fake_write(content: str):
    """A stand-in for write_export that writes one file (or fails when content is None)."""

    def write(folder, *args, **kwargs):
        (folder / "weights.txt").write_text("partial" if content is None else content)
        if content is None:
            raise RuntimeError("export failed half-way")

    return write


def _export(out, workdir, overwrite=False):
    model, params = _random_student()
    student = export.ExportedStudent(params, model.config, None, DecodeConfig())
    return export.export(out, student, "card", overwrite=overwrite, workdir=workdir)


def test_overwrite_replaces_an_earlier_export_only_when_complete(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "exports" / "model"
    work.mkdir()
    monkeypatch.setattr(export, "write_export", _fake_write("first"))
    _export(out, work)
    marker = json.loads((out / export.MARKER).read_text())
    assert marker["files"] == sorted([export.MARKER, "weights.txt"])
    with pytest.raises(UserError, match="exists; choose another --out or pass --overwrite"):
        _export(out, work)
    monkeypatch.setattr(export, "write_export", _fake_write(None))
    with pytest.raises(RuntimeError, match="half-way"):
        _export(out, work, overwrite=True)
    assert (out / "weights.txt").read_text() == "first"  # the old export, untouched
    monkeypatch.setattr(export, "write_export", _fake_write("second"))
    _export(out, work, overwrite=True)
    assert (out / "weights.txt").read_text() == "second"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporary left


@pytest.mark.parametrize(
    "case", ["workdir", "parent", "inside", "user_folder", "no_marker", "file"]
)
def test_overwrite_refuses_what_an_export_did_not_write(tmp_path, monkeypatch, case):
    work = tmp_path / "project" / "work"
    (work / "students").mkdir(parents=True)
    (work / "config.json").write_text("{}")
    monkeypatch.setattr(export, "write_export", _fake_write("new"))
    if case == "workdir":
        out, message = work, "is the work directory"
    elif case == "parent":
        out, message = tmp_path / "project", "holds the work directory"
    elif case == "inside":
        out, message = work / "students", "is inside the work directory"
        # even an earlier export inside the work directory is not replaced
        (out / export.MARKER).write_text(json.dumps({"files": [export.MARKER]}))
    elif case == "user_folder":  # an export folder the user added a file to
        out, message = tmp_path / "mine", r"holds files the export did not write: \['notes.txt'\]"
        _export(out, work)
        (out / "notes.txt").write_text("mine")
    elif case == "no_marker":
        out, message = tmp_path / "photos", "has no readable .distill_jax_export.json"
        out.mkdir()
        (out / "cat.jpg").write_text("...")
    else:
        out, message = tmp_path / "a_file", "is not a folder written by distill-jax export"
        out.write_text("text")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message):
        export.check_target(out, work, overwrite=True)
    with pytest.raises(UserError, match=message):
        _export(out, work, overwrite=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing removed or added


# ----------------------------------------------------------------------------- end to end


def _cli(workdir, teacher, command, *extra, check=True):
    return tiny_experiment.run_cli(workdir, teacher, command, *extra, config=CONFIG, check=check)


def _export_cli(exported, out, *extra, name=None, check=True):
    """`export` of the fixture's student (or of run ``name``) to ``out``, with its flags."""
    _, workdir, teacher, _, flags, layout = exported
    args = ["--name", name or layout, "--out", str(out), *flags, *extra]
    return _cli(workdir, teacher, "export", *args, check=check)


# A student small and fast to train that memorises enough of 64 sentence pairs to give
# varied outputs (the tiny config's defaults give one repeated token at this budget).
TRAIN = tiny_experiment.sets(
    "distill.kd=none",
    "train.steps=400",
    "train.learning_rate=5e-3",
    "train.warmup_steps=20",
    "train.eval_every=100000",
    "train.save_every=200",
    "train.label_smoothing=0.0",
    "student.dropout_rate=0.0",
    "student.d_model=64",
    "student.mlp_dim=128",
    # one decoding phase: fewer programs to compile (the same outputs, distill_jax.decode),
    # and `generate` below reuses the compiled beam search of the in-process comparison
    "decode.cache_phases=1",
)
# The two student layouts: post-LN (fairseq's; exported as Marian) and pre-LN with final
# LayerNorms (OpenNMT's; exported as M2M100). Both also as CTranslate2 (--ctranslate2).
LAYOUTS = {"post": (), "pre": ("--set", "student.pre_layer_norm=True")}
FORMATS = {"post": "marian", "pre": "m2m100"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, minilm_dir, shared_data):
    root = tmp_path_factory.mktemp("export")
    teacher = tiny_experiment.save_tiny_teacher(root / "teacher", minilm_dir)
    specs = tiny_experiment.write_corpus(
        shared_data,
        root / "corpus",
        sizes=(("train", "train", 64), ("val", "val", 16), ("test2016", "test_2016_flickr", 16)),
    )
    tiny_experiment.prepare(teacher, root / "corpus", specs, root / "data")
    return root, teacher


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def exported(request, corpus):
    """(root, workdir, teacher, export folder, training flags, layout) of a trained tiny
    student of each layout, exported with --ctranslate2."""
    root, teacher = corpus
    layout = request.param
    flags = [*TRAIN, *LAYOUTS[layout]]
    workdir = root / f"work-{layout}"
    (workdir / "data").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(root / "data", workdir / "data")
    _cli(workdir, teacher, "train-student", "--name", layout, *flags)
    out = root / f"hf-{layout}"
    fixture = (root, workdir, teacher, None, flags, layout)
    result = _export_cli(
        fixture, out, "--checkpoint", "latest", "--ctranslate2", "--license", "cc-by-4.0"
    )
    assert f"exported to {out} ({FORMATS[layout]}, with ctranslate2/)" in result.stdout
    return root, workdir, teacher, out, flags, layout


@pytest.fixture(scope="module")
def ours(exported):
    """(model, params, vocab, decode config, mesh) of the trained student, in this process."""
    from distill_jax.commands.common import load_experiment
    from distill_jax.sharding import make_mesh
    from distill_jax.student import load_trained

    _, workdir, teacher, _, flags, layout = exported
    args = type(
        "Args", (), {"config": CONFIG, "overrides": [f"teacher.checkpoint={teacher}"] + flags[1::2]}
    )
    config = load_experiment(args)
    mesh = make_mesh(config.mesh)
    model, params, vocab = load_trained(config, workdir, layout, "latest", mesh)
    return model, params, vocab, config.decode, mesh


@pytest.fixture(scope="module")
def sentences(corpus):
    """16 sources of different lengths: 8 from the training split, 8 from val (most with
    teacher pieces outside the student vocabulary of 64 training pairs)."""
    root = corpus[0]
    picked = []
    for split in ("train", "val"):
        lines = (root / "corpus" / f"{split}.de").read_text(encoding="utf-8").splitlines()
        by_length = sorted(set(lines), key=lambda s: (len(s), s))
        picks = np.linspace(0, len(by_length) - 1, 8).round().astype(int)
        picked += [by_length[i] for i in picks]
    return picked


def _hf_ids(model, src_ids, decode, max_len, **kwargs) -> list[int]:
    """transformers generate on one source -> generated ids without BOS, cut at EOS / pad."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([src_ids]),
            attention_mask=torch.ones(1, len(src_ids), dtype=torch.long),
            max_new_tokens=export.max_new_tokens(src_ids, decode, max_len),
            **kwargs,
        )[0]
    ids = out.tolist()[1:]
    stop = [i for i, t in enumerate(ids) if t in (0, 2)]
    return ids[: stop[0]] if stop else ids


def _ct2_ids(translator, vocab, src_ids, decode, max_len, beam_size) -> list[int]:
    """CTranslate2 on one source (pieces, without </s>: the model appends it) -> ids."""
    result = translator.translate_batch(
        [[vocab.pieces[i] for i in src_ids[:-1]]],
        beam_size=beam_size,
        length_penalty=0.0,
        max_decoding_length=export.max_new_tokens(src_ids, decode, max_len),
        suppress_sequences=export.ctranslate2_suppressed(vocab),
    )
    return [vocab.ids[p] for p in result[0].hypotheses[0]]


@pytest.mark.slow
def test_export_folder(exported, ours, sentences):
    from huggingface_hub import ModelCard

    _, workdir, _, out, _, layout = exported
    model, _, vocab, _, _ = ours
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        export.MARKER,
        "ctranslate2",
    } <= names
    assert json.loads((out / export.MARKER).read_text())["files"] == sorted(names)
    assert {"model.bin", "config.json"} <= {p.name for p in (out / "ctranslate2").iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [export.ARCHITECTURES[FORMATS[layout]]]
    assert (config["bos_token_id"], config["eos_token_id"], config["decoder_start_token_id"]) == (
        1,
        2,
        1,
    )
    assert config["pad_token_id"] == (-1 if layout == "pre" else 0)  # see export.py
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 0
    assert config["vocab_size"] == len(vocab)
    card = ModelCard.load(out / "README.md")
    results = json.loads((workdir / "students" / layout / "results.json").read_text())
    assert card.data.license == "cc-by-4.0"  # (a local corpus: no language codes)
    assert card.data.datasets and card.data.library_name == "transformers"
    scores = {r.dataset_split: r.metric_value for r in card.data.eval_results}
    assert scores == {s: round(v["bleu"], 2) for s, v in results["splits"].items()}
    assert "Teacher" in card.text
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in sentences:
        assert tokenizer(text)["input_ids"] == vocab.encode(text) + [2]
        ids = vocab.encode(text)
        assert tokenizer.convert_ids_to_tokens(ids) == [vocab.pieces[i] for i in ids]


@pytest.mark.slow
def test_export_tokenizer_gives_our_ids_on_unseen_text(exported, ours, shared_data):
    """Every Multi30k val and test2016 sentence, both languages: the vocabulary of 64 training
    pairs lacks many of their teacher pieces, and the ids are still ours."""
    if exported[5] != "post":
        pytest.skip("the tokenizer is the same for both layouts")
    out = exported[3]
    vocab = ours[2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = [
        line
        for name in ("val.de", "val.en", "test_2016_flickr.de", "test_2016_flickr.en")
        for line in (shared_data / "multi30k" / name).read_text(encoding="utf-8").splitlines()
    ]
    from distill_jax.data.vocab import TeacherTokenizer

    ours_ids = vocab.encode_batch(texts)
    pieces = TeacherTokenizer.load(vocab.teacher).tokenize_batch(texts)
    assert sum(any(p not in vocab.ids for p in line) for line in pieces) > len(texts) // 2
    assert tokenizer(texts)["input_ids"] == [ids + [2] for ids in ours_ids]


@pytest.mark.slow
def test_teacher_forced_logits_match(exported, ours, sentences):
    out = exported[3]
    model, params, vocab, _, _ = ours
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    src_rows = [vocab.encode(s) + [2] for s in sentences]
    tgt_rows = [[1] + vocab.encode(s)[:12] for s in reversed(sentences)]  # padded targets too
    src = _padded(src_rows, max(map(len, src_rows)))
    tgt = _padded(tgt_rows, max(map(len, tgt_rows)))
    logits = np.asarray(
        model.apply({"params": params}, jnp.asarray(src, jnp.int32), jnp.asarray(tgt, jnp.int32))
    )
    assert np.abs(logits - _hf_logits(hf, src, tgt))[tgt != 0].max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_generate_matches_ours_token_for_token(exported, ours, sentences, method):
    """transformers and CTranslate2 (float32) against the student's own search, 16
    sentences of 1 to 30-odd pieces, one at a time (each with its own length bound)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from distill_jax.translate import TrainedModel, translate_ids

    out = exported[3]
    model, params, vocab, decode, mesh = ours
    beams = 4 if method == "beam" else 1
    decode = dataclasses.replace(decode, method=method, beam_size=4, length_penalty=0.0)
    sources = [np.asarray(vocab.encode(s) + [2], np.int32) for s in sentences]
    assert len({len(s) for s in sources}) > 8  # mixed lengths
    trained = TrainedModel(model, params, vocab, mesh)
    expected = [ids.tolist() for ids in translate_ids(trained, sources, decode)]
    assert len({tuple(e) for e in expected}) > 4, f"degenerate outputs: {expected}"
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    kwargs = {"num_beams": beams, "length_penalty": 0.0, "do_sample": False}
    got = [_hf_ids(hf, s.tolist(), decode, model.config.max_len, **kwargs) for s in sources]
    assert got == expected
    translator = ctranslate2.Translator(str(out / "ctranslate2"), compute_type="float32")
    got = [
        _ct2_ids(translator, vocab, s.tolist(), decode, model.config.max_len, beams)
        for s in sources
    ]
    assert got == expected


@pytest.mark.slow
def test_text_in_text_out_matches_distill_jax_generate(exported, ours, sentences, tmp_path):
    """The text `distill-jax generate` writes, from the export: transformers (its tokenizer,
    generate) and CTranslate2 (the tokenizer's pieces, translate_batch), each hypothesis
    turned into text by the detokenizer `generate` uses (``Vocabulary.decode``)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    _, workdir, teacher, out, flags, layout = exported
    model, _, vocab, decode, _ = ours
    (tmp_path / "in.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    _cli(
        workdir,
        teacher,
        "generate",
        "--name",
        layout,
        "--checkpoint",
        "latest",
        "--input",
        str(tmp_path / "in.txt"),
        "--output",
        str(tmp_path / "out.txt"),
        *flags,
        "--set",
        "decode.beam_size=4",
        "--set",
        "decode.length_penalty=0.0",
    )
    expected = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    translator = ctranslate2.Translator(str(out / "ctranslate2"), compute_type="float32")
    from_hf, from_ct2 = [], []
    for text in sentences:
        batch = tokenizer([text], return_tensors="pt")
        bound = export.max_new_tokens(batch["input_ids"][0].tolist(), decode, model.config.max_len)
        with torch.no_grad():
            ids = hf.generate(**batch, num_beams=4, length_penalty=0.0, max_new_tokens=bound)
        from_hf.append(vocab.decode(ids[0].tolist()))
        result = translator.translate_batch(
            [tokenizer.tokenize(text)],
            beam_size=4,
            length_penalty=0.0,
            max_decoding_length=bound,
            suppress_sequences=export.ctranslate2_suppressed(vocab),
        )
        from_ct2.append(vocab.decode(tokenizer.convert_tokens_to_ids(result[0].hypotheses[0])))
    assert from_hf == expected
    assert from_ct2 == expected


@pytest.mark.slow
def test_bad_input_is_refused_and_writes_nothing(exported):
    root, workdir, teacher, out, flags, layout = exported
    if layout != "post":
        pytest.skip("the refusals do not depend on the layout")
    refused = root / "refused"
    wrong = _export_cli(exported, refused, "--format", "m2m100", check=False)
    assert wrong.returncode == 2 and "pre_layer_norm=False" in wrong.stderr, wrong.stderr
    eps = _export_cli(exported, refused, "--set", "student.layer_norm_eps=1e-6", check=False)
    assert eps.returncode == 2 and "layer_norm_eps=1e-06" in eps.stderr, eps.stderr
    missing = _export_cli(exported, refused, name="no-such-run", check=False)
    assert missing.returncode == 2 and "no-such-run" in missing.stderr, missing.stderr
    taken = _export_cli(exported, out, check=False)
    assert taken.returncode == 2 and "--overwrite" in taken.stderr, taken.stderr
    before = sorted(str(p) for p in workdir.rglob("*"))
    wipe = _export_cli(exported, workdir, "--overwrite", check=False)
    assert wipe.returncode == 2 and "is the work directory" in wipe.stderr, wipe.stderr
    assert sorted(str(p) for p in workdir.rglob("*")) == before
    assert not [p for p in root.iterdir() if p.name.startswith((".refused", "refused"))]
    earlier = root / "earlier"  # a copy: the other tests keep reading `out`
    shutil.copytree(out, earlier)
    again = _export_cli(
        exported, earlier, "--checkpoint", "latest", "--overwrite", "--format", "fsmt"
    )
    assert f"exported to {earlier} (fsmt)" in again.stdout
    assert json.loads((earlier / "config.json").read_text())["model_type"] == "fsmt"
    assert not (earlier / "ctranslate2").exists()  # the earlier export was replaced whole


@pytest.mark.slow
@pytest.mark.bench
def test_bench_ctranslate2_script(exported, tmp_path):
    """scripts/bench/bench_ctranslate2.py on the tiny student: three systems timed, BLEU of each,
    CTranslate2 float32 token for token equal to ours."""
    pytest.importorskip("ctranslate2")
    _, workdir, teacher, _, flags, layout = exported
    if layout != "post":
        pytest.skip("one layout is enough for the script")
    record = tmp_path / "bench.json"
    args = [
        sys.executable,
        "scripts/bench/bench_ctranslate2.py",
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        "--name",
        layout,
        "--checkpoint",
        "latest",
        "--split",
        "val",
        "--sentences",
        "8",
        "--runs",
        "5",
        "--warmup",
        "1",
        "--json",
        str(record),
        "--set",
        f"teacher.checkpoint={teacher}",
        *flags,
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    records = {r["system"]: r for r in json.loads(record.read_text())}
    assert sorted(records) == ["ct2-float32", "ct2-int8", "ours"]
    assert all(
        r["runs"] == 5 and r["sentences_per_s"] > 0 and 0 <= r["bleu"] <= 100
        for r in records.values()
    )
    assert records["ct2-float32"]["identical_to_ours"] == 8
    assert records["ours"]["machine"]["commit"]


@pytest.mark.slow
def test_ctranslate2_format_alone(exported, ours, sentences):
    """--format ctranslate2: a CTranslate2 model folder with the tokenizer, card and marker,
    translating as the ctranslate2/ folder beside the transformers export does."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from huggingface_hub import ModelCard

    root, workdir, teacher, out, flags, layout = exported
    if layout != "post":
        pytest.skip("the writer is the one the generate tests check for both layouts")
    folder = root / "ct2-only"
    _export_cli(exported, folder, "--checkpoint", "latest", "--format", "ctranslate2")
    names = {p.name for p in folder.iterdir()}
    assert {"model.bin", "config.json", "tokenizer.json", "README.md", export.MARKER} <= names
    assert json.loads((folder / "config.json").read_text())["layer_norm_epsilon"] == 1e-5
    assert ModelCard.load(folder / "README.md").data.library_name == "ctranslate2"
    vocab = ours[2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    alone = ctranslate2.Translator(str(folder), compute_type="float32")
    beside = ctranslate2.Translator(str(out / "ctranslate2"), compute_type="float32")
    batch = [tokenizer.tokenize(s) for s in sentences[:4]]
    options = {"beam_size": 4, "suppress_sequences": export.ctranslate2_suppressed(vocab)}
    assert [r.hypotheses for r in alone.translate_batch(batch, **options)] == [
        r.hypotheses for r in beside.translate_batch(batch, **options)
    ]
