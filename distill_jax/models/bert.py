"""The BERT teacher: a post-LayerNorm Transformer encoder plus the C-MLM output head.

Parameter names follow Hugging Face's ``BertModel`` so that ``distill_jax.hf``'s key
table reads one to one::

  embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale, bias}
  encoder/layer_{i}/attention/{query, key, value, out}/{kernel, bias}
  encoder/layer_{i}/attention_LayerNorm/{scale, bias}
  encoder/layer_{i}/ffn/{intermediate, output}/{kernel, bias}
  encoder/layer_{i}/output_LayerNorm/{scale, bias}
  cmlm_head/dense/{kernel, bias}        (BERT's cls.predictions.transform.dense)
  cmlm_head/LayerNorm/{scale, bias}     (BERT's cls.predictions.transform.LayerNorm)
  cmlm_head/output/{kernel, bias}       (over the student's vocabulary; not tied)

Plain ``__call__`` creates only the encoder parameters; ``cmlm_logits`` also creates
``cmlm_head``. Parameters are float32; ``BertConfig.dtype`` is the compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import fast_paths, layers

Dtype = Any

# Hugging Face ``hidden_act`` names this module implements.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": fast_paths.gelu,  # the exact (erf) form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": nn.relu,
}

# Student ids below this are the special tokens <pad>, <s>, </s>, <unk> (docs/interfaces.md).
NUM_SPECIAL_STUDENT_IDS = 4

_HIDDEN = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (the fields of a Hugging Face ``config.json``)."""

    vocab_size: int  # BERT's WordPiece vocabulary size (rows of the input embedding)
    hidden_size: int  # model width
    num_hidden_layers: int  # number of encoder layers
    num_attention_heads: int  # attention heads per layer (must divide hidden_size)
    intermediate_size: int  # feed-forward inner width
    hidden_act: str = "gelu"  # feed-forward / head activation, a key of ACTIVATIONS
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and residual branches
    attention_probs_dropout_prob: float = 0.1  # dropout on attention weights
    max_position_embeddings: int = 512  # rows of the position embedding
    type_vocab_size: int = 2  # rows of the token-type (segment) embedding
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    initializer_range: float = 0.02  # stddev of the normal initialiser of kernels/embeddings
    cmlm_vocab_size: int | None = None  # C-MLM output vocabulary (the student's); None: no head
    dtype: Dtype = jnp.float32  # compute dtype (parameters stay float32)
    attention_impl: str = "einsum"  # see layers.MultiHeadAttention.implementation

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"BertConfig.hidden_act={self.hidden_act!r} is not supported; "
                f"supported: {sorted(ACTIVATIONS)}"
            )
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(
                f"BertConfig.attention_impl={self.attention_impl!r} is not one of "
                f"{layers.ATTENTION_IMPLS}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.cmlm_vocab_size is not None and self.cmlm_vocab_size <= NUM_SPECIAL_STUDENT_IDS:
            raise ValueError(
                f"BertConfig.cmlm_vocab_size={self.cmlm_vocab_size} must be larger than "
                f"the {NUM_SPECIAL_STUDENT_IDS} special student ids"
            )

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> BertConfig:
        """Builds a config from a Hugging Face BERT ``config.json`` dict.

        ``overrides`` replace fields (e.g. ``cmlm_vocab_size``, ``dtype``, dropout rates).
        Refuses what this module does not implement: a ``model_type`` other than
        ``bert``, a ``position_embedding_type`` other than ``absolute``, unknown
        activations.
        """
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"config model_type={model_type!r} is not supported; expected 'bert'")
        position_type = d.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"config position_embedding_type={position_type!r} is not supported; "
                "only 'absolute' position embeddings are implemented"
            )
        field_names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - field_names)
        if unknown:
            raise TypeError(
                f"unknown BertConfig override(s) {unknown}; fields: {sorted(field_names)}"
            )
        required = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        missing = [k for k in required if k not in d and k not in overrides]
        if missing:
            raise ValueError(f"config is missing required BERT field(s) {missing}")
        # Only architecture fields come from the file; its "dtype" is the storage dtype
        # of the weights, not our compute dtype.
        hf_fields = field_names - {"cmlm_vocab_size", "dtype", "attention_impl"}
        values = {k: d[k] for k in hf_fields if k in d}
        values.update(overrides)
        return cls(**values)


