"""Faster formulations of a few model operations, each equal to its plain form, and the
one switch that turns all of them off.

The model code (``layers``, ``bert``, ``transformer``) calls the entry points below and
reads as the plain method; this module decides how each operation is computed. With the
switch on (the default) an entry point takes its fast form where that form is meant to
run; with it off, every entry point computes the plain form: the textbook operation,
left to JAX's own autodiff. The two agree to float32 rounding (tested in
``tests/test_transformer.py`` and ``tests/test_bert.py``, trick by trick and for whole
models); timings of each are in BENCHMARKS.md.

The switch: the experiment config's ``runtime.fast_paths`` (set through ``configure`` when a
run starts), whose default is the environment variable ``DISTILL_JAX_FAST_PATHS``, also
read when this module is imported: ``1`` (default) on, ``0`` off. ``ENABLED`` holds it; the
entry points read ``ENABLED`` when a model is traced, so code that sets it later (tests,
benchmarks) must do so before the functions it affects are traced (``jax.jit`` keeps what
it traced).

The tricks (entry point: fast form; where it is on):

``matmul`` -- the dense layers' ``x @ kernel`` over the trailing axes of ``x``. Fast:
    every leading axis of ``x`` is folded into the rows of one 2-D matmul ``[rows, in] @
    [in, out]`` with a custom VJP (``_matmul_rows``), so that the kernel's gradient is a
    plain ``x^T @ g`` instead of a contraction over the batch and length axes, which XLA's
    CPU backend runs markedly slower. On CPU the backward also makes the transposed copy
    of ``x`` explicitly when ``in <= out`` (see ``_kernel_grad``), and it computes the
    input's gradient as one ``dot_general`` on the kernel itself (see
    ``_matmul_rows_bwd``). On in every call, on every backend (the reshapes are free on
    accelerators). Plain: one ``dot_general`` over the trailing axes.

``layer_norm_statistics`` -- LayerNorm's mean and variance. Fast: matrix-vector products
    with a vector of ones at full float32 precision (``row_statistics_by_dot``) instead of
    reductions over the last axis; the same sums up to the order of the float32
    additions. XLA's CPU backend runs the products faster than its row reductions. On in
    inference calls compiled for CPU (``layer_norm_stats_by_dot``); training calls keep the
    reductions, which give ``flax.linen.LayerNorm``'s values and gradients to the bit
    (``row_statistics_by_reduction``, also the plain form).

``apply_mask`` -- an attention mask applied to the logits. Fast: an addition of 0 or
    ``MASK_BIAS`` (``mask_by_bias``), which XLA's CPU backend fuses with the scores
    product, the softmax and the weighted sum, where a select kept the scores apart. It
    gives the same softmax weights as the select (see ``MASK_BIAS``) and the select's
    gradient. On in inference calls (``deterministic``), on every backend; ``MASK_BY_BIAS``
    (``runtime.mask_by_bias``) turns this one trick off alone, e.g. for benchmarks that time
    the select form. Plain:
    ``where(mask, logits, MASK_VALUE)``.

``softmax_weighted_sum`` -- attention's ``softmax(logits) @ value``. Fast: the
    normalisation deferred to after the weighted sum, ``(exp(logits - max) @ value) /
    row sums`` (``deferred_softmax_weighted_sum``), so that the division touches the
    ``[.., q, d]`` result instead of the ``[.., q, kv_len]`` weights and XLA's CPU backend
    does not materialise normalised weights between the two matmuls; its custom VJP is
    the softmax gradient in flash attention's form. Attention calls it in inference calls
    only (training calls use the plain form, which also has the attention dropout).
    Plain: ``softmax(logits) @ value``.

``gelu`` -- BERT's ``"gelu"``, ``x * (1 + erf(x / sqrt 2)) / 2``. Fast: written with
    ``erf`` as torch computes it (``gelu_erf``); ``jax.nn.gelu``'s exact form goes
    through ``erfc``, which XLA's CPU backend expands into more work. On in every call.
    Plain: ``jax.nn.gelu(x, approximate=False)``.

Not switched, because they are the layout of the model rather than another form of one
operation: heads-major attention operands, the decoding caches' layouts and the stacked
query/key/value projection (``layers.MultiHeadAttention``).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def default_enabled() -> bool:
    """The switch's default: the environment variable ``DISTILL_JAX_FAST_PATHS`` (1 when
    unset); the experiment config's ``runtime.fast_paths`` takes it as its default."""
    value = os.environ.get("DISTILL_JAX_FAST_PATHS", "1")
    if value not in ("0", "1"):
        raise ValueError(
            f"DISTILL_JAX_FAST_PATHS={value!r}: expected 1 (fast paths on, the "
            "default) or 0 (every operation in its plain form)"
        )
    return value == "1"


