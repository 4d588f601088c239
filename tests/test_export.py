"""``distill-jax export``: a student as a transformers FSMT checkpoint.

Fast tests convert random students (sinusoid and learned positions) and compare
teacher-forced logits with FSMT's; the slow ones train a tiny student through the CLI,
export it and compare logits, greedy and beam search (before and after a
save_pretrained / from_pretrained round trip) and text in -> text out (tokenizer,
generate, decode; transformers 5 has no "translation" pipeline any more) with
``distill-jax generate``, and check the refusals."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_experiment
from distill_jax import export
from distill_jax.errors import UserError
from distill_jax.experiment import DecodeConfig
from distill_jax.models.transformer import Transformer, TransformerConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = "configs/tiny.py"


# ----------------------------------------------------------------------------- helpers


def _fsmt_logits(model, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
    """Teacher-forced logits of an FSMT model; ``use_cache=False`` keeps the causal mask
    (FSMT drops it when called with use_cache=True on a full prefix)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(src, dtype=torch.long),
                     attention_mask=torch.tensor(src != 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(tgt_in, dtype=torch.long),
                     decoder_attention_mask=torch.tensor(tgt_in != 0, dtype=torch.long),
                     use_cache=False).logits.numpy()


def _padded(rows: list, width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _random_student(positions: str):
    config = TransformerConfig(vocab_size=48, d_model=16, num_heads=4, mlp_dim=24,
                               num_encoder_layers=2, num_decoder_layers=2, max_len=20,
                               positions=positions)
    model = Transformer(config)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), dummy, dummy)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    # non-trivial biases and LayerNorm parameters
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(tree, leaves)


def _write_weights(folder, params, config):
    from safetensors.numpy import save_file
    save_file(export.fsmt_state_dict(params, config), str(folder / export.WEIGHTS_NAME),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(export.fsmt_config(config, DecodeConfig())))


# ----------------------------------------------------------------------------- fast tests


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_random_student_logits_match_fsmt_and_survive_save_pretrained(tmp_path, positions):
    model, params = _random_student(positions)
    _write_weights(tmp_path, params, model.config)
    fsmt, info = transformers.FSMTForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    rng = np.random.default_rng(0)
    lengths = [(9, 7), (5, 3), (2, 6)]  # (source with </s>, target with <s>)
    src = _padded([list(rng.integers(3, 48, s - 1)) + [2] for s, _ in lengths], 9)
    tgt = _padded([[1] + list(rng.integers(3, 48, t - 1)) for _, t in lengths], 7)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt)))
    valid = tgt != 0
    assert np.abs(ours - _fsmt_logits(fsmt.eval(), src, tgt))[valid].max() < 1e-4
    # the shifted position tables are saved and loaded back as they are
    fsmt.save_pretrained(tmp_path / "again")
    again = transformers.FSMTForConditionalGeneration.from_pretrained(tmp_path / "again")
    assert np.abs(ours - _fsmt_logits(again.eval(), src, tgt))[valid].max() < 1e-4
    table = again.model.decoder.embed_positions.weight.detach().numpy()
    np.testing.assert_array_equal(table, export.position_table(
        export._host_tree(params), model.config, "decoder"))


def test_inexpressible_students_are_refused_by_name():
    base = TransformerConfig(vocab_size=48)
    with pytest.raises(UserError, match="pre_layer_norm"):
        export.check_exportable(dataclasses.replace(base, pre_layer_norm=True))
    with pytest.raises(UserError, match="layer_norm_eps"):
        export.check_exportable(dataclasses.replace(base, layer_norm_eps=1e-6))
    export.check_exportable(base)


def test_max_new_tokens_is_the_students_bound():
    from distill_jax import decode
    model = Transformer(TransformerConfig(vocab_size=48, max_len=20))
    config = DecodeConfig(max_len_a=1.2, max_len_b=3)
    sources = [[5, 6, 7, 2], [5] * 15 + [2], [2], [5] * 19 + [2]]
    src = jnp.asarray(_padded(sources, 20), jnp.int32)
    _, limits = decode.length_limits(model, src, (config.max_len_a, config.max_len_b))
    assert [export.max_new_tokens(s, config, 20) for s in sources] == list(np.asarray(limits))


# ----------------------------------------------------------------------------- end to end