def _normal(config: BertConfig) -> layers.Initializer:
    return nn.initializers.normal(stddev=config.initializer_range)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, *, deterministic: bool):
        cfg = self.config

        def embed(num: int, axes: tuple, name: str) -> nn.Embed:
            return nn.Embed(
                num,
                cfg.hidden_size,
                dtype=cfg.dtype,
                param_dtype=jnp.float32,
                embedding_init=nn.with_logical_partitioning(_normal(cfg), axes),
                name=name,
            )

        x = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(
            position_ids
        )
        x = x + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(
            token_type_ids
        )  # [batch, length, hidden]
        x = layers.layer_norm(cfg.layer_norm_eps, cfg.dtype, name="LayerNorm")(
            x, deterministic=deterministic
        )
        x = nn.Dropout(rate=cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, _HIDDEN)


class BertLayer(nn.Module):
    """One post-LN encoder layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool, rows: jax.Array | None = None):
        """``x`` ``[batch, length, hidden]`` -> the same shape; with ``rows`` (int
        ``[batch, M]`` positions), only those rows' outputs ``[batch, M, hidden]``: their
        queries attend over every key of ``x``, and the feed-forward block runs on them
        alone (what a last layer needs when only some positions are read)."""
        cfg = self.config
        queries = (
            x if rows is None else jnp.take_along_axis(x, rows[:, :, None], axis=1)
        )  # [batch, M, hidden]
        attn = layers.MultiHeadAttention(
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            dropout_rate=cfg.attention_probs_dropout_prob,
            dtype=cfg.dtype,
            kernel_init=_normal(cfg),
            implementation=cfg.attention_impl,
            name="attention",
        )(queries, x, mask, deterministic=deterministic)  # [batch, length or M, hidden]
        attn = nn.Dropout(rate=cfg.hidden_dropout_prob)(attn, deterministic=deterministic)
        x = layers.layer_norm(cfg.layer_norm_eps, cfg.dtype, name="attention_LayerNorm")(
            queries + attn, deterministic=deterministic
        )
        h = layers.FeedForward(
            mlp_dim=cfg.intermediate_size,
            activation=ACTIVATIONS[cfg.hidden_act],
            dropout_rate=0.0,  # BERT has no dropout inside the feed-forward block
            dtype=cfg.dtype,
            kernel_init=_normal(cfg),
            name="ffn",
        )(x, deterministic=deterministic)  # [batch, length or M, hidden]
        h = nn.Dropout(rate=cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        x = layers.layer_norm(cfg.layer_norm_eps, cfg.dtype, name="output_LayerNorm")(
            x + h, deterministic=deterministic
        )
        return nn.with_logical_constraint(x, _HIDDEN)


class BertEncoder(nn.Module):
    """A stack of ``num_hidden_layers`` BertLayers named ``layer_{i}``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool, rows: jax.Array | None = None):
        """With ``rows`` (``[batch, M]`` positions) the last layer computes those rows only."""
        last = self.config.num_hidden_layers - 1
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=f"layer_{i}")(
                x, mask, deterministic=deterministic, rows=rows if i == last else None
            )
        return x


