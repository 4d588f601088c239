"""The student: a Transformer encoder-decoder (Vaswani et al.) in the fairseq layout.

One embedding table ``[vocab, embed]`` is shared by the source, the target and the output
projection (``logits = h @ E^T``). The default places the LayerNorms after each residual
addition (post-LN), the layout of Vaswani et al. and of fairseq. ``pre_layer_norm`` moves
them in front of each block and adds a final LayerNorm to the encoder and to the decoder:
the layout Chen et al.'s reference code (OpenNMT-py) trains, whose LayerNorms have
epsilon 1e-6 (set ``layer_norm_eps=1e-6`` with it to match; the default 1e-5 is fairseq's).

Incremental decoding: ``Transformer.decode(..., decode=True)`` takes one target position
of every hypothesis per call and keeps its state in the ``cache`` collection:
keys/values of the decoder self-attention (one slot per hypothesis of a sentence), the
projected encoder output of the cross-attention (one per sentence), a step counter that
gives the position of the token being fed and the ``beam_ancestry`` table whose mask lets
beam search reorder its hypotheses without moving keys/values. ``init_decode_cache``
creates that state for a batch of sentences and ``beams`` hypotheses each and
``grow_decode_cache`` makes room for more positions. The layout and every invariant of
that cache are stated, and the code that reads and writes it lives, in
``distill_jax.models.beam_cache``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import beam_cache, fast_paths, layers

POSITION_KINDS = ("sinusoidal", "learned")
# How the shared embedding starts: fairseq's normal(0, d^-1/2), or Glorot-uniform over
# [vocab, embed] as OpenNMT-py's -param_init_glorot draws every matrix.
EMBEDDING_INITS = {
    "normal": lambda d_model: nn.initializers.normal(stddev=d_model**-0.5),
    "glorot": lambda d_model: nn.initializers.xavier_uniform(),
}


STUDENT_ATTENTION_IMPLS = ("einsum", "xla")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the student. The defaults: the sizes of Vaswani et al.'s base
    Transformer (6 + 6 layers, d_model 512, 8 heads, feed-forward 2048) with dropout 0.3
    (fairseq's value for IWSLT'14 De-En), post-LN, sinusoidal positions, scaled embeddings
    and LayerNorm epsilon 1e-5 (fairseq's layout)."""

    vocab_size: int  # size of the shared source/target vocabulary (specials included)
    d_model: int = 512  # model width (embedding size)
    num_heads: int = 8  # attention heads; must divide d_model
    mlp_dim: int = 2048  # inner width of the feed-forward blocks
    num_encoder_layers: int = 6  # encoder blocks
    num_decoder_layers: int = 6  # decoder blocks
    dropout_rate: float = 0.3  # dropout on embeddings and on every residual branch
    attention_dropout_rate: float = 0.0  # dropout on the attention weights
    activation_dropout_rate: float = 0.0  # dropout after the feed-forward activation
    pre_layer_norm: bool = False  # False: post-LN (fairseq); True: pre-LN + final LayerNorms
    positions: str = "sinusoidal"  # "sinusoidal" (fixed table) or "learned" (a parameter)
    max_len: int = 256  # longest source or target sequence (size of the position table)
    scale_embeddings: bool = True  # multiply token embeddings by sqrt(d_model) (fairseq)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    embedding_init: str = "normal"  # shared embedding's init: "normal" (fairseq) or "glorot"
    dtype: Any = jnp.float32  # compute dtype; parameters are always float32
    # softmax(QK^T)V: "einsum" (portable, ours) or "xla" (jax.nn.dot_product_attention);
    # see layers.MultiHeadAttention.implementation
    attention_impl: str = "einsum"
    pad_id: int = 0  # padding id (x != pad_id marks real tokens)
    bos_id: int = 1  # first decoder input
    eos_id: int = 2  # end of sequence

    def __post_init__(self):
        if self.vocab_size <= 3:
            raise ValueError(
                f"vocab_size must be larger than 3 (pad, bos, eos plus tokens), got {self.vocab_size}"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS}, got {self.positions!r}")
        if self.embedding_init not in EMBEDDING_INITS:
            raise ValueError(
                f"embedding_init must be one of {sorted(EMBEDDING_INITS)}, got "
                f"{self.embedding_init!r}"
            )
        if self.max_len < 1:
            raise ValueError(f"max_len must be positive, got {self.max_len}")
        if self.attention_impl not in STUDENT_ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {STUDENT_ATTENTION_IMPLS}, got "
                f'{self.attention_impl!r} ("cudnn" is forward-only: its gradient with '
                "padding masks came out NaN, see BENCHMARKS.md)"
            )
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"
                )

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.d_model // self.num_heads


