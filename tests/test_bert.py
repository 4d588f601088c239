"""The BERT teacher and the safetensors loader, checked against transformers' PyTorch BERT."""

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from distill_jax import hf
from distill_jax.models import bert

from tiny_bert import TINY, save_tiny_bert

CLS, SEP, PAD = 2, 3, 0  # ids used as special tokens in the tiny vocabulary


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random BertForMaskedLM checkpoint (``bert.``-prefixed keys, MLM transform)."""
    path = tmp_path_factory.mktemp("tiny_bert")
    save_tiny_bert(path, hidden_act="gelu", seed=0)
    return path


def torch_hidden(model: transformers.BertModel, ids, token_types, mask) -> np.ndarray:
    """transformers' last_hidden_state for numpy int inputs."""
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            token_type_ids=torch.tensor(token_types, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.last_hidden_state.numpy()


def rewrite_checkpoint(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """Copies a single-file checkpoint, passing its tensors dict through ``edit``."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    save_file(edit(tensors), dst / "model.safetensors")
    return dst


def unboxed_init_shapes(model, method=None):
    """Shapes of the ``params`` tree that ``model.init`` creates."""
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), ids, method=method or model.__call__)
    )
    return jax.tree.map(lambda x: x.shape, nn.meta.unbox(shapes["params"]))


@pytest.mark.parametrize("hidden_act,max_shard_size", [("gelu", None), ("gelu_new", "20KB")])
def test_tiny_parity_with_transformers(tmp_path, hidden_act, max_shard_size):
    """Hidden states equal transformers' BertModel with end padding and token types, for
    the exact and the tanh GELU, from one file and from sharded safetensors."""
    torch_model = save_tiny_bert(
        tmp_path, hidden_act=hidden_act, seed=1, max_shard_size=max_shard_size
    )
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_size is not None)
    model, params, config = hf.load_bert(tmp_path)
    assert config.hidden_act == hidden_act
    assert jax.tree.map(lambda x: x.shape, params) == unboxed_init_shapes(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))

    rng = np.random.default_rng(0)
    ids = rng.integers(4, TINY["vocab_size"], size=(3, 11))
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    ids = np.where(mask == 1, ids, PAD)
    token_types = np.zeros_like(ids)
    token_types[:, 5:] = 1

    got = model.apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(token_types), jnp.asarray(mask)
    )
    want = torch_hidden(torch_model.bert, ids, token_types, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_minilm_parity_with_transformers(minilm_dir):
    """all-MiniLM-L6-v2 (keys without ``bert.``, a pooler to ignore) on real sentences."""
    tokenizer = hf.load_tokenizer(minilm_dir)
    sentences = [
        "A man is playing a guitar on the street.",
        "Two dogs run.",
        "The quick brown fox jumps over the lazy dog, while a cat watches silently.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any() and ids[1, 0] == tokenizer.cls_token_id
    token_types = batch["token_type_ids"]

    model, params, config = hf.load_bert(minilm_dir)
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    assert jax.tree.map(lambda x: x.shape, params) == unboxed_init_shapes(model)
    got = jax.jit(model.apply)({"params": params}, ids, token_types, mask)
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    want = torch_hidden(reference, ids, token_types, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_middle_padding_equals_packed(tiny_dir):
    """`[CLS] a b [SEP] c d [SEP]` equals the same row with two pads after the first
    [SEP] (masked, skipped by the position ids), as the C-MLM teacher is fed."""
    model, params, _ = hf.load_bert(tiny_dir)
    a, b, c, d = 10, 11, 12, 13
    # row 0: packed, padded at the end; row 1: padded in the middle
    ids = np.array([[CLS, a, b, SEP, c, d, SEP, PAD, PAD], [CLS, a, b, SEP, PAD, PAD, c, d, SEP]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 1, 1, 1]])
    positions = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 0, 0, 4, 5, 6]])
    token_types = np.array([[0, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1]])
    hidden = np.asarray(model.apply({"params": params}, ids, token_types, mask, positions))
    real = mask[1] == 1
    np.testing.assert_allclose(hidden[1, real], hidden[0, :7], atol=1e-5, rtol=0)
    assert np.abs(hidden[1, real] - hidden[0, :7]).max() < np.abs(hidden[0, 4:7]).mean()


def test_input_longer_than_the_position_table_is_refused(tiny_dir):
    model, params, config = hf.load_bert(tiny_dir)
    ids = np.full((1, config.max_position_embeddings + 1), CLS)
    with pytest.raises(ValueError, match="longer than BERT's max_position_embeddings"):
        model.apply({"params": params}, ids)


def test_attention_kernel_choice_keeps_the_outputs(tiny_dir):
    """load_bert(attention_impl="xla") (jax.nn.dot_product_attention, the API of the
    GPU's fused cuDNN kernel) gives the einsum attention's hidden states, padding
    included; an unknown kernel is refused by name."""
    model, params, _ = hf.load_bert(tiny_dir)
    fused, fused_params, config = hf.load_bert(tiny_dir, attention_impl="xla")
    assert config.attention_impl == "xla"
    ids = np.array([[CLS, 10, 11, SEP, 12, SEP, PAD], [CLS, 13, SEP, 14, 15, 16, SEP]])
    mask = (ids != PAD).astype(np.int32)
    want = np.asarray(model.apply({"params": params}, ids, None, mask))
    got = np.asarray(fused.apply({"params": fused_params}, ids, None, mask))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        hf.load_bert(tiny_dir, attention_impl="flash")


def test_cmlm_head_init_and_logits(tiny_dir):
    """The loaded MLM transform is kept, every output column is BERT's embedding of the
    mapped id (pieces BERT lacks, <unk> and fillers: [UNK]'s, as in the reference), and the
    logits equal transformers' transform followed by that projection."""
    vocab = 16
    unk = 1  # the tiny teacher's [UNK] id
    teacher_ids = np.array([PAD, CLS, SEP, unk, 50, 7, unk, 98, 12, unk, 5, 6, unk, 0, 33, 20])
    model, params, config = hf.load_bert(tiny_dir, cmlm_vocab_size=vocab)
    params = bert.init_cmlm_head(config, params, teacher_ids, jax.random.key(3))
    assert jax.tree.map(lambda x: x.shape, params) == unboxed_init_shapes(model, model.cmlm_logits)

    tensors = load_file(tiny_dir / "model.safetensors")
    embeddings = tensors["bert.embeddings.word_embeddings.weight"]  # [bert_vocab, hidden]
    head = params["cmlm_head"]
    kernel = np.asarray(head["output"]["kernel"])  # [hidden, vocab]
    for i in range(vocab):
        np.testing.assert_array_equal(kernel[:, i], embeddings[teacher_ids[i]])
    unknown = [i for i in range(vocab) if teacher_ids[i] == unk]
    assert unknown == [3, 6, 9, 12]
    for i in unknown:
        np.testing.assert_array_equal(kernel[:, i], embeddings[unk])
    assert np.all(np.asarray(head["output"]["bias"]) == 0)
    np.testing.assert_array_equal(
        np.asarray(head["dense"]["kernel"]), tensors["cls.predictions.transform.dense.weight"].T
    )
    np.testing.assert_array_equal(
        np.asarray(head["LayerNorm"]["scale"]),
        tensors["cls.predictions.transform.LayerNorm.weight"],
    )

    torch_model = transformers.BertForMaskedLM.from_pretrained(tiny_dir).eval()
    ids = np.array([[CLS, 20, 21, SEP, 30, 31, SEP], [CLS, 40, SEP, 41, 42, 43, SEP]])
    token_types = np.array([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
    mask = np.ones_like(ids)
    logits = model.apply({"params": params}, ids, token_types, mask, method=model.cmlm_logits)
    assert logits.shape == (2, 7, vocab) and logits.dtype == jnp.float32
    with torch.no_grad():
        hidden = torch_model.bert(
            input_ids=torch.tensor(ids),
            token_type_ids=torch.tensor(token_types),
            attention_mask=torch.tensor(mask),
        ).last_hidden_state
        transformed = torch_model.cls.predictions.transform(hidden).numpy()
    want = transformed @ kernel + np.asarray(head["output"]["bias"])
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)


def test_cmlm_head_without_mlm_transform(tiny_dir, tmp_path):
    """Keys without ``bert.`` and no cls.* (like all-MiniLM-L6-v2): init_cmlm_head creates
    the whole head; the output columns still come from BERT's embeddings, [UNK]'s for the
    pieces BERT lacks."""
    plain = rewrite_checkpoint(
        tiny_dir,
        tmp_path / "plain",
        lambda t: {k[len("bert.") :]: v for k, v in t.items() if k.startswith("bert.")},
    )
    model, params, config = hf.load_bert(plain, cmlm_vocab_size=8)
    assert "cmlm_head" not in params
    teacher_ids = np.array([0, 2, 3, 1, 9, 1, 11, 12])  # 1: the tiny teacher's [UNK]
    params = bert.init_cmlm_head(config, params, teacher_ids, jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, params) == unboxed_init_shapes(model, model.cmlm_logits)
    np.testing.assert_array_equal(np.asarray(params["cmlm_head"]["LayerNorm"]["scale"]), 1.0)
    embeddings = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
    kernel = np.asarray(params["cmlm_head"]["output"]["kernel"])  # [hidden, 8]
    np.testing.assert_array_equal(kernel, embeddings[teacher_ids].T)
    np.testing.assert_array_equal(kernel[:, 5], embeddings[1])


def test_pickle_checkpoint_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **TINY}))
    # Not a valid pickle: any attempt to unpickle it would fail with a different error.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x05garbage, not a pickle")
    with pytest.raises(
        hf.CheckpointError,
        match=r"pickle checkpoints are refused.*"
        r"safe_serialization=True",
    ):
        hf.load_bert(tmp_path)


def test_missing_key_is_named(tiny_dir, tmp_path):
    key = "bert.encoder.layer.1.attention.self.value.bias"
    broken = rewrite_checkpoint(
        tiny_dir, tmp_path / "broken", lambda t: {k: v for k, v in t.items() if k != key}
    )
    with pytest.raises(
        hf.CheckpointError, match=r"missing key.*'encoder\.layer\.1\.attention\.self\.value\.bias'"
    ):
        hf.load_bert(broken)


def test_wrong_shape_names_key_and_shapes(tiny_dir, tmp_path):
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    broken = rewrite_checkpoint(
        tiny_dir, tmp_path / "broken", lambda t: {**t, key: np.zeros((36, 32), np.float32)}
    )
    with pytest.raises(
        hf.CheckpointError,
        match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.weight' has shape "
        r"\(36, 32\), expected \(37, 32\)",
    ):
        hf.load_bert(broken)


def test_unknown_key_is_named(tiny_dir, tmp_path):
    extra = "bert.encoder.layer.2.output.dense.bias"
    broken = rewrite_checkpoint(
        tiny_dir, tmp_path / "broken", lambda t: {**t, extra: np.zeros((32,), np.float32)}
    )
    with pytest.raises(hf.CheckpointError, match=r"not explained.*encoder\.layer\.2\.output"):
        hf.load_bert(broken)


def test_missing_local_path_and_offline_hub_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at .*does-not-exist"):
        hf.load_bert(tmp_path / "does-not-exist")
    # conftest sets HF_HUB_OFFLINE=1: the download fails, the error names the model
    with pytest.raises(OSError, match="'no-such-org/no-such-bert' is not a local folder"):
        hf.load_bert("no-such-org/no-such-bert")
    with pytest.raises(hf.CheckpointError, match="no tokenizer"):
        hf.load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_act", "swish", "hidden_act='swish' is not supported"),
        ("position_embedding_type", "relative_key", "position_embedding_type='relative_key'"),
        ("model_type", "roberta", "model_type='roberta'"),
    ],
)
def test_config_refuses_unsupported_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        bert.BertConfig.from_hf_dict({**TINY, field: value})