def _cli(workdir, teacher, command, *extra, check=True):
    args = [sys.executable, "-m", "distill_jax.cli", command, "--config", CONFIG,
            "--workdir", str(workdir), "--set", f"teacher.checkpoint={teacher}",
            "--no-progress", *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if check and result.returncode:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


# A student small and fast to train that memorises enough of 64 sentence pairs to give
# varied outputs (the tiny config's defaults give one repeated token at this budget).
TRAIN = ["--set", "distill.kd=none", "--set", "train.steps=400", "--set",
         "train.learning_rate=5e-3", "--set", "train.warmup_steps=20", "--set",
         "train.eval_every=100000", "--set", "train.save_every=200", "--set",
         "train.label_smoothing=0.0", "--set", "student.dropout_rate=0.0", "--set",
         "student.d_model=64", "--set", "student.mlp_dim=128",
         # one decoding phase: fewer programs to compile (the same outputs, distill_jax.decode),
         # and `generate` below reuses the compiled beam search of the in-process comparison
         "--set", "decode.cache_phases=1"]
NAME = "base"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_dir, shared_data):
    root = tmp_path_factory.mktemp("export")
    teacher = tiny_experiment.save_tiny_teacher(root / "teacher", minilm_dir)
    specs = tiny_experiment.write_corpus(
        shared_data, root / "corpus",
        sizes=(("train", "train", 64), ("val", "val", 16), ("test2016", "test_2016_flickr", 16)))
    workdir = root / "work"
    tiny_experiment.prepare(teacher, root / "corpus", specs, workdir / "data")
    _cli(workdir, teacher, "train-student", "--name", NAME, *TRAIN)
    out = root / "hf"
    result = _cli(workdir, teacher, "export", "--name", NAME, "--checkpoint", "latest",
                  "--out", str(out), *TRAIN)
    assert f"exported to {out}" in result.stdout
    return root, workdir, teacher, out


@pytest.fixture(scope="module")
def ours(exported):
    """(model, params, vocab, decode config, mesh) of the trained student, in this process."""
    from distill_jax.commands.common import load_experiment
    from distill_jax.sharding import make_mesh
    from distill_jax.student import load_trained
    root, workdir, teacher, _ = exported
    args = type("Args", (), {"config": CONFIG,
                             "overrides": [f"teacher.checkpoint={teacher}"] + TRAIN[1::2]})
    config = load_experiment(args)
    mesh = make_mesh(config.mesh)
    model, params, vocab = load_trained(config, workdir, NAME, "latest", mesh)
    return model, params, vocab, config.decode, mesh


@pytest.fixture(scope="module")
def sentences(exported):
    """16 sources of different lengths: 8 from the training split, 8 from val (most with
    teacher pieces outside the student vocabulary of 64 training pairs)."""
    root = exported[0]
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
            input_ids=torch.tensor([src_ids]), attention_mask=torch.ones(1, len(src_ids),
                                                                         dtype=torch.long),
            max_new_tokens=export.max_new_tokens(src_ids, decode, max_len), **kwargs)[0]
    ids = out.tolist()[1:]
    stop = [i for i, t in enumerate(ids) if t in (0, 2)]
    return ids[:stop[0]] if stop else ids


@pytest.mark.slow
def test_export_folder(exported, ours, sentences):
    _, workdir, _, out = exported
    model, _, vocab, _, _ = ours
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".hf.")]  # no temp left
    config = json.loads((out / "config.json").read_text())
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"],
            config["decoder_start_token_id"], config["forced_eos_token_id"]) == (0, 1, 2, 1, 2)
    assert config["src_vocab_size"] == config["tgt_vocab_size"] == len(vocab)
    card = (out / "README.md").read_text()
    results = json.loads((workdir / "students" / NAME / "results.json").read_text())
    assert f"{results['splits']['val']['bleu']:.2f}" in card and "Teacher" in card
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in sentences:
        assert tokenizer(text)["input_ids"] == vocab.encode(text) + [2]
    ids = vocab.encode(sentences[3])
    assert tokenizer.decode(ids + [2, 0], skip_special_tokens=True) == vocab.decode(ids)


