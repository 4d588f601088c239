"""PyTorch reference of the student and its training step, for ``bench_student_step.py``.

The same architecture and objective as ``distill_jax.models.transformer.Transformer`` +
``distill_jax.train.student_loss_fn`` ("paper" distillation from sparse top-K teacher
logits), written with torch's own building blocks:

* ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (post-LN,
  ``norm_first=False``; ReLU; ``batch_first=True``), d 512, ff 2048, 8 heads, 6 + 6 layers.
  Their single ``dropout`` argument (0.3) drives the residual dropouts; attention-weight
  dropout and the dropout after the ReLU are switched off (0.0), as in our config
  (``attention_dropout_rate = activation_dropout_rate = 0``, fairseq's defaults).
* One ``nn.Embedding`` shared by source, target and the output projection
  (``logits = h @ E^T``), scaled by ``sqrt(d)``, plus a fixed sinusoid table (sin on the
  first half of the features, cos on the second), dropout 0.3 on the sum.
* Loss per non-pad target token: ``(1 - a) * xe + a * kd`` with ``xe`` the label-smoothed
  cross-entropy (eps spread uniformly over the whole vocabulary) and
  ``kd = -sum_k softmax(topk_logits / T)_k * log_softmax(student)[idx_k]``; summed, then
  divided by the number of non-pad target tokens.
* Adam (0.9, 0.98), eps 1e-8, inverse-square-root schedule with linear warm-up
  (``LambdaLR``).

``load_flax_params`` copies a Flax student's parameters into this model, so the two
implementations can be checked to compute the same loss and gradients.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def sinusoid_table(max_len: int, features: int) -> torch.Tensor:
    """[max_len, features]: sin(pos * f_i) on the first half, cos on the second half, with
    f_i = exp(-i * log(10000) / (half - 1))."""
    half = features // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    inv_freq = np.exp(np.arange(half, dtype=np.float64) * -scale)  # [half]
    angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq[None, :]  # [max_len, half]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if features % 2:
        table = np.concatenate([table, np.zeros((max_len, 1))], axis=1)
    return torch.from_numpy(table.astype(np.float32))


class TorchStudent(nn.Module):
    """Post-LN Transformer encoder-decoder with shared, tied embeddings."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 512,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dropout: float = 0.3,
        max_len: int = 256,
        pad_id: int = 0,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.d_model, self.pad_id = d_model, pad_id
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        self.register_buffer("positions", sinusoid_table(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        common = dict(
            d_model=d_model,
            nhead=num_heads,
            dim_feedforward=mlp_dim,
            dropout=dropout,
            activation="relu",
            layer_norm_eps=layer_norm_eps,
            batch_first=True,
            norm_first=False,
        )
        self.encoder_layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(**common) for _ in range(num_encoder_layers)]
        )
        self.decoder_layers = nn.ModuleList(
            [nn.TransformerDecoderLayer(**common) for _ in range(num_decoder_layers)]
        )
        for layer in list(self.encoder_layers) + list(self.decoder_layers):
            layer.self_attn.dropout = 0.0  # no dropout on attention weights
            layer.dropout = nn.Identity()  # no dropout after the ReLU
            if hasattr(layer, "multihead_attn"):
                layer.multihead_attn.dropout = 0.0

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, length] -> [batch, length, d]: sqrt(d) * E[tokens] + positions, dropout."""
        length = tokens.shape[1]
        x = self.embedding(tokens) * math.sqrt(self.d_model) + self.positions[:length]
        return self.dropout(x)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src [batch, S], tgt_in [batch, T] (int64) -> logits [batch, T, vocab]."""
        src_pad = src == self.pad_id  # [batch, S], True = padding
        x = self._embed(src)  # [batch, S, d]
        for layer in self.encoder_layers:
            x = layer(x, src_key_padding_mask=src_pad)
        length = tgt_in.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=src.device)
        y = self._embed(tgt_in)  # [batch, T, d]
        for layer in self.decoder_layers:
            y = layer(y, x, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=src_pad)
        return F.linear(y, self.embedding.weight)  # [batch, T, vocab]


def combined_loss(
    logits: torch.Tensor,
    tgt_out: torch.Tensor,
    kd_logits: torch.Tensor,
    kd_indices: torch.Tensor,
    *,
    alpha: float = 0.5,
    label_smoothing: float = 0.1,
    temperature: float = 10.0,
) -> dict[str, torch.Tensor]:
    """Summed losses and the token count (the same metrics our step returns).

    logits [b, t, V]; tgt_out [b, t] (0 = pad); kd_logits / kd_indices [b, t, K].
    """
    weights = (tgt_out != 0).to(logits.dtype)  # [b, t]
    log_p = F.log_softmax(logits, dim=-1)  # [b, t, V]
    nll = -log_p.gather(-1, tgt_out.unsqueeze(-1)).squeeze(-1)  # [b, t]
    smooth = -log_p.mean(dim=-1)  # [b, t]
    xe = (1.0 - label_smoothing) * nll + label_smoothing * smooth  # [b, t]
    teacher = F.softmax(kd_logits / temperature, dim=-1)  # [b, t, K]
    kd = -(teacher * log_p.gather(-1, kd_indices)).sum(dim=-1)  # [b, t]
    total = (1.0 - alpha) * xe + alpha * kd  # [b, t]
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == tgt_out).to(logits.dtype)
    return {
        "loss": (total * weights).sum(),
        "xe": (xe * weights).sum().detach(),
        "nll": (nll * weights).sum().detach(),
        "kd": (kd * weights).sum().detach(),
        "accuracy": (correct * weights).sum(),
        "tokens": weights.sum(),
    }


