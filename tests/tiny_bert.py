"""Test support: a tiny random Hugging Face BERT (transformers + torch) saved as safetensors."""

from __future__ import annotations

import pathlib

import torch
import transformers

# Sizes of the tiny model: small enough to compile in a second, with every dimension
# distinct so that a transposed or mis-reshaped weight cannot go unnoticed.
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    type_vocab_size=2,
)


def save_tiny_bert(
    path: pathlib.Path,
    *,
    hidden_act: str = "gelu",
    seed: int = 0,
    max_shard_size: str | None = None,
) -> transformers.BertForMaskedLM:
    """Builds a random ``BertForMaskedLM`` (keys ``bert.*`` and ``cls.predictions.*``),
    perturbs its LayerNorm parameters and biases away from their 1/0 initial values, saves
    it to ``path`` with ``save_pretrained(safe_serialization=True)`` (sharded when
    ``max_shard_size`` is given) and returns it in eval mode."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        **TINY, hidden_act=hidden_act, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model
