"""Optimizers and learning-rate schedules for the teacher and the student.

Teacher (C-MLM fine-tuning of BERT): AdamW, lr 5e-5, betas (0.9, 0.999), eps 1e-6,
weight decay 0.01 on everything except biases and LayerNorm parameters, linear warm-up
over a fraction of training then linear decay to 0, gradient-norm clipping at 1.0.

Student (Transformer seq2seq): Adam, betas (0.9, 0.98), eps 1e-8, no weight decay by
default, inverse-square-root schedule with linear warm-up (fairseq), or the noam schedule
(Vaswani et al.; OpenNMT-py's ``-decay_method noam``, which the paper's reference trains with).

Schedules take optax's ``count``: the number of updates already applied, so the first
update uses ``schedule(0)`` (0 for both warm-ups, as in transformers and fairseq).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jax.Array]

SCHEDULES = ("linear", "inverse_sqrt", "noam", "constant")


def linear_warmup_decay(peak: float, warmup_steps: int, total_steps: int) -> Schedule:
    """``peak * count / warmup`` during warm-up, then linear decay to 0 at ``total_steps``."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"linear schedule needs 0 <= warmup_steps <= total_steps and total_steps > 0, "
            f"got warmup_steps={warmup_steps}, total_steps={total_steps}"
        )

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(warmup_steps, 1)
        decay = (total_steps - count) / max(total_steps - warmup_steps, 1)
        factor = jnp.where(count < warmup_steps, warm, decay)
        return peak * jnp.clip(factor, 0.0, 1.0)

    return schedule


def inverse_sqrt(peak: float, warmup_steps: int) -> Schedule:
    """``peak * min(count / warmup, sqrt(warmup / count))`` (Vaswani et al. / fairseq)."""
    if warmup_steps <= 0:
        raise ValueError(f"inverse_sqrt schedule needs warmup_steps > 0, got {warmup_steps}")

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / warmup_steps
        decay = jnp.sqrt(warmup_steps / jnp.maximum(count, 1.0))
        return peak * jnp.minimum(warm, decay)

    return schedule


def noam(factor: float, warmup_steps: int, model_size: int) -> Schedule:
    """``factor * model_size^-0.5 * min(step^-0.5, step * warmup^-1.5)`` with
    ``step = count + 1``, as OpenNMT-py (its step counter starts at 1); it peaks at
    ``factor * (model_size * warmup)^-0.5`` on update ``warmup``."""
    if warmup_steps <= 0 or model_size <= 0:
        raise ValueError(
            f"noam schedule needs warmup_steps > 0 and model_size > 0, got "
            f"warmup_steps={warmup_steps}, model_size={model_size}"
        )

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return factor * model_size**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def constant(peak: float) -> Schedule:
    """A constant learning rate."""
    return lambda count: jnp.full((), peak, jnp.float32)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adam(W) with a schedule, decoupled weight decay and gradient clipping."""

    learning_rate: float = 5e-5  # peak learning rate ("noam": the factor)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-6  # Adam denominator epsilon
    weight_decay: float = 0.01  # decoupled weight decay (AdamW); 0 = plain Adam
    schedule: str = "linear"  # one of SCHEDULES
    warmup_steps: int = 0  # warm-up length in updates; 0 = use warmup_fraction
    warmup_fraction: float = 0.05  # warm-up as a fraction of total_steps (linear only)
    total_steps: int = 0  # training length in updates (needed by "linear")
    grad_clip_norm: float | None = 1.0  # global gradient-norm clip; None = no clipping
    model_size: int = 512  # d_model of the noam schedule

    @classmethod
    def teacher(cls, total_steps: int, **overrides) -> OptimizerConfig:
        """The C-MLM fine-tuning recipe (AdamW 5e-5, 5% warm-up, linear decay, clip 1)."""
        return cls(total_steps=total_steps, **overrides)

    @classmethod
    def student(cls, **overrides) -> OptimizerConfig:
        """The Transformer recipe (Adam (0.9, 0.98), inverse-sqrt, 4000 warm-up)."""
        settings = dict(
            learning_rate=5e-4,
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            weight_decay=0.0,
            schedule="inverse_sqrt",
            warmup_steps=4000,
            grad_clip_norm=None,
        )
        settings.update(overrides)
        return cls(**settings)

    def resolved_warmup_steps(self) -> int:
        """``warmup_steps`` if set, else ``warmup_fraction * total_steps`` (rounded)."""
        if self.warmup_steps:
            return self.warmup_steps
        return int(round(self.warmup_fraction * self.total_steps))


def make_schedule(cfg: OptimizerConfig) -> Schedule:
    """The learning-rate schedule of ``cfg``."""
    if cfg.schedule == "linear":
        return linear_warmup_decay(cfg.learning_rate, cfg.resolved_warmup_steps(), cfg.total_steps)
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt(cfg.learning_rate, cfg.resolved_warmup_steps())
    if cfg.schedule == "noam":
        return noam(cfg.learning_rate, cfg.resolved_warmup_steps(), cfg.model_size)
    if cfg.schedule == "constant":
        return constant(cfg.learning_rate)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; expected one of {SCHEDULES}")


def _key_name(entry: Any) -> str:
    """The text of one pytree path entry (dict key or attribute)."""
    for attr in ("key", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def decays(path: tuple) -> bool:
    """Whether the parameter at ``path`` gets weight decay: not biases, not LayerNorm
    (a leaf named ``bias`` or ``scale``, or any module whose name contains "norm")."""
    names = [_key_name(e) for e in path if _key_name(e) != "value"]  # "value": flax box
    if not names:
        return True
    if names[-1] in ("bias", "scale"):
        return False
    return not any("norm" in n.lower() for n in names[:-1])


def weight_decay_mask(params: Any) -> Any:
    """A tree of booleans matching ``params``: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip (optional) -> Adam(W) with the schedule of ``cfg``."""
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    schedule = make_schedule(cfg)
    parts = []
    if cfg.grad_clip_norm is not None:
        if cfg.grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {cfg.grad_clip_norm}")
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts)
