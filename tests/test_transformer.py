"""The student Transformer: incremental decoding, padding, sharding metadata, dropout."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distill_jax.models.transformer import Transformer, TransformerConfig, init_decode_cache

SRC = np.array([[5, 6, 7, 8, 2, 0], [9, 4, 2, 0, 0, 0]], np.int32)  # [batch, src]
TGT_IN = np.array([[1, 10, 11, 4, 5], [1, 6, 7, 2, 0]], np.int32)  # [batch, tgt]


def tiny_config(**overrides) -> TransformerConfig:
    """A 2+2 layer model small enough to compile quickly."""
    fields = dict(vocab_size=13, d_model=16, num_heads=2, mlp_dim=24, num_encoder_layers=2,
                  num_decoder_layers=2, max_len=12)
    fields.update(overrides)
    return TransformerConfig(**fields)


def init(config: TransformerConfig):
    model = Transformer(config)
    variables = jax.jit(model.init)(jax.random.key(0), SRC, TGT_IN)
    return model, variables


@functools.partial(jax.jit, static_argnames="model")
def full_and_incremental(model, params, src, tgt_in):
    """Logits of one full forward pass and of position-by-position decoding with the cache."""
    full = model.apply({"params": params}, src, tgt_in)  # [batch, tgt, vocab]
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    cache = init_decode_cache(model, params, encoded, src, tgt_in.shape[1])
    steps = []
    for t in range(tgt_in.shape[1]):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, encoded, src, tgt_in[:, t:t + 1],
            decode=True, mutable=["cache"], method=Transformer.decode)
        cache = variables["cache"]
        steps.append(logits)
    return full, jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize("pre_layer_norm,positions", [(False, "sinusoidal"), (True, "learned")])
def test_incremental_decoding_matches_full_forward(pre_layer_norm, positions):
    model, variables = init(tiny_config(pre_layer_norm=pre_layer_norm, positions=positions))
    params = nn.unbox(variables["params"])
    if positions == "learned":
        assert "embedding" in params["decoder"]["positions"]
    full, incremental = full_and_incremental(model, params, SRC, TGT_IN)
    assert full.shape == (2, 5, 13) and full.dtype == jnp.float32
    np.testing.assert_array_less(1e-2, np.std(np.asarray(full)))  # not a degenerate output
    np.testing.assert_allclose(incremental, full, rtol=0, atol=1e-5)


def test_source_padding_does_not_change_real_tokens():
    model, variables = init(tiny_config())
    apply = jax.jit(model.apply)
    narrow = apply(variables, SRC[:, :5], TGT_IN)  # the widest sentence has no padding
    wide = np.zeros((2, 11), np.int32)
    wide[:, :6] = SRC  # same sentences, 6 more pads
    np.testing.assert_allclose(apply(variables, wide, TGT_IN), narrow, rtol=0, atol=1e-5)
    # A different source does change the output (the comparison above can fail).
    other = SRC[:, :5].copy()
    other[0, 0] = 12
    assert np.abs(apply(variables, other, TGT_IN)[0] - narrow[0]).max() > 1e-3


def test_parameters_carry_logical_axes():
    _, variables = init(tiny_config(positions="learned"))
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["shared_embedding"]["embedding"] == P("vocab", "embed")
    encoder_attention = specs["encoder"]["layer_0"]["self_attention"]
    assert encoder_attention["query"]["kernel"] == P("embed", "heads", "kv")
    assert encoder_attention["out"]["kernel"] == P("heads", "kv", "embed")
    decoder_layer = specs["decoder"]["layer_1"]
    assert decoder_layer["cross_attention"]["key"]["kernel"] == P("embed", "heads", "kv")
    assert decoder_layer["feed_forward"]["intermediate"]["kernel"] == P("embed", "mlp")
    assert decoder_layer["feed_forward_block"]["norm"]["scale"] == P("embed")
    assert specs["decoder"]["positions"]["embedding"] == P(None, "embed")
    # Only the one shared table has a vocab axis: no separate output projection.
    vocab_leaves = [s for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
                    if "vocab" in s]
    assert len(vocab_leaves) == 1


def test_dropout_only_when_not_deterministic():
    model, variables = init(tiny_config(dropout_rate=0.3))
    apply = jax.jit(model.apply, static_argnames="deterministic")
    reference = apply(variables, SRC, TGT_IN)
    same_rng = apply(variables, SRC, TGT_IN, deterministic=True,
                     rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(same_rng, reference)
    noisy_1 = apply(variables, SRC, TGT_IN, deterministic=False, rngs={"dropout": jax.random.key(1)})
    noisy_2 = apply(variables, SRC, TGT_IN, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(noisy_1 - reference).max() > 1e-3
    assert np.abs(noisy_1 - noisy_2).max() > 1e-3


@pytest.mark.parametrize("overrides,message", [
    (dict(d_model=15), "divisible by num_heads"),
    (dict(vocab_size=3), "vocab_size"),
    (dict(positions="rotary"), "positions"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(attention_impl="cudnn"), "forward-only"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_fused_attention_path_matches_einsum():
    """``attention_impl="xla"`` (jax.nn.dot_product_attention, the API behind the GPU's
    cudnn kernel) computes what our einsum attention computes, padding and causal masks
    included, in the forward pass and the gradient; incremental decoding (einsum only)
    still agrees with the fused full forward."""
    model, variables = init(tiny_config())
    fused = Transformer(tiny_config(attention_impl="xla"))
    params = variables["params"]

    def loss(m, p):
        return jnp.sum(m.apply({"params": p}, SRC, TGT_IN) ** 2)

    np.testing.assert_allclose(fused.apply(variables, SRC, TGT_IN),
                               model.apply(variables, SRC, TGT_IN), rtol=1e-5, atol=1e-5)
    grads = jax.grad(functools.partial(loss, model))(params)
    fused_grads = jax.grad(functools.partial(loss, fused))(params)
    for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(fused_grads)):
        np.testing.assert_allclose(f, g, rtol=1e-4, atol=1e-5)
    full, incremental = full_and_incremental(fused, params, SRC, TGT_IN)
    real = TGT_IN != 0
    np.testing.assert_allclose(incremental[real], full[real], rtol=1e-4, atol=1e-5)