# The switch (see the module docstring): False computes every operation in its plain form.
ENABLED: bool = default_enabled()
# The mask-as-bias trick alone (apply_mask), for benchmarks that time the select form.
MASK_BY_BIAS: bool = True


def configure(enabled: bool, mask_by_bias: bool = True) -> None:
    """Sets the switches (an experiment's ``runtime.fast_paths`` / ``mask_by_bias``): call
    it before the functions it affects are traced."""
    global ENABLED, MASK_BY_BIAS
    ENABLED, MASK_BY_BIAS = bool(enabled), bool(mask_by_bias)


# Attention logits of masked positions in the select form. Large but finite, so that a
# fully masked row (a padding query) gets a uniform distribution instead of NaNs.
MASK_VALUE = -1e9
# The additive form's masked logits: logits + MASK_BIAS rounds to exactly MASK_BIAS in
# float32 (a logit below ~1e22 in magnitude is lost in its spacing), so every masked logit
# is one number, as with MASK_VALUE: the same weights, fully masked rows (uniform) included.
MASK_BIAS = -1e30


# --- matmul: the dense layers' product --------------------------------------------------


def matmul(
    x: jax.Array, kernel: jax.Array, in_dims: int, out_dtype: Dtype | None = None
) -> jax.Array:
    """``x [..., *kernel.shape[:in_dims]]`` times ``kernel`` over those axes ->
    ``[..., *kernel.shape[in_dims:]]`` (``out_dtype``: the result's dtype, default the
    inputs' promoted dtype). Fast form: one 2-D matmul with ``_matmul_rows``'s backward."""
    out_dtype = jnp.dtype(out_dtype or jnp.result_type(x, kernel))
    in_shape, out_shape = kernel.shape[:in_dims], kernel.shape[in_dims:]
    if not ENABLED:
        contracted = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
        return jax.lax.dot_general(
            x, kernel, (contracted, ((), ())), preferred_element_type=out_dtype
        )
    lead = x.shape[: x.ndim - in_dims]
    rows = x.reshape((-1, math.prod(in_shape)))  # [rows, in]
    out = _matmul_rows(
        rows, kernel.reshape((math.prod(in_shape), math.prod(out_shape))), out_dtype
    )  # [rows, out]
    return out.reshape(lead + out_shape)