def inverse_sqrt_factor(warmup_steps: int):
    """LambdaLR factor: ``min(count / warmup, sqrt(warmup / count))`` (count = updates done)."""

    def factor(count: int) -> float:
        return min(count / warmup_steps, math.sqrt(warmup_steps / max(count, 1)))

    return factor


def make_optimizer(
    model: nn.Module,
    *,
    learning_rate: float = 5e-4,
    warmup_steps: int = 4000,
    implementation: str = "fused",
):
    """Adam (0.9, 0.98, eps 1e-8) + inverse-sqrt LambdaLR; ``implementation`` is torch's
    "fused", "foreach" or "for-loop" Adam kernel."""
    kwargs = {"fused": implementation == "fused", "foreach": implementation == "foreach"}
    if implementation not in ("fused", "foreach", "for-loop"):
        raise ValueError(f"unknown Adam implementation {implementation!r}")
    if implementation == "fused":
        kwargs.pop("foreach")
    optimizer = torch.optim.Adam(
        model.parameters(), lr=learning_rate, betas=(0.9, 0.98), eps=1e-8, **kwargs
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt_factor(warmup_steps))
    return optimizer, schedule


def grad_norm(model: nn.Module) -> torch.Tensor:
    """Global L2 norm of the gradients (the ``grad_norm`` metric of our step)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def autocast(device: str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device`` (a no-op context for None/float32)."""
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device_type=device, dtype=dtype if enabled else None, enabled=enabled)


def train_step(
    model: nn.Module,
    optimizer,
    schedule,
    batch: dict[str, torch.Tensor],
    compute_dtype: torch.dtype | None = None,
    **loss_kwargs,
) -> dict[str, torch.Tensor]:
    """Forward, backward of the token-normalised loss, Adam update, schedule step. With
    ``compute_dtype`` (e.g. ``torch.bfloat16``) forward and loss run under autocast (the
    mixed precision recipe: float32 parameters and optimizer, bf16 matmuls)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(batch["src"].device.type, compute_dtype):
        logits = model(batch["src"], batch["tgt_in"])
        metrics = combined_loss(
            logits, batch["tgt_out"], batch["kd_logits"], batch["kd_indices"], **loss_kwargs
        )
    (metrics["loss"] / metrics["tokens"].clamp(min=1.0)).backward()
    metrics["grad_norm"] = grad_norm(model)
    optimizer.step()
    schedule.step()
    return metrics


# --------------------------------------------------------------------------- parameters


def _heads_in(kernel: np.ndarray) -> np.ndarray:
    """Flax [embed, heads, kv] kernel -> torch Linear weight [heads*kv, embed]."""
    return kernel.reshape(kernel.shape[0], -1).T


def _copy(target: torch.Tensor, value: Any) -> None:
    value = torch.from_numpy(np.array(value, dtype=np.float32, order="C", copy=True))
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(
            f"shape mismatch: torch {tuple(target.shape)} vs flax {tuple(value.shape)}"
        )
    with torch.no_grad():
        target.copy_(value)


def _load_attention(mha: nn.MultiheadAttention, p: dict) -> None:
    _copy(
        mha.in_proj_weight,
        np.concatenate(
            [_heads_in(np.asarray(p[n]["kernel"])) for n in ("query", "key", "value")], axis=0
        ),
    )
    _copy(
        mha.in_proj_bias,
        np.concatenate([np.asarray(p[n]["bias"]).reshape(-1) for n in ("query", "key", "value")]),
    )
    out = np.asarray(p["out"]["kernel"])  # [heads, kv, embed]
    _copy(mha.out_proj.weight, out.reshape(-1, out.shape[-1]).T)
    _copy(mha.out_proj.bias, p["out"]["bias"])


def _load_norm(norm: nn.LayerNorm, p: dict) -> None:
    _copy(norm.weight, p["norm"]["scale"])
    _copy(norm.bias, p["norm"]["bias"])


def _load_feed_forward(layer: nn.Module, p: dict) -> None:
    _copy(layer.linear1.weight, np.asarray(p["intermediate"]["kernel"]).T)
    _copy(layer.linear1.bias, p["intermediate"]["bias"])
    _copy(layer.linear2.weight, np.asarray(p["output"]["kernel"]).T)
    _copy(layer.linear2.bias, p["output"]["bias"])


def load_flax_params(model: TorchStudent, params: dict) -> None:
    """Copies the ``params`` of a post-LN, sinusoidal ``distill_jax`` Transformer into
    ``model`` (which must have the same sizes)."""
    _copy(model.embedding.weight, params["shared_embedding"]["embedding"])
    for i, layer in enumerate(model.encoder_layers):
        p = params["encoder"][f"layer_{i}"]
        _load_attention(layer.self_attn, p["self_attention"])
        _load_norm(layer.norm1, p["self_attention_block"])
        _load_feed_forward(layer, p["feed_forward"])
        _load_norm(layer.norm2, p["feed_forward_block"])
    for i, layer in enumerate(model.decoder_layers):
        p = params["decoder"][f"layer_{i}"]
        _load_attention(layer.self_attn, p["self_attention"])
        _load_norm(layer.norm1, p["self_attention_block"])
        _load_attention(layer.multihead_attn, p["cross_attention"])
        _load_norm(layer.norm2, p["cross_attention_block"])
        _load_feed_forward(layer, p["feed_forward"])
        _load_norm(layer.norm3, p["feed_forward_block"])


def count_parameters(model: nn.Module, exclude: nn.Module | None = None) -> int:
    """Number of parameters, optionally without those of ``exclude``."""
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