def test_sharded_apply_matches_single_device():
    """Under a (data 2, fsdp 2, tensor 2) mesh with the project's logical-axis rules, the
    parameters shard as annotated and the C-MLM logits equal the single-device ones."""
    from distill_jax.sharding import LOGICAL_AXIS_RULES

    config = bert.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
        cmlm_vocab_size=24,
    )
    model = bert.BertModel(config)
    ids = np.random.default_rng(0).integers(4, 64, size=(4, 8))
    boxed = jax.jit(lambda: model.init(jax.random.key(0), ids, method=model.cmlm_logits))()[
        "params"
    ]
    params = nn.meta.unbox(boxed)
    want = model.apply({"params": params}, ids, method=model.cmlm_logits)

    mesh = jax.make_mesh(
        (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)
    assert shardings["cmlm_head"]["output"]["kernel"].spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )
    sharded = jax.device_put(params, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        got = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.cmlm_logits))(
            sharded, ids
        )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_config_from_hf_dict_keeps_compute_dtype_and_overrides():
    """transformers 5 writes the weights' storage "dtype" into config.json; it must not
    become the compute dtype, and overrides win over the file."""
    config = bert.BertConfig.from_hf_dict(
        {**TINY, "dtype": "bfloat16", "hidden_act": "relu"},
        cmlm_vocab_size=16,
        hidden_dropout_prob=0.0,
    )
    assert (
        config.dtype,
        config.hidden_act,
        config.cmlm_vocab_size,
        config.hidden_dropout_prob,
        config.head_dim,
    ) == (jnp.float32, "relu", 16, 0.0, 8)
    with pytest.raises(TypeError, match="unknown BertConfig override"):
        bert.BertConfig.from_hf_dict(TINY, hidden_dim=3)
    with pytest.raises(ValueError, match=r"missing required BERT field\(s\) \['vocab_size'\]"):
        bert.BertConfig.from_hf_dict({k: v for k, v in TINY.items() if k != "vocab_size"})