def _dot_2d(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_rows(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """``x [rows, in] @ w [in, out]`` -> ``[rows, out]``, with the backward below."""
    return _dot_2d(x, w, out_dtype)


def _matmul_rows_fwd(x, w, out_dtype):
    return _dot_2d(x, w, out_dtype), (x, w)


def _kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """``x^T @ g`` for ``x [rows, in]``, ``g [rows, out]`` -> ``[in, out]``.

    On CPU, when ``in <= out``, the transposed copy of ``x`` is made first (the barrier
    keeps XLA from folding the transpose back into the dot): XLA's CPU backend runs a dot
    that contracts its lhs's leading axis slower than the copy plus a plain dot. When
    ``in > out`` the copy costs more than it saves, and other backends fold the transpose
    into their GEMM, so those keep the plain ``x.T @ g``."""
    if x.shape[1] > g.shape[1]:
        return jnp.dot(x.T, g)

    def cpu(x, g):
        return jnp.dot(jax.lax.optimization_barrier(x.T), g)

    def default(x, g):
        return jnp.dot(x.T, g)

    return jax.lax.platform_dependent(x, g, cpu=cpu, default=default)


def _matmul_rows_bwd(out_dtype, residuals, g):
    x, w = residuals  # [rows, in], [in, out]
    # The gradient matmuls run in the forward's compute dtype: a float32 cotangent (the
    # logits') is rounded to bfloat16 first under bf16 compute, so that they stay bf16
    # GEMMs instead of float32 ones (in float32 nothing changes).
    g = g.astype(jnp.result_type(x, w))  # [rows, out]
    # g @ w^T as one dot_general on w itself, not on a transposed w: under fsdp the
    # partitioner then gathers w as the forward did and XLA reuses that gather, where a
    # transposed operand got a second, transposed all-gather of every kernel. One device
    # compiles to the same program either way.
    dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ()))).astype(x.dtype)  # [rows, in]
    dw = _kernel_grad(x, g).astype(w.dtype)  # [in, out]
    return dx, dw


_matmul_rows.defvjp(_matmul_rows_fwd, _matmul_rows_bwd)


# --- layer_norm_statistics ---------------------------------------------------------------


def layer_norm_stats_by_dot(deterministic: bool) -> bool:
    """Whether LayerNorm takes its statistics by matrix-vector products: in inference calls
    (``deterministic``) compiled for CPU, with the switch on."""
    return ENABLED and deterministic and jax.default_backend() == "cpu"