class BertCmlmHead(nn.Module):
    """C-MLM head: dense(hidden->hidden), activation, LayerNorm (BERT's MLM transform),
    then a projection onto the student's vocabulary with its own bias."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.Dense(
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            # A square hidden->hidden kernel: inputs along embed, outputs along mlp so
            # that the two axes go to different mesh axes.
            kernel_init=nn.with_logical_partitioning(_normal(cfg), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="dense",
        )(hidden)  # [batch, length, hidden]
        h = ACTIVATIONS[cfg.hidden_act](h)
        # (no deterministic flag here: the head's statistics are reductions in every call)
        h = layers.layer_norm(cfg.layer_norm_eps, cfg.dtype, name="LayerNorm")(h)
        h = nn.with_logical_constraint(h, _HIDDEN)
        logits = nn.Dense(
            cfg.cmlm_vocab_size,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(_normal(cfg), ("embed", "vocab")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            name="output",
        )(h)  # [batch, length, cmlm_vocab]
        logits = nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab")
        )
        return logits.astype(jnp.float32)


class BertModel(nn.Module):
    """BERT encoder; ``cmlm_logits`` adds the C-MLM head.

    Inputs (int arrays ``[batch, length]``): ``input_ids`` (BERT ids),
    ``token_type_ids`` (default 0), ``attention_mask`` (1 = real token, 0 = padding
    anywhere in the row, default all 1) and ``position_ids`` (default 0..length-1;
    pass explicit ids that skip padding in the middle of a row to get the result of
    the packed sequence).
    """

    config: BertConfig

    def setup(self):
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        if self.config.cmlm_vocab_size is not None:
            self.cmlm_head = BertCmlmHead(self.config)

    def __call__(
        self,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        position_ids=None,
        *,
        deterministic: bool = True,
        output_positions: jax.Array | None = None,
    ) -> jax.Array:
        """Last hidden states ``[batch, length, hidden]``; with ``output_positions`` (int
        ``[batch, M]``), only those positions' ``[batch, M, hidden]``, equal to gathering
        them from the full output (the last layer then computes only those rows)."""
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            # jnp.take would fill the missing position rows with NaN.
            raise ValueError(
                f"input length {length} is longer than BERT's max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, length), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        mask = None
        if attention_mask is not None:
            # Keys only, as BERT does: padded queries still attend to the real tokens.
            mask = attention_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1, length]
        x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic=deterministic)
        return self.encoder(
            x, mask, deterministic=deterministic, rows=output_positions
        )  # [batch, length or M, hidden]

    def cmlm_logits(self, *inputs, **options) -> jax.Array:
        """C-MLM logits over the student's vocabulary, float32: ``__call__``'s arguments,
        ``[batch, length, cmlm_vocab_size]`` (``[batch, M, ...]`` with ``output_positions``)."""
        if self.config.cmlm_vocab_size is None:
            raise ValueError("BertModel.cmlm_logits needs BertConfig.cmlm_vocab_size to be set")
        hidden = self(*inputs, **options)
        return self.cmlm_head(hidden)


def init_cmlm_head(config: BertConfig, params: dict, teacher_ids, rng: jax.Array) -> dict:
    """Returns ``params`` with a freshly initialised ``cmlm_head``.

    ``params`` is the plain (unboxed) ``params`` collection of a ``BertModel``, e.g. from
    ``distill_jax.hf.load_bert``. ``teacher_ids`` (int ``[cmlm_vocab_size]``) maps every
    student id to a BERT id (docs/interfaces.md); ``teacher_ids[3]`` (student ``<unk>``)
    is BERT's ``[UNK]``. Output-projection column ``i`` is BERT's word embedding of
    ``teacher_ids[i]``, as in the reference (``convert_embedding``): a piece BERT knows gets
    its own embedding, one it does not (``<unk>``, fillers, pieces with no BERT
    counterpart) gets ``[UNK]``'s. ``<pad>`` / ``<s>`` / ``</s>`` get ``[PAD]`` / ``[CLS]``
    / ``[SEP]``'s (the reference's OpenNMT specials are not BERT strings, so it gives them
    ``[UNK]``'s). The output bias is zero. A ``cmlm_head/dense`` and ``cmlm_head/LayerNorm``
    already in ``params`` (BERT's MLM transform, loaded from the checkpoint) are kept;
    otherwise (a checkpoint without an MLM head, e.g. all-MiniLM-L6-v2) they are
    initialised as BERT initialises them.
    """
    if config.cmlm_vocab_size is None:
        raise ValueError("init_cmlm_head needs BertConfig.cmlm_vocab_size to be set")
    teacher_ids = np.asarray(teacher_ids)
    if teacher_ids.shape != (config.cmlm_vocab_size,):
        raise ValueError(
            f"teacher_ids has shape {teacher_ids.shape}, expected ({config.cmlm_vocab_size},) "
            "(BertConfig.cmlm_vocab_size)"
        )
    if teacher_ids.min() < 0 or teacher_ids.max() >= config.vocab_size:
        raise ValueError(
            f"teacher_ids must lie in [0, {config.vocab_size}) (BertConfig.vocab_size), "
            f"found [{teacher_ids.min()}, {teacher_ids.max()}]"
        )
    hidden = jnp.zeros((1, 1, config.hidden_size), config.dtype)
    head = nn.meta.unbox(BertCmlmHead(config).init(rng, hidden)["params"])
    word_embeddings = params["embeddings"]["word_embeddings"]["embedding"]  # [bert_vocab, hidden]
    output = dict(head["output"])
    output["kernel"] = jnp.take(
        word_embeddings, jnp.asarray(teacher_ids), axis=0
    ).T  # [hidden, cmlm_vocab]
    head["output"] = output
    old_head = params.get("cmlm_head", {})
    for transform in ("dense", "LayerNorm"):
        if transform in old_head:
            head[transform] = old_head[transform]
    return {**params, "cmlm_head": head}