def test_exact_gelu_matches_torch_and_jax():
    """``fast_paths.gelu_erf`` (the erf form BERT's "gelu" names) equals torch's exact GELU to
    float32 rounding over the range a feed-forward layer sees, including large negative
    inputs, and jax.nn.gelu's erfc form likewise; its gradient matches jax's."""
    from distill_jax.models import fast_paths

    x = np.concatenate([np.linspace(-12, 12, 4001), [-30.0, -8.5, 0.0, 7.25, 30.0]]).astype(
        np.float32
    )
    ours = np.asarray(fast_paths.gelu_erf(jnp.asarray(x)))
    theirs = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    # the erf form loses relative precision where GELU is tiny (x << 0), as torch's does
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(
        ours, np.asarray(jax.nn.gelu(x, approximate=False)), rtol=2e-6, atol=1e-6
    )
    assert fast_paths.gelu_erf(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
    grad = jax.vmap(jax.grad(fast_paths.gelu_erf))(jnp.asarray(x))
    want = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=2e-5, atol=2e-6)


def test_fast_paths_switch_off_keeps_the_teacher_outputs(monkeypatch):
    """With ``fast_paths.ENABLED`` off the teacher's C-MLM logits (inference, padding
    included) are the same to float32 rounding, computed with jax.nn.gelu's erfc form
    instead of the erf one."""
    from distill_jax.models import fast_paths

    config = bert.BertConfig(**TINY, cmlm_vocab_size=16)
    model = bert.BertModel(config)
    ids = np.array([[CLS, 10, 11, SEP, 12, SEP, PAD], [CLS, 13, SEP, 14, 15, 16, SEP]])
    mask = (ids != PAD).astype(np.int32)
    params = model.init(jax.random.key(0), ids, None, mask, method=model.cmlm_logits)

    def run(enabled):
        monkeypatch.setattr(fast_paths, "ENABLED", enabled)
        fn = jax.jit(lambda p: model.apply(p, ids, None, mask, method=model.cmlm_logits))
        return np.asarray(fn(params)), str(jax.make_jaxpr(fn)(params))

    (fast, fast_jaxpr), (plain, plain_jaxpr) = run(True), run(False)
    np.testing.assert_allclose(plain, fast, rtol=1e-5, atol=1e-5)
    assert "erfc" in plain_jaxpr and "erfc" not in fast_jaxpr
    assert fast_jaxpr.count("dot_general") > plain_jaxpr.count("dot_general")