def layer_norm_statistics(x: jax.Array, deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """``(x - mean, variance)`` over the last axis of ``x [..., features]``, at least
    float32: ``[..., features]`` and ``[..., 1]``."""
    if layer_norm_stats_by_dot(deterministic):
        return row_statistics_by_dot(x)
    return row_statistics_by_reduction(x)


def row_statistics_by_reduction(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The plain form: reductions, in ``flax.linen.LayerNorm``'s graph (the mean subtracted
    twice, the second time from ``x`` in its own dtype), so that the values and gradients
    are flax's to the bit."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(axis=-1)[..., None]  # [..., 1]
    deviation = x32 - mean
    var = (deviation * deviation).mean(axis=-1)[..., None]  # [..., 1]
    return x - mean, var


def row_statistics_by_dot(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The fast form: the row sums as products with a vector of ones, at full float32
    precision."""
    features = x.shape[-1]
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    ones = jnp.ones((features,), x32.dtype)  # [features]
    row_sum = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)
    mean = (row_sum(x32, ones) / features)[..., None]  # [..., 1]
    centred = x32 - mean
    var = (row_sum(centred * centred, ones) / features)[..., None]  # [..., 1]
    return centred, var


# --- apply_mask --------------------------------------------------------------------------


def apply_mask(logits: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """Attention ``logits`` with the positions where ``mask`` (bool, broadcastable; True
    means "may attend") is False pushed to a large negative value; ``mask`` None: unchanged.
    Inference calls (``deterministic``) use the additive form ``mask_by_bias``, others the
    select with ``MASK_VALUE``; both give the same softmax weights and gradients."""
    if mask is None:
        return logits
    if ENABLED and MASK_BY_BIAS and deterministic:
        return mask_by_bias(logits, mask)
    return jnp.where(mask, logits, MASK_VALUE)


@jax.custom_vjp
def mask_by_bias(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``logits`` where ``mask`` holds, MASK_BIAS elsewhere, as an addition: ``logits + (0 |
    MASK_BIAS)``. The values equal the select form's with MASK_BIAS for MASK_VALUE (see
    MASK_BIAS), and so does the gradient: masked logits get none, where the addition alone
    would pass the cotangent through (it matters in a fully masked row, whose softmax is
    uniform but not constant in its logits)."""
    return logits + jnp.where(mask, 0.0, MASK_BIAS).astype(logits.dtype)


def _mask_by_bias_fwd(logits, mask):
    return mask_by_bias(logits, mask), mask


def _mask_by_bias_bwd(mask, g):
    return jnp.where(mask, g, jnp.zeros((), g.dtype)), None


mask_by_bias.defvjp(_mask_by_bias_fwd, _mask_by_bias_bwd)


# --- softmax_weighted_sum ----------------------------------------------------------------


def softmax_weighted_sum(logits: jax.Array, value: jax.Array) -> jax.Array:
    """``softmax(logits, axis=-1) @ value``: logits ``[..., q, kv_len]`` (masking already
    applied; the softmax in float32), value ``[..., kv_len, d]`` -> ``[..., q, d]`` in
    value's dtype. Fast form: ``deferred_softmax_weighted_sum``."""
    if ENABLED:
        return deferred_softmax_weighted_sum(logits, value)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, value)


def deferred_softmax_weighted_sum(logits: jax.Array, value: jax.Array) -> jax.Array:
    """``softmax_weighted_sum`` with the normalisation deferred: ``(exp(logits - max) @
    value) / row sums``. Its backward is the softmax gradient in the form flash attention
    uses, ``ds = p * (dp - rowsum(g * out))``, whose row reduction runs over ``d`` instead
    of ``kv_len`` (autodiff of the deferred forward was slower than autodiff of the
    textbook form; this one is on a par with it)."""
    return _softmax_weighted_sum(logits.astype(jnp.float32), value)


def _exp_rows(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """exp(logits - row max) ``[..., q, kv_len]`` and its row sums ``[..., q, 1]``, float32."""
    unnormalized = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return unnormalized, jnp.sum(unnormalized, axis=-1, keepdims=True)


def _weighted_sum(unnormalized, row_sums, value):
    """(unnormalized @ value) / row_sums -> ``[..., q, d]`` in value's dtype."""
    context = jnp.einsum(
        "...qk,...kd->...qd",
        unnormalized.astype(value.dtype),
        value,
        preferred_element_type=jnp.float32,
    )  # [..., q, d] float32
    return (context / row_sums).astype(value.dtype)


@jax.custom_vjp
def _softmax_weighted_sum(logits: jax.Array, value: jax.Array) -> jax.Array:
    return _weighted_sum(*_exp_rows(logits), value)


def _softmax_weighted_sum_fwd(logits, value):
    unnormalized, row_sums = _exp_rows(logits)
    out = _weighted_sum(unnormalized, row_sums, value)
    return out, (unnormalized, row_sums, value, out)


def _softmax_weighted_sum_bwd(residuals, g):
    unnormalized, row_sums, value, out = residuals
    weights = unnormalized / row_sums  # float32 [..., q, kv_len]
    value_grad = jnp.einsum(
        "...qk,...qd->...kd", weights.astype(value.dtype), g, preferred_element_type=jnp.float32
    ).astype(value.dtype)
    weights_grad = jnp.einsum(
        "...qd,...kd->...qk", g, value, preferred_element_type=jnp.float32
    )  # [..., q, kv_len]
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    return weights * (weights_grad - delta), value_grad  # float32 like the logits


_softmax_weighted_sum.defvjp(_softmax_weighted_sum_fwd, _softmax_weighted_sum_bwd)


# --- gelu --------------------------------------------------------------------------------


def gelu(x: jax.Array) -> jax.Array:
    """GELU in its exact form, ``x * (1 + erf(x / sqrt 2)) / 2`` (BERT's and transformers'
    ``"gelu"``), in x's dtype. Fast form: ``gelu_erf``."""
    if ENABLED:
        return gelu_erf(x)
    return jax.nn.gelu(x, approximate=False)


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU written with ``erf``, as torch computes it."""
    x = jnp.asarray(x)
    half = jnp.asarray(0.5, x.dtype)
    return x * half * (1 + jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))
