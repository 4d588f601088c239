"""Test support: the tiny Transformer students that the unit tests build (a few thousand
parameters, compiled in seconds) and the training setup of one."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from distill_jax import optim, train
from distill_jax.models.transformer import Transformer, TransformerConfig


def tiny_transformer(
    vocab_size: int,
    width: int = 16,
    layers: tuple[int, int] = (1, 1),
    max_len: int = 8,
    **fields: Any,
) -> Transformer:
    """A Transformer of ``width`` (``d_model``; ``width // 8`` heads of 8, feed-forward
    ``2 * width``) with ``layers`` (encoder, decoder) layers and room for ``max_len``
    positions; ``fields`` set other ``TransformerConfig`` fields (dropout rates, ...)."""
    return Transformer(
        TransformerConfig(
            vocab_size=vocab_size,
            d_model=width,
            num_heads=width // 8,
            mlp_dim=2 * width,
            num_encoder_layers=layers[0],
            num_decoder_layers=layers[1],
            max_len=max_len,
            **fields,
        )
    )


def student_setup(
    vocab_size: int,
    layers: tuple[int, int],
    *,
    dropout_rate: float = 0.1,
    seed: int = 0,
    grad_clip_norm: float | None = 1.0,
):
    """(loss_fn, params init, optimizer) of a width-32 student (``tiny_transformer``, 16
    positions) trained with offline top-K distillation (alpha 0.5) by Adam at a constant
    learning rate of 1e-3; ``seed`` draws the initial parameters."""
    model = tiny_transformer(vocab_size, 32, layers, max_len=16, dropout_rate=dropout_rate)
    loss_fn = train.student_loss_fn(model, train.StudentLossConfig(alpha=0.5))

    def init_params():
        x = jnp.ones((1, 4), jnp.int32)
        return model.init(jax.random.PRNGKey(seed), x, x)["params"]

    optimizer = optim.make_optimizer(
        optim.OptimizerConfig.student(
            learning_rate=1e-3, schedule="constant", grad_clip_norm=grad_clip_norm
        )
    )
    return loss_fn, init_params, optimizer