class PositionEmbedding(nn.Module):
    """Adds position information: a fixed sinusoid table or a learned ``[max_len, embed]`` table."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        """positions [length] int32 -> [1, length, embed] (compute dtype)."""
        cfg = self.config
        if cfg.positions == "learned":
            table = self.param(
                "embedding",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.d_model**-0.5), (None, "embed")
                ),
                (cfg.max_len, cfg.d_model),
                jnp.float32,
            )  # [max_len, embed]
        else:
            table = jnp.asarray(
                layers.sinusoidal_positions(cfg.max_len, cfg.d_model)
            )  # [max_len, embed]
        return jnp.take(table, positions, axis=0)[None].astype(cfg.dtype)  # [1, length, embed]


def _check_length(what: str, length: int, cfg: TransformerConfig) -> None:
    """Refuses (at trace time) a padded length beyond the position table: ``jnp.take`` would
    fill the missing rows with NaN and the whole batch would silently become NaN."""
    if length > cfg.max_len:
        raise ValueError(
            f"{what} length {length} is longer than the model's max_len {cfg.max_len} (the size "
            f"of its position table); truncate or drop longer sequences, or raise max_len"
        )


def _constrain_hidden(x: jax.Array) -> jax.Array:
    """Logical sharding constraint for [batch, length, embed] activations."""
    return nn.with_logical_constraint(
        x, ("activation_batch", "activation_length", "activation_embed")
    )


class Sublayer(nn.Module):
    """Residual wrapper: post-LN ``LN(x + drop(f(x)))`` or pre-LN ``x + drop(f(LN(x)))``.

    ``__call__`` takes the residual stream and returns the normalized input for ``f``;
    ``finish`` closes the residual. Kept as two calls so that ``f`` can be any module.
    """

    config: TransformerConfig

    def setup(self):
        self.norm = layers.layer_norm(self.config.layer_norm_eps, self.config.dtype)
        self.dropout = nn.Dropout(rate=self.config.dropout_rate)

    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """Input of the wrapped function: LN(x) for pre-LN, x for post-LN."""
        if self.config.pre_layer_norm:
            return self.norm(x, deterministic=deterministic)
        return x

    def finish(self, x: jax.Array, y: jax.Array, deterministic: bool) -> jax.Array:
        """Adds the (dropped-out) branch output y to the residual x."""
        out = x + self.dropout(y, deterministic=deterministic)  # [batch, length, embed]
        if self.config.pre_layer_norm:
            return out
        return self.norm(out, deterministic=deterministic)


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward block of the encoder."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """x [batch, src, embed], mask [batch, 1, src, src] -> [batch, src, embed]."""
        cfg = self.config
        attn_block = Sublayer(cfg, name="self_attention_block")
        normed = attn_block(x, deterministic)  # [batch, src, embed]
        h = layers.MultiHeadAttention(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            dropout_rate=cfg.attention_dropout_rate,
            dtype=cfg.dtype,
            implementation=cfg.attention_impl,
            name="self_attention",
        )(normed, normed, mask, deterministic=deterministic)
        x = attn_block.finish(x, h, deterministic)  # [batch, src, embed]
        ff_block = Sublayer(cfg, name="feed_forward_block")
        h = layers.FeedForward(
            mlp_dim=cfg.mlp_dim,
            dropout_rate=cfg.activation_dropout_rate,
            dtype=cfg.dtype,
            name="feed_forward",
        )(ff_block(x, deterministic), deterministic=deterministic)
        return _constrain_hidden(ff_block.finish(x, h, deterministic))  # [batch, src, embed]


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention and feed-forward block of the decoder."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [batch, tgt, embed]
        encoded: jax.Array,  # [batch, src, embed]
        self_mask: jax.Array | None,  # [1, 1, tgt, tgt]; decoding: [batch, 1, beams, max_len*beams]
        cross_mask: jax.Array,  # [batch, 1, 1, src] (one row per sentence)
        *,
        deterministic: bool,
        decode: bool,
        beams: int = 1,
    ) -> jax.Array:
        cfg = self.config
        block = Sublayer(cfg, name="self_attention_block")
        normed = block(x, deterministic)  # [batch, tgt, embed]
        h = layers.MultiHeadAttention(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            dropout_rate=cfg.attention_dropout_rate,
            dtype=cfg.dtype,
            implementation=cfg.attention_impl,
            name="self_attention",
        )(normed, normed, self_mask, deterministic=deterministic, decode=decode, beams=beams)
        x = block.finish(x, h, deterministic)  # [batch, tgt, embed]
        block = Sublayer(cfg, name="cross_attention_block")
        h = layers.MultiHeadAttention(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            dropout_rate=cfg.attention_dropout_rate,
            dtype=cfg.dtype,
            implementation=cfg.attention_impl,
            is_cross_attention=True,
            name="cross_attention",
        )(block(x, deterministic), encoded, cross_mask, deterministic=deterministic, decode=decode)
        x = block.finish(x, h, deterministic)  # [batch, tgt, embed]
        block = Sublayer(cfg, name="feed_forward_block")
        h = layers.FeedForward(
            mlp_dim=cfg.mlp_dim,
            dropout_rate=cfg.activation_dropout_rate,
            dtype=cfg.dtype,
            name="feed_forward",
        )(block(x, deterministic), deterministic=deterministic)
        return _constrain_hidden(block.finish(x, h, deterministic))  # [batch, tgt, embed]


def _embed_tokens(
    embedding: nn.Embed,
    positions: PositionEmbedding,
    dropout: nn.Dropout,
    config: TransformerConfig,
    tokens: jax.Array,  # [batch, length]
    position_ids: jax.Array,  # [length]
    deterministic: bool,
) -> jax.Array:
    """Scaled token embeddings plus positions, with dropout -> [batch, length, embed]."""
    x = embedding(tokens)  # [batch, length, embed]
    if config.scale_embeddings:
        x = x * jnp.asarray(config.d_model**0.5, dtype=x.dtype)
    x = x + positions(position_ids)  # [batch, length, embed]
    return _constrain_hidden(dropout(x, deterministic=deterministic))


class Encoder(nn.Module):
    """Token + position embeddings followed by the encoder blocks."""

    config: TransformerConfig
    shared_embedding: nn.Embed

    @nn.compact
    def __call__(self, src: jax.Array, *, deterministic: bool) -> jax.Array:
        """src [batch, src] int -> [batch, src, embed]."""
        cfg = self.config
        _check_length("source", src.shape[1], cfg)
        x = _embed_tokens(
            self.shared_embedding,
            PositionEmbedding(cfg, name="positions"),
            nn.Dropout(cfg.dropout_rate),
            cfg,
            src,
            jnp.arange(src.shape[1]),
            deterministic,
        )
        valid = src != cfg.pad_id  # [batch, src]
        mask = layers.padding_mask(valid, valid)  # [batch, 1, src, src]
        for i in range(cfg.num_encoder_layers):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask, deterministic=deterministic)
        if cfg.pre_layer_norm:
            x = layers.layer_norm(cfg.layer_norm_eps, cfg.dtype, name="final_norm")(
                x, deterministic=deterministic
            )
        return x  # [batch, src, embed]


class Decoder(nn.Module):
    """Target embeddings (positions from a step counter when decoding) and decoder blocks."""

    config: TransformerConfig
    shared_embedding: nn.Embed

    @nn.compact
    def __call__(
        self,
        encoded: jax.Array,  # [batch, src, embed]
        src: jax.Array,  # [batch, src] int
        tgt_in: jax.Array,  # [batch, tgt] int; decoding: [batch * beams, 1]
        *,
        deterministic: bool,
        decode: bool,
        beams: int = 1,
    ) -> jax.Array:
        """-> final hidden states [batch, tgt, embed] ([batch * beams, 1, embed] decoding)."""
        cfg = self.config
        length = tgt_in.shape[1]  # decoding: the cache-creating call passes the step bound
        _check_length("target", length, cfg)
        position_ids = jnp.arange(length)  # [tgt]
        self_mask = layers.causal_mask(length)  # [1, 1, tgt, tgt]
        if decode:  # the cache-creating call's output is discarded (self_mask None)
            position, self_mask, beams = beam_cache.decoder_step(
                self, tgt_in.shape[0], length, beams
            )
            if position is not None:  # a step: the fed token's position [1]
                position_ids = position
        x = _embed_tokens(
            self.shared_embedding,
            PositionEmbedding(cfg, name="positions"),
            nn.Dropout(cfg.dropout_rate),
            cfg,
            tgt_in,
            position_ids,
            deterministic,
        )
        cross_mask = (src != cfg.pad_id)[:, None, None, :]  # [batch, 1, 1, src]
        for i in range(cfg.num_decoder_layers):
            x = DecoderLayer(cfg, name=f"layer_{i}")(
                x,
                encoded,
                self_mask,
                cross_mask,
                deterministic=deterministic,
                decode=decode,
                beams=beams,
            )
        if cfg.pre_layer_norm:
            x = layers.layer_norm(cfg.layer_norm_eps, cfg.dtype, name="final_norm")(
                x, deterministic=deterministic
            )
        return x  # [batch, tgt, embed]


class Transformer(nn.Module):
    """Encoder-decoder with one embedding table shared by source, target and output layer."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.shared_embedding = nn.Embed(
            num_embeddings=cfg.vocab_size,
            features=cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                EMBEDDING_INITS[cfg.embedding_init](cfg.d_model), ("vocab", "embed")
            ),
        )
        self.encoder = Encoder(cfg, self.shared_embedding)
        self.decoder = Decoder(cfg, self.shared_embedding)

    def __call__(
        self, src: jax.Array, tgt_in: jax.Array, *, deterministic: bool = True
    ) -> jax.Array:
        """src [batch, src], tgt_in [batch, tgt] -> logits [batch, tgt, vocab] float32."""
        encoded = self.encode(src, deterministic=deterministic)  # [batch, src, embed]
        return self.decode(encoded, src, tgt_in, deterministic=deterministic)

    def encode(self, src: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """src [batch, src] int -> encoder output [batch, src, embed]; pads are ``pad_id``."""
        return self.encoder(src, deterministic=deterministic)

    def decode(
        self,
        encoded: jax.Array,  # [batch, src, embed]
        src: jax.Array,  # [batch, src] int (only its padding is used)
        tgt_in: jax.Array,  # [batch, tgt] int
        *,
        deterministic: bool = True,
        decode: bool = False,
        beams: int = 1,
    ) -> jax.Array:
        """Decoder logits [batch, tgt, vocab] float32.

        With ``decode=True`` and an existing ``cache`` collection (``init_decode_cache``),
        ``tgt_in`` is one position of every hypothesis, ``[batch * beams, 1]`` (or of the
        first ``g < beams`` hypotheses of each sentence, ``[batch * g, 1]``), ``src`` is
        still ``[batch, src]`` (one row per sentence) and ``encoded`` is ignored (the cache
        holds its projection). ``beams`` is read only when the cache is created.
        """
        h = self.decoder(
            encoded, src, tgt_in, deterministic=deterministic, decode=decode, beams=beams
        )
        table = self.shared_embedding.embedding.astype(self.config.dtype)  # [vocab, embed]
        logits = fast_paths.matmul(h, table.T, 1, out_dtype=jnp.float32)  # [batch, tgt, vocab]
        return nn.with_logical_constraint(
            logits.astype(jnp.float32),
            ("activation_batch", "activation_length", "activation_vocab"),
        )


@functools.partial(jax.jit, static_argnames=("model", "max_len", "beams"))
def init_decode_cache(
    model: Transformer,
    params: Any,
    encoded: jax.Array,  # [batch, src, embed]
    src: jax.Array,  # [batch, src] int
    max_len: int,
    beams: int = 1,
) -> Any:
    """The ``cache`` collection for decoding ``beams`` hypotheses of each of the ``batch``
    sentences, up to ``max_len`` target positions.

    ``params`` is the ``"params"`` collection. Runs ``decode`` once on a dummy
    ``[batch, max_len]`` target: the self-attention layers allocate zero caches of that
    length for every beam and the cross-attention layers store the projected encoder
    output (once per sentence). Only the cache is returned, so XLA drops the dummy
    forward pass.
    """
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    if not 1 <= max_len <= model.config.max_len:
        raise ValueError(
            f"max_len must be in [1, config.max_len={model.config.max_len}], got {max_len}"
        )
    dummy = jnp.full((src.shape[0], max_len), model.config.bos_id, jnp.int32)  # [batch, max_len]
    _, variables = model.apply(
        {"params": params},
        encoded,
        src,
        dummy,
        decode=True,
        beams=beams,
        mutable=["cache"],
        method=Transformer.decode,
    )
    return variables["cache"]


def grow_decode_cache(
    model: Transformer,
    params: Any,
    encoded: jax.Array,  # [batch, src, embed]
    src: jax.Array,  # [batch, src] int
    cache: Any,
    max_len: int,
    beams: int = 1,
) -> Any:
    """``cache`` (``init_decode_cache`` for fewer positions, possibly already decoded into)
    made room for ``max_len`` positions: the self-attention keys/values and
    ``beam_ancestry`` are padded with zeros at the end of their position axis, everything
    else (the cross-attention projections, the step counters) is kept as it is.

    The padded cache is the one ``init_decode_cache(..., max_len)`` would have reached
    after the same steps (``beam_cache``, invariant 6: the entries are position-major, so
    the written ones keep their indices, and the new positions are masked until decoded).
    A search can therefore start with a cache for its first steps and grow it as it goes,
    so that attention reads only about as many slots as there are decoded positions
    (``distill_jax.decode``)."""
    target = jax.eval_shape(
        functools.partial(init_decode_cache, model, max_len=max_len, beams=beams),
        params,
        encoded,
        src,
    )
    return beam_cache.grow(cache, target)
