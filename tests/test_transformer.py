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
    fields = dict(
        vocab_size=13,
        d_model=16,
        num_heads=2,
        mlp_dim=24,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_len=12,
    )
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
            {"params": params, "cache": cache},
            encoded,
            src,
            tgt_in[:, t : t + 1],
            decode=True,
            mutable=["cache"],
            method=Transformer.decode,
        )
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
    vocab_leaves = [
        s for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)) if "vocab" in s
    ]
    assert len(vocab_leaves) == 1


def test_dropout_only_when_not_deterministic():
    model, variables = init(tiny_config(dropout_rate=0.3))
    apply = jax.jit(model.apply, static_argnames="deterministic")
    reference = apply(variables, SRC, TGT_IN)
    same_rng = apply(
        variables, SRC, TGT_IN, deterministic=True, rngs={"dropout": jax.random.key(1)}
    )
    np.testing.assert_array_equal(same_rng, reference)
    noisy_1 = apply(
        variables, SRC, TGT_IN, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    noisy_2 = apply(
        variables, SRC, TGT_IN, deterministic=False, rngs={"dropout": jax.random.key(2)}
    )
    assert np.abs(noisy_1 - reference).max() > 1e-3
    assert np.abs(noisy_1 - noisy_2).max() > 1e-3


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(d_model=15), "divisible by num_heads"),
        (dict(vocab_size=3), "vocab_size"),
        (dict(positions="rotary"), "positions"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(attention_impl="cudnn"), "forward-only"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_sequences_longer_than_the_position_table_are_refused():
    """A padded length past max_len would read NaN rows from the position table (jnp.take
    fills out-of-range rows) and turn the whole batch into NaN; it is refused by name."""
    model, variables = init(tiny_config(max_len=6))  # SRC is 6 wide, TGT_IN 5
    params = variables["params"]
    long_src = np.pad(SRC, ((0, 0), (0, 1)))
    with pytest.raises(ValueError, match="source length 7 is longer than the model's max_len 6"):
        model.apply({"params": params}, long_src, TGT_IN)
    long_tgt = np.pad(TGT_IN, ((0, 0), (0, 2)))
    with pytest.raises(ValueError, match="target length 7 is longer than the model's max_len 6"):
        model.apply({"params": params}, SRC, long_tgt)
    # At the limit the forward pass is finite.
    assert np.isfinite(np.asarray(model.apply({"params": params}, SRC, TGT_IN))).all()


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
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

    np.testing.assert_allclose(
        fused.apply(variables, SRC, TGT_IN),
        model.apply(variables, SRC, TGT_IN),
        rtol=1e-5,
        atol=1e-5,
    )
    grads = jax.grad(functools.partial(loss, model))(params)
    fused_grads = jax.grad(functools.partial(loss, fused))(params)
    # float32 rounding: each of the two, and the einsum attention before its softmax
    # normalisation was deferred, is within 1.5e-5-2.1e-5 of a float64 run of this model
    for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(fused_grads)):
        np.testing.assert_allclose(f, g, rtol=1e-4, atol=4e-5)
    full, incremental = full_and_incremental(fused, params, SRC, TGT_IN)
    real = TGT_IN != 0
    np.testing.assert_allclose(incremental[real], full[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "in_dims,x_shape,k_shape",
    [
        (1, (3, 5, 8), (8, 6)),  # feed-forward: [batch, len, embed] @ [embed, mlp]
        (1, (3, 5, 8), (8, 2, 4)),  # q/k/v projections: -> [batch, len, heads, kv]
        (2, (3, 5, 2, 4), (2, 4, 8)),  # output projection: [.., heads, kv] -> [.., embed]
    ],
)
def test_matmul_matches_einsum_values_and_gradients(in_dims, x_shape, k_shape):
    """fast_paths.matmul (flattened rows, custom backward with the CPU transpose copy)
    computes the einsum over the trailing axes, and so do its two gradients."""
    from distill_jax.models import fast_paths

    kx, kk, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, k_shape)
    letters = "abcdefg"[: len(k_shape)]
    spec = f"...{letters[:in_dims]},{letters}->...{letters[in_dims:]}"
    out_shape = x_shape[: len(x_shape) - in_dims] + k_shape[in_dims:]
    cotangent = jax.random.normal(kg, out_shape)

    def loss(f, x, kernel):
        return jnp.sum(f(x, kernel) * cotangent)

    ours = functools.partial(fast_paths.matmul, in_dims=in_dims)
    ref = functools.partial(jnp.einsum, spec, precision="highest")
    np.testing.assert_allclose(jax.jit(ours)(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1)))(x, kernel)
    want = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(x, kernel)
    for got, expected in zip(grads, want):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_matmul_keeps_dtypes():
    """bf16 inputs give bf16 gradients; a float32 result (the logits) of bf16 inputs
    differentiates back to bf16 activations and kernels."""
    from distill_jax.models import fast_paths

    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    kernel = jnp.ones((4, 5), jnp.bfloat16)
    out = fast_paths.matmul(x, kernel, 1, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 5)
    assert fast_paths.matmul(x, kernel, 1).dtype == jnp.bfloat16
    dx, dk = jax.grad(
        lambda x, k: jnp.sum(fast_paths.matmul(x, k, 1, out_dtype=jnp.float32)), argnums=(0, 1)
    )(x, kernel)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.full((2, 3, 4), 5.0))
    np.testing.assert_array_equal(np.asarray(dk, np.float32), np.full((4, 5), 6.0))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_einsum_attention_matches_plain_softmax(dtype, tol):
    """Our einsum attention (normalisation deferred to after the weighted sum) equals
    softmax(q k^T / sqrt(d)) v computed the textbook way, in value and gradient, including
    a query row whose keys are all masked (uniform weights either way), and keeps the
    compute dtype."""
    from distill_jax.models import fast_paths, layers

    attention = layers.MultiHeadAttention(num_heads=2, head_dim=4, dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    mask = np.ones((2, 1, 5, 5), bool)
    mask[0, :, :, 3:] = False  # padding keys
    mask[1, :, 2, :] = False  # a query row that sees nothing
    params = nn.unbox(attention.init(jax.random.key(0), x, x, mask)["params"])

    def reference(params, x):
        p = jax.tree.map(lambda a: a.astype(dtype), params)
        xd = x.astype(dtype)
        q, k, v = (
            jnp.einsum("ble,ehd->blhd", xd, p[n]["kernel"]) + p[n]["bias"]
            for n in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / 2.0
        weights = jax.nn.softmax(jnp.where(mask, logits, fast_paths.MASK_VALUE), -1).astype(dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return jnp.einsum("bqhd,hde->bqe", context, p["out"]["kernel"]) + p["out"]["bias"]

    def ours(params, x):
        return attention.apply({"params": params}, x, x, mask)

    out, ref = ours(params, x), reference(params, x)
    assert out.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol
    )
    # the fully masked row averages the values uniformly, as softmax does
    assert np.isfinite(np.asarray(out, np.float32)).all()
    if dtype == jnp.float32:

        def loss(f):
            return lambda p, x: jnp.sum(jnp.sin(f(p, x)))

        g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
        g_ref = jax.grad(loss(reference), argnums=(0, 1))(params, x)
        for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax_with_either_kind_of_row_sums(dtype):
    """Our LayerNorm has flax.linen.LayerNorm's parameters and, with reductions, its exact
    outputs and gradients; with the statistics as matrix-vector products the outputs and
    gradients agree to float32 rounding (rows with a large mean included), in either
    compute dtype."""
    from distill_jax.models import fast_paths, layers

    assert fast_paths.layer_norm_stats_by_dot(True)  # deterministic calls take the products
    rng = np.random.default_rng(0)
    x = jnp.asarray(
        rng.standard_normal((3, 7, 48)) * 3 + rng.standard_normal((3, 7, 1)) * 50, jnp.float32
    ).astype(dtype)
    ref = nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False)
    params = ref.init(jax.random.key(0), x)
    params = jax.tree.map(
        lambda a: a + jnp.asarray(rng.standard_normal(a.shape), jnp.float32), params
    )

    def loss(module, p, x, **kwargs):
        return jnp.sum(jnp.sin(module.apply(p, x, **kwargs).astype(jnp.float32)))

    want = ref.apply(params, x)
    want_grads = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(params, x)
    for by_dot in (False, True):
        ours = layers.layer_norm(1e-5, dtype)
        shapes = jax.tree.map(jnp.shape, nn.unbox(ours.init(jax.random.key(0), x)))
        assert shapes == jax.tree.map(jnp.shape, params)
        got = ours.apply(params, x, deterministic=by_dot)
        got_grads = jax.grad(functools.partial(loss, ours, deterministic=by_dot), argnums=(0, 1))(
            params, x
        )
        assert got.dtype == dtype
        if not by_dot:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
            for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
                np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        else:
            tol = 2e-5 if dtype == jnp.float32 else 2e-2
            np.testing.assert_allclose(
                np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
            )
            for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
                np.testing.assert_allclose(
                    np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 10
                )


def test_inference_calls_on_cpu_take_layer_norm_statistics_by_products():
    """Deterministic calls of the student on CPU compute LayerNorm statistics with dot
    products (2 per LayerNorm more than a training call), and give the same outputs as the
    reduction form to float32 rounding."""
    from distill_jax.models import fast_paths

    assert jax.default_backend() == "cpu"
    assert fast_paths.layer_norm_stats_by_dot(True)
    assert not fast_paths.layer_norm_stats_by_dot(False)
    cfg = TransformerConfig(
        vocab_size=50,
        d_model=16,
        num_heads=2,
        mlp_dim=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
        max_len=8,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        activation_dropout_rate=0.0,
    )
    model = Transformer(cfg)
    src = jnp.asarray(np.random.default_rng(1).integers(3, 50, (2, 6)), jnp.int32)
    tgt = jnp.asarray(np.random.default_rng(2).integers(3, 50, (2, 5)), jnp.int32)
    params = model.init(jax.random.key(0), src, tgt)

    def dots(deterministic):
        jaxpr = jax.make_jaxpr(
            lambda p: model.apply(
                p, src, tgt, deterministic=deterministic, rngs={"dropout": jax.random.key(1)}
            )
        )(params)
        return str(jaxpr).count("dot_general")

    norms = 2 + 3  # encoder layer: 2 LayerNorms, decoder layer: 3 (post-LN, no final norms)
    assert dots(True) == dots(False) + 2 * norms
    infer = model.apply(params, src, tgt, deterministic=True)
    train = model.apply(params, src, tgt, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_allclose(np.asarray(infer), np.asarray(train), rtol=1e-5, atol=1e-5)


def test_mask_by_bias_has_the_values_and_gradient_of_the_select():
    """The additive mask of inference calls gives every masked logit the same value, so its
    softmax equals the select form's (partly and fully masked rows), and its gradient
    leaves masked logits out as the select's does."""
    from distill_jax.models import fast_paths

    logits = jax.random.normal(jax.random.key(0), (2, 3, 4, 6)) * 30.0
    mask = np.ones((2, 1, 4, 6), bool)
    mask[0, :, :, 4:] = False  # padding keys
    mask[1, :, 1, :] = False  # a query row that sees nothing
    mask = jnp.asarray(mask)
    biased = fast_paths.mask_by_bias(logits, mask)
    np.testing.assert_array_equal(
        np.asarray(biased), np.asarray(jnp.where(mask, logits, fast_paths.MASK_BIAS))
    )

    def softmax_of(masking):
        return lambda x: jax.nn.softmax(masking(x), axis=-1)

    by_bias = softmax_of(lambda x: fast_paths.mask_by_bias(x, mask))
    by_select = softmax_of(lambda x: jnp.where(mask, x, fast_paths.MASK_VALUE))
    np.testing.assert_allclose(by_bias(logits), by_select(logits), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(by_bias(logits)[1, :, 1], np.full((3, 6), 1 / 6), rtol=1e-6)
    weights = jax.random.normal(jax.random.key(1), logits.shape)

    def weighted_grad(f):
        return jax.grad(lambda x: jnp.sum(f(x) * weights))(logits)

    grad_bias, grad_select = weighted_grad(by_bias), weighted_grad(by_select)
    np.testing.assert_allclose(grad_bias, grad_select, rtol=1e-5, atol=1e-7)
    assert not np.asarray(grad_bias)[1, :, 1].any()  # the fully masked row: no gradient
    assert not np.asarray(grad_bias)[0, :, :, 4:].any()


def test_inference_attention_with_a_bias_mask_equals_the_select_form(monkeypatch):
    """Inference calls (mask as a bias) and the select form of training calls give the
    same attention outputs: padding keys, a causal mask, a fully masked query row."""
    from distill_jax.models import fast_paths, layers

    attention = layers.MultiHeadAttention(num_heads=2, head_dim=4)
    x = jax.random.normal(jax.random.key(2), (3, 5, 8))
    mask = np.tril(np.ones((5, 5), bool))[None, None].repeat(3, 0)
    mask[0, :, :, 3:] = False  # padding keys
    mask[2, :, 4, :] = False  # a query row that sees nothing
    params = attention.init(jax.random.key(0), x, x, mask)

    def call(by_bias):
        monkeypatch.setattr(fast_paths, "MASK_BY_BIAS", by_bias)
        fn = jax.jit(lambda p, x: attention.apply(p, x, x, mask, deterministic=True))
        return np.asarray(fn(params, x)), str(jax.make_jaxpr(fn)(params, x))

    (biased, biased_jaxpr), (selected, selected_jaxpr) = call(True), call(False)
    assert "name=mask_by_bias" in biased_jaxpr and "name=mask_by_bias" not in selected_jaxpr
    np.testing.assert_allclose(biased, selected, rtol=1e-6, atol=1e-6)


def count_primitive(closed_jaxpr, name: str) -> int:
    """How many times primitive ``name`` runs in a traced program, sub-programs (jit,
    custom VJPs, control flow) counted at every use (the printed jaxpr shows a repeated
    sub-program once)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    def walk(jaxpr) -> int:
        count = 0
        for eqn in jaxpr.eqns:
            count += eqn.primitive.name == name
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, ClosedJaxpr):
                        count += walk(sub.jaxpr)
                    elif isinstance(sub, Jaxpr):
                        count += walk(sub)
        return count

    return walk(closed_jaxpr.jaxpr)


def test_fast_paths_switch_off_keeps_the_outputs_and_changes_the_program(monkeypatch):
    """With ``fast_paths.ENABLED`` off the student computes every operation in its plain
    form: the same inference logits and training gradients to float32 rounding, from a
    different program (no LayerNorm products, no mask bias, no custom VJPs)."""
    from distill_jax.models import fast_paths

    cfg = tiny_config(dropout_rate=0.0, pre_layer_norm=True)  # pre-LN: final norms too
    model, variables = init(cfg)
    src, tgt = jnp.asarray(SRC), jnp.asarray(TGT_IN)

    def infer(p):
        return model.apply(p, src, tgt, deterministic=True)

    def grads(p):
        def loss(p):
            logits = model.apply(p, src, tgt, deterministic=False)
            return jnp.sum(jnp.sin(logits))

        return jax.grad(loss)(p)

    def run(enabled):
        monkeypatch.setattr(fast_paths, "ENABLED", enabled)
        # fresh lambdas, so that no call reuses the other setting's trace
        jaxpr = jax.make_jaxpr(lambda p: infer(p))(variables)
        return (
            np.asarray(jax.jit(lambda p: infer(p))(variables)),
            jax.jit(lambda p: grads(p))(variables),
            jaxpr,
        )

    (fast, fast_grads, fast_jaxpr), (plain, plain_grads, plain_jaxpr) = run(True), run(False)
    np.testing.assert_allclose(plain, fast, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(fast_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    norms = 2 * 2 + 2 * 3 + 2  # 2 per encoder layer, 3 per decoder layer, 2 final norms
    # on: each LayerNorm's two row sums are dot products (an inference call on CPU)
    assert (
        count_primitive(fast_jaxpr, "dot_general")
        == count_primitive(plain_jaxpr, "dot_general") + 2 * norms
    )
    for name in (
        "custom_vjp_call",
        "name=mask_by_bias",
        "name=_matmul_rows",
        "name=_softmax_weighted_sum",
    ):
        assert name in str(fast_jaxpr) and name not in str(plain_jaxpr), name


def test_fast_paths_switch_reads_its_environment_variable():
    """DISTILL_JAX_FAST_PATHS=0 turns the fast paths off at import, unset leaves them on,
    and a value other than 0 or 1 is refused by name."""
    import os
    import subprocess
    import sys

    def enabled(value):
        env = {k: v for k, v in os.environ.items() if k != "DISTILL_JAX_FAST_PATHS"}
        if value is not None:
            env["DISTILL_JAX_FAST_PATHS"] = value
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "from distill_jax.models import fast_paths; print(fast_paths.ENABLED)",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    assert enabled("0").stdout.strip() == "False"
    assert enabled(None).stdout.strip() == "True"
    refused = enabled("off")
    assert refused.returncode != 0 and "DISTILL_JAX_FAST_PATHS='off'" in refused.stderr


def _fake_decode_cache(rng, batch=2, beams=3, max_len=4, heads=2, head_dim=3, src_len=5, decoded=3):
    """A cache collection with the layout of ``beam_cache`` (random contents, one decoder
    layer, ``decoded`` positions written)."""
    slots = max_len * beams
    return {
        "decoder": {
            "position_index": jnp.asarray(decoded, jnp.int32),
            "beam_ancestry": jnp.asarray(
                rng.integers(0, beams, (batch, beams, max_len)), jnp.int32
            ),
            "layer_0": {
                "self_attention": {
                    "cached_key": jnp.asarray(rng.normal(size=(batch, heads, head_dim, slots))),
                    "cached_value": jnp.asarray(rng.normal(size=(batch, heads, slots, head_dim))),
                    "cache_index": jnp.asarray(decoded, jnp.int32),
                },
                "cross_attention": {
                    "cached_key": jnp.asarray(rng.normal(size=(batch, heads, head_dim, src_len))),
                    "cached_value": jnp.asarray(rng.normal(size=(batch, heads, src_len, head_dim))),
                },
            },
        }
    }


def test_step_mask_shows_each_hypothesis_its_ancestors_slots():
    """beam_cache invariants 3 and 4, entry by entry: the step at position t records every
    hypothesis's own slot at t, and hypothesis j sees entry p * beams + i iff p <= t and
    its ancestry puts position p in slot i."""
    from distill_jax.models import beam_cache

    rng = np.random.default_rng(0)
    batch, beams, max_len, index = 2, 3, 5, 2
    ancestry = rng.integers(0, beams, size=(batch, beams, max_len)).astype(np.int32)
    new, mask = beam_cache.step_mask(jnp.asarray(ancestry), jnp.asarray(index, jnp.int32))
    want = ancestry.copy()
    want[:, :, index] = np.arange(beams)
    np.testing.assert_array_equal(new, want)
    assert mask.shape == (batch, 1, beams, max_len * beams) and mask.dtype == bool
    mask = np.asarray(mask)
    for b, j, p, i in np.ndindex(batch, beams, max_len, beams):
        assert mask[b, 0, j, p * beams + i] == (p <= index and want[b, j, p] == i), (b, j, p, i)


def test_reorders_and_the_hypothesis_view_entry_by_entry():
    """beam_cache.reorder moves only the ancestry rows; reorder_by_gather moves only the
    self-attention keys/values, slot origin[b, j] to slot j at every position; and
    hypothesis_keys_values reads key/value of hypothesis j at position p from entry
    p * beams + ancestry[b, j, p]."""
    from distill_jax.models import beam_cache

    rng = np.random.default_rng(1)
    cache = _fake_decode_cache(rng)
    batch, beams, max_len = cache["decoder"]["beam_ancestry"].shape
    origin = jnp.asarray([[2, 2, 0], [1, 0, 1]], jnp.int32)  # [batch, beams]
    leaves = dict(jax.tree_util.tree_leaves_with_path(cache))

    fast = beam_cache.reorder(cache, origin)
    for path, x in jax.tree_util.tree_leaves_with_path(fast):
        if path[-1].key == "beam_ancestry":
            np.testing.assert_array_equal(
                x, np.asarray(leaves[path])[np.arange(batch)[:, None], np.asarray(origin)]
            )
        else:
            np.testing.assert_array_equal(x, leaves[path])

    gathered = beam_cache.reorder_by_gather(cache, origin)
    old_self = cache["decoder"]["layer_0"]["self_attention"]
    new_self = gathered["decoder"]["layer_0"]["self_attention"]
    for b, j, p in np.ndindex(batch, beams, max_len):
        src_entry, dst_entry = p * beams + int(origin[b, j]), p * beams + j
        np.testing.assert_array_equal(
            new_self["cached_key"][b, :, :, dst_entry], old_self["cached_key"][b, :, :, src_entry]
        )
        np.testing.assert_array_equal(
            new_self["cached_value"][b, :, dst_entry], old_self["cached_value"][b, :, src_entry]
        )
    for path, x in jax.tree_util.tree_leaves_with_path(gathered):
        if path[-2].key != "self_attention" or path[-1].key == "cache_index":
            np.testing.assert_array_equal(x, leaves[path])  # cross-attention, ancestry, counters

    views = beam_cache.hypothesis_keys_values(cache)
    key, value = views["['decoder']['layer_0']['self_attention']"]
    decoded = int(cache["decoder"]["position_index"])
    assert key.shape == (batch, beams, 2, 3, decoded) and value.shape == (
        batch,
        beams,
        2,
        decoded,
        3,
    )
    ancestry = np.asarray(cache["decoder"]["beam_ancestry"])
    for b, j, p in np.ndindex(batch, beams, decoded):
        entry = p * beams + ancestry[b, j, p]
        np.testing.assert_array_equal(key[b, j, :, :, p], old_self["cached_key"][b, :, :, entry])
        np.testing.assert_array_equal(value[b, j, :, p], old_self["cached_value"][b, :, entry])
