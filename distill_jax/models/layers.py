"""Building blocks shared by the BERT teacher and the Transformer student.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``)
so that one table of rules (``distill_jax.sharding.LOGICAL_AXIS_RULES``) decides how
it is laid out on the device mesh. Parameter logical axes:

  vocab   rows of an embedding table / columns of an output projection
  embed   the model width (d_model / hidden_size)
  heads   attention heads
  kv      per-head width
  mlp     the feed-forward inner width
  (None)  axes that are never sharded (positions, token types)

Activations are annotated with ``activation_*`` names through
``nn.with_logical_constraint``.

Masks are boolean and broadcast to ``[batch, heads, q_length, kv_length]``;
``True`` means "may attend".

How the dense products, LayerNorm's statistics, attention's masking and softmax, and
GELU are computed is decided in ``distill_jax.models.fast_paths`` (faster forms equal to
the plain ones, and the switch that turns them off); this module calls its entry points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import beam_cache, fast_paths

Dtype = Any
Initializer = Callable[..., jax.Array]


def padding_mask(q_valid: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """[batch, q], [batch, kv] booleans -> [batch, 1, q, kv] attention mask."""
    return q_valid[:, None, :, None] & kv_valid[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
    """[1, 1, length, length] lower-triangular mask (position i sees j <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def sinusoidal_positions(max_len: int, features: int, dtype: Dtype = jnp.float32) -> np.ndarray:
    """[max_len, features] sinusoid table (Vaswani et al.), sin on the first half, cos on
    the second half (the tensor2tensor / fairseq layout)."""
    half = features // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    inv_freq = np.exp(np.arange(half, dtype=np.float64) * -scale)  # [half]
    angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq[None, :]  # [max_len, half]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [max_len, 2*half]
    if features % 2:
        table = np.concatenate([table, np.zeros((max_len, 1))], axis=1)
    return table.astype(dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with statistics in float32; ``scale`` and ``bias`` are laid
    out along ``embed`` (the parameters of ``flax.linen.LayerNorm``, same names and shapes).

    The statistics come from ``fast_paths.layer_norm_statistics``: in inference calls
    (``deterministic``) on CPU as matrix-vector products, equal to the reductions to
    float32 rounding; otherwise by reductions, so that the values and gradients are
    ``flax.linen.LayerNorm``'s to the bit.
    """

    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = False) -> jax.Array:
        """x [..., features] -> [..., features] in ``dtype``."""
        features = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (features,),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            (features,),
            jnp.float32,
        )
        centred, var = fast_paths.layer_norm_statistics(x, deterministic)  # [..., f], [..., 1]
        return (centred * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias).astype(self.dtype)


def layer_norm(epsilon: float, dtype: Dtype, name: str | None = None) -> LayerNorm:
    """LayerNorm whose scale and bias are laid out along ``embed``; statistics in fp32."""
    return LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


def matrix_init(init: Initializer, in_dims: int) -> Initializer:
    """Runs ``init`` on the 2-D matrix ``[prod(shape[:in_dims]), prod(shape[in_dims:])]`` and
    reshapes, so that fan-in/fan-out (and the values) are those of a ``DenseGeneral`` kernel."""

    def init_reshaped(rng, shape, dtype=jnp.float32):
        matrix = (math.prod(shape[:in_dims]), math.prod(shape[in_dims:]))
        return jnp.reshape(init(rng, matrix, dtype), shape)

    return init_reshaped


class Projection(nn.Module):
    """A biased linear map from the last ``len(in_shape)`` axes of the input to
    ``out_shape``: kernel ``[*in_shape, *out_shape]`` and bias ``[*out_shape]`` with the
    given logical axes (the parameter names and layout of ``nn.Dense`` / ``nn.Einsum``,
    so checkpoints and the Hugging Face weight mapping are unaffected), applied with
    ``fast_paths.matmul``."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...]
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def weights(self) -> tuple[jax.Array, jax.Array]:
        """(kernel [*in_shape, *out_shape], bias [*out_shape]), float32."""
        in_dims = len(self.in_shape)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(matrix_init(self.kernel_init, in_dims), self.kernel_axes),
            tuple(self.in_shape) + tuple(self.out_shape),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(self.bias_init, self.bias_axes),
            tuple(self.out_shape),
            jnp.float32,
        )
        return kernel, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dims = len(self.in_shape)
        if tuple(x.shape[x.ndim - in_dims :]) != tuple(self.in_shape):
            raise ValueError(
                f"{self.name}: input's trailing axes {x.shape[x.ndim - in_dims :]} "
                f"are not {self.in_shape}"
            )
        kernel, bias = self.weights()
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return fast_paths.matmul(x, kernel, in_dims) + bias  # [..., *out_shape]


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention with biased q/k/v/out projections.

    Parameter layout (names follow BERT so that Hugging Face weights map one to one):
      query/key/value kernel [embed, heads, kv], bias [heads, kv]
      out kernel [heads, kv, embed], bias [embed]

    Incremental decoding (``decode=True``) of ``beams`` hypotheses per sentence (1 for
    greedy search and sampling) keeps keys/values in the ``cache`` collection, created
    and written by ``distill_jax.models.beam_cache`` (whose docstring states the layout
    and its invariants):
      * self-attention (``beam_cache.write_self_attention``): the first call (the one that
        creates the cache) takes ``[batch, max_len, embed]`` and only allocates zeros;
        every later call takes one new position of the first ``g`` hypotheses of every
        sentence, ``[batch * g, 1, embed]`` (hypothesis ``j`` of sentence ``b`` in row
        ``b * g + j``), writes their keys/values into their beam slots and attends over
        all ``max_len * beams`` entries of its sentence as ``mask`` (``[batch, 1, g,
        max_len * beams]``, the ancestry mask the ``Decoder`` builds) allows.
      * cross-attention (``beam_cache.cross_attention``): the first call projects
        ``inputs_kv`` (the encoder output) once per sentence and stores it; later calls
        read it for all hypotheses of the sentence and ignore ``inputs_kv``.
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros
    is_cross_attention: bool = False
    # How softmax(Q K^T) V is computed (ATTENTION_IMPLS): "einsum" (ours: two einsums and
    # a float32 softmax; the only one with attention dropout and the decoding cache),
    # "xla" / "cudnn" (``jax.nn.dot_product_attention`` with that implementation; cudnn
    # is a fused flash-attention kernel on NVIDIA GPUs, bf16/fp16 only). Calls that need
    # what only "einsum" has (attention dropout while training, incremental decoding)
    # use "einsum" whatever is set. "cudnn" is for forward passes only (teacher
    # inference): with our boolean padding masks its gradient came out NaN
    # (BENCHMARKS.md), so the student's config refuses it.
    implementation: str = "einsum"

    def _projection(self, name: str, in_features: int) -> Projection:
        """[..., embed] -> [..., heads, kv]."""
        return Projection(
            in_shape=(in_features,),
            out_shape=(self.num_heads, self.head_dim),
            kernel_axes=("embed", "heads", "kv"),
            bias_axes=("heads", "kv"),
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,  # [batch, q_len, embed]
        inputs_kv: jax.Array,  # [batch, kv_len, embed]
        mask: jax.Array | None = None,  # bool, broadcastable to [batch, heads, q_len, kv_len]
        *,
        deterministic: bool = True,
        decode: bool = False,
        beams: int = 1,  # hypotheses per sentence the decoding cache holds
    ) -> jax.Array:
        features = inputs_q.shape[-1]
        if self.implementation not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention implementation {self.implementation!r} is not one of {ATTENTION_IMPLS}"
            )
        if inputs_kv is inputs_q:  # self-attention: one matmul for the three projections
            query, key, value = self._query_key_value(inputs_q)
        else:
            query = self._projection("query", features)(inputs_q)  # [batch, q_len, heads, kv]
            key = value = None  # cross-attention: projected below unless cached
        query = nn.with_logical_constraint(
            query, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        )

        if decode:
            # The decoding caches hold keys/values heads-major, so that no step transposes
            # the whole cache: values [batch, heads, kv_len, kv], one row per sentence.
            # Keys are cached transposed, [batch, heads, kv, kv_len]: the scores are then
            # a plain [q, kv] @ [kv, kv_len] matmul per sentence and head, where with keys
            # [kv_len, kv] XLA's CPU backend transposed the whole cache at every step.
            if key is None:
                key_t, value_h = self._cross_attention_cache(inputs_kv)
            else:
                key_t, value_h = self._self_attention_cache(key, value, beams)
            return self._attend(
                query, key_t, value_h, mask, features, deterministic, key_transposed=True
            )
        if key is None:
            key, value = self._key_value(inputs_kv)  # [batch, kv_len, heads, kv] each

        dropout = self.dropout_rate > 0.0 and not deterministic
        if self.implementation != "einsum" and not dropout:
            if mask is not None:  # the fused kernels want the full [.., q_len, kv_len] extent
                mask = jnp.broadcast_to(mask, mask.shape[:2] + (query.shape[1], key.shape[1]))
            context = jax.nn.dot_product_attention(
                query,
                key,
                value,
                mask=mask,
                scale=1.0 / float(np.sqrt(self.head_dim)),
                implementation=self.implementation,
            )  # [batch, q_len, heads, kv]
            return self._output(context, features)

        # Heads-major copies, so that both attention matmuls are batched over leading
        # (batch, heads) dimensions: XLA's CPU backend runs "bqhd,bkhd->bhqk" on the
        # [batch, len, heads, kv] layout several times slower than on [batch, heads, len,
        # kv]; the transposes are cheap copies.
        key_h = key.transpose(0, 2, 1, 3)  # [batch, heads, kv_len, kv]
        value_h = value.transpose(0, 2, 1, 3)  # [batch, heads, kv_len, kv]
        return self._attend(query, key_h, value_h, mask, features, deterministic)

    def _query_key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention's query, key and value [batch, len, heads, kv] from x [batch, len,
        embed] with one matmul: the three kernels stacked to [embed, 3, heads, kv] (the
        parameters stay the three of ``query``/``key``/``value``). One [rows, embed] @
        [embed, 3 * embed] product instead of three [rows, embed] @ [embed, embed] ones
        uses a CPU's or GPU's matmul units better, most of all at the few rows of a
        decoding step."""
        projections = [self._projection(name, x.shape[-1]) for name in ("query", "key", "value")]
        kernels, biases = zip(*(p.weights() for p in projections))
        kernel = jnp.stack(kernels, axis=1)  # [embed, 3, heads, kv]
        bias = jnp.stack(biases, axis=0)  # [3, heads, kv]
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        qkv = fast_paths.matmul(x, kernel, 1) + bias  # [batch, len, 3, heads, kv]
        qkv = nn.with_logical_constraint(
            qkv,
            ("activation_batch", "activation_length", None, "activation_heads", "activation_kv"),
        )
        names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        return tuple(nn.with_logical_constraint(qkv[:, :, i], names) for i in range(3))

    def _key_value(self, inputs_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, kv_len, embed] -> key, value [batch, kv_len, heads, kv]."""
        kv_features = inputs_kv.shape[-1]
        names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        key = self._projection("key", kv_features)(inputs_kv)
        value = self._projection("value", kv_features)(inputs_kv)
        return (nn.with_logical_constraint(key, names), nn.with_logical_constraint(value, names))

    def _attend(self, query, key_h, value_h, mask, features, deterministic, key_transposed=False):
        """Our einsum attention: query [batch * g, q_len, heads, kv], heads-major key/value
        [batch, heads, kv_len, kv] (key [batch, heads, kv, kv_len] with
        ``key_transposed``) -> [batch * g, q_len, embed].

        ``g`` (query rows per key row) is 1 except when decoding ``g`` beams per sentence:
        the queries of a sentence's hypotheses then share one batched matmul against its
        keys ([g * q_len, kv] @ [kv, kv_len] per sentence and head), and ``mask``
        broadcasts to [batch, heads, g * q_len, kv_len]."""
        names = ("activation_batch", "activation_heads", "activation_length", "activation_kv")
        key_names = names[:2] + (names[3], names[2]) if key_transposed else names
        key_h = nn.with_logical_constraint(key_h, key_names)
        value_h = nn.with_logical_constraint(value_h, names)
        rows, q_len, heads, head_dim = query.shape
        batch = key_h.shape[0]
        group = rows // batch
        query = query / jnp.sqrt(self.head_dim).astype(self.dtype)
        query = query.reshape(batch, group * q_len, heads, head_dim)  # [batch, g*q, heads, kv]
        query_h = query.transpose(0, 2, 1, 3)  # [batch, heads, g*q, kv]
        logits = jnp.einsum(
            "bhqd,bhdk->bhqk" if key_transposed else "bhqd,bhkd->bhqk",
            query_h,
            key_h,
            preferred_element_type=jnp.float32,
        )  # [batch, heads, g*q, kv_len]
        logits = fast_paths.apply_mask(logits, mask, deterministic)  # [batch, heads, g*q, kv_len]
        if deterministic:
            # inference (teacher forward, soft targets, decoding), no attention dropout
            context = fast_paths.softmax_weighted_sum(
                logits, value_h.astype(self.dtype)
            )  # [batch, heads, g*q, kv]
        else:
            # training: the textbook form with attention dropout on the weights; the
            # faster inference form is no faster here once its gradient is counted, and
            # this one keeps training runs identical to the earlier ones
            weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # like the logits
            if self.dropout_rate > 0.0:
                weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=False)
            context = jnp.einsum("bhqk,bhkd->bhqd", weights, value_h)  # [batch, heads, g*q, kv]
        context = context.transpose(0, 2, 1, 3)  # [batch, g*q, heads, kv]
        context = context.reshape(rows, q_len, heads, head_dim)  # [batch*g, q_len, heads, kv]
        return self._output(context, features)

    # The decoding caches are beam_cache's; these methods only call it, so that a profile
    # names their ops "self_attention._self_attention_cache" / "cross_attention.
    # _cross_attention_cache" (Flax names a method's ops after it), as the profiling tools
    # group them (scripts/bench/profile/profile_beam.py).
    def _self_attention_cache(
        self, key: jax.Array, value: jax.Array, beams: int
    ) -> tuple[jax.Array, jax.Array]:
        """``beam_cache.write_self_attention`` of this layer's cache."""
        return beam_cache.write_self_attention(self, key, value, beams)

    def _cross_attention_cache(self, inputs_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``beam_cache.cross_attention`` of this layer's cache."""
        return beam_cache.cross_attention(self, inputs_kv, self._key_value)

    def _output(self, context: jax.Array, features: int) -> jax.Array:
        """[batch, q_len, heads, kv] -> [batch, q_len, embed] (the "out" projection)."""
        return Projection(
            in_shape=(self.num_heads, self.head_dim),
            out_shape=(features,),
            kernel_axes=("heads", "kv", "embed"),
            bias_axes=("embed",),
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            name="out",
        )(context)  # [batch, q_len, embed]


class FeedForward(nn.Module):
    """Position-wise feed-forward block: dense(embed->mlp), activation, dropout, dense(mlp->embed)."""

    mlp_dim: int
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        features = x.shape[-1]
        h = Projection(
            in_shape=(features,),
            out_shape=(self.mlp_dim,),
            kernel_axes=("embed", "mlp"),
            bias_axes=("mlp",),
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            name="intermediate",
        )(x)  # [batch, length, mlp]
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        h = self.activation(h)
        if self.dropout_rate > 0.0 and not deterministic:
            h = nn.Dropout(rate=self.dropout_rate)(h, deterministic=False)
        return Projection(
            in_shape=(self.mlp_dim,),
            out_shape=(features,),
            kernel_axes=("mlp", "embed"),
            bias_axes=("embed",),
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            name="output",
        )(h)  # [batch, length, embed]