@pytest.mark.slow
def test_export_tokenizer_gives_our_ids_on_unseen_text(exported, ours, shared_data):
    """Every Multi30k val and test2016 sentence, both languages: the vocabulary of 64 training
    pairs lacks many of their teacher pieces, and the ids are still ours."""
    out = exported[3]
    vocab = ours[2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = [line for name in ("val.de", "val.en", "test_2016_flickr.de", "test_2016_flickr.en")
             for line in (shared_data / "multi30k" / name).read_text(encoding="utf-8").splitlines()]
    ours_ids = vocab.encode_batch(texts)                      # (loads the teacher tokenizer)
    pieces = vocab.tokenizer.tokenize_batch(texts)
    assert sum(any(p not in vocab.ids for p in line) for line in pieces) > len(texts) // 2
    assert tokenizer(texts)["input_ids"] == [ids + [2] for ids in ours_ids]


@pytest.mark.slow
def test_teacher_forced_logits_match(exported, ours, sentences):
    out = exported[3]
    model, params, vocab, _, _ = ours
    fsmt = transformers.FSMTForConditionalGeneration.from_pretrained(out).eval()
    src_rows = [vocab.encode(s) + [2] for s in sentences]
    tgt_rows = [[1] + vocab.encode(s)[:12] for s in reversed(sentences)]  # padded targets too
    src = _padded(src_rows, max(map(len, src_rows)))
    tgt = _padded(tgt_rows, max(map(len, tgt_rows)))
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(src, jnp.int32),
                                    jnp.asarray(tgt, jnp.int32)))
    assert np.abs(logits - _fsmt_logits(fsmt, src, tgt))[tgt != 0].max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_generate_matches_ours_token_for_token(exported, ours, sentences, tmp_path, method):
    from distill_jax.translate import translate_ids
    out = exported[3]
    model, params, vocab, decode, mesh = ours
    decode = dataclasses.replace(decode, method=method, beam_size=4, length_penalty=0.0)
    sources = [np.asarray(vocab.encode(s) + [2], np.int32) for s in sentences]
    expected = [ids.tolist() for ids in translate_ids(model, params, sources, decode, mesh)]
    assert len({tuple(e) for e in expected}) > 4, f"degenerate outputs: {expected}"
    kwargs = {"num_beams": 4 if method == "beam" else 1, "length_penalty": 0.0,
              "do_sample": False}
    fsmt = transformers.FSMTForConditionalGeneration.from_pretrained(out).eval()
    got = [_hf_ids(fsmt, s.tolist(), decode, model.config.max_len, **kwargs) for s in sources]
    assert got == expected
    fsmt.save_pretrained(tmp_path / "again")
    again = transformers.FSMTForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    got = [_hf_ids(again, s.tolist(), decode, model.config.max_len, **kwargs) for s in sources]
    assert got == expected


@pytest.mark.slow
def test_text_in_text_out_matches_distill_jax_generate(exported, ours, sentences, tmp_path):
    root, workdir, teacher, out = exported
    model, _, _, decode, _ = ours
    (tmp_path / "in.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    _cli(workdir, teacher, "generate", "--name", NAME, "--checkpoint", "latest",
         "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt"), *TRAIN,
         "--set", "decode.beam_size=4", "--set", "decode.length_penalty=0.0")
    expected = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    fsmt = transformers.FSMTForConditionalGeneration.from_pretrained(out).eval()
    got = []
    for text in sentences:
        batch = tokenizer([text], return_tensors="pt")
        bound = export.max_new_tokens(batch["input_ids"][0].tolist(), decode,
                                      model.config.max_len)
        with torch.no_grad():
            ids = fsmt.generate(**batch, num_beams=4, length_penalty=0.0, max_new_tokens=bound)
        got.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    assert got == expected


@pytest.mark.slow
def test_bad_input_is_refused_and_writes_nothing(exported):
    root, workdir, teacher, _ = exported
    out = root / "refused"
    pre_ln = _cli(workdir, teacher, "export", "--name", NAME, "--out", str(out), *TRAIN,
                  "--set", "student.pre_layer_norm=True", check=False)
    assert pre_ln.returncode == 2 and "pre_layer_norm" in pre_ln.stderr, pre_ln.stderr
    missing = _cli(workdir, teacher, "export", "--name", "no-such-run", "--out", str(out),
                   *TRAIN, check=False)
    assert missing.returncode == 2 and "no-such-run" in missing.stderr, missing.stderr
    taken = _cli(workdir, teacher, "export", "--name", NAME, "--out", str(exported[3]), *TRAIN,
                 check=False)
    assert taken.returncode == 2 and "--overwrite" in taken.stderr, taken.stderr
    assert not [p for p in root.iterdir() if p.name.startswith((".refused", "refused"))]
