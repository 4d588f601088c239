"""Conditional-MLM (C-MLM) examples: teacher inputs built from a student batch, and masks.

The teacher reads ``[CLS] src [SEP] tgt [SEP]`` (the last ``[SEP]`` is the EOS slot) and
predicts the masked target positions over the student vocabulary. The layout is fixed in
``docs/interfaces.md``; it is derived from a padded student batch without re-tokenizing,
so it works inside a jitted step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Probability that a target position is replaced by [MASK] (the paper's 0.15).
DEFAULT_MASK_RATE = 0.15
# Stride of the deterministic soft-target masks (the reference's S = 7).
DEFAULT_STRIDE = 7


def _array_module(*arrays):
    """``jnp`` if any argument is a JAX array (or tracer), else ``numpy``."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def build_cmlm_inputs(src, tgt_out, teacher_ids, mlm_mask, *, cls_id: int, mask_id: int) -> dict:
    """Teacher (BERT) inputs for C-MLM from a student batch.

    Args:
      src: ``[b, S]`` int student ids, source pieces + ``</s>``, 0-padded.
      tgt_out: ``[b, T]`` int student ids, target pieces + ``</s>``, 0-padded.
      teacher_ids: ``[V]`` int, student id -> teacher id (``Vocabulary.teacher_ids``).
      mlm_mask: ``[b, T]`` bool/int, target positions to replace by ``[MASK]``.
      cls_id: the teacher's ``[CLS]`` id.
      mask_id: the teacher's ``[MASK]`` id.

    Returns:
      A dict with ``input_ids``, ``token_type_ids``, ``position_ids``, ``attention_mask``
      (all int32 ``[b, 1+S+T]``), ``labels`` (int32 ``[b, T]`` = ``tgt_out``) and
      ``label_weights`` (float32 ``[b, T]``: masked, non-pad target positions). The teacher's
      output at ``1 + S + t`` predicts ``tgt_out[:, t]``. Uses numpy on numpy input and
      ``jax.numpy`` on JAX arrays (also inside ``jit``).
    """
    xp = _array_module(src, tgt_out, teacher_ids, mlm_mask)
    src = xp.asarray(src, dtype=xp.int32)  # [b, S]
    tgt_out = xp.asarray(tgt_out, dtype=xp.int32)  # [b, T]
    teacher_ids = xp.asarray(teacher_ids, dtype=xp.int32)  # [V]
    batch = src.shape[0]
    src_real = src != 0  # [b, S]
    tgt_real = tgt_out != 0  # [b, T]
    masked = xp.asarray(mlm_mask).astype(bool) & tgt_real  # [b, T]

    cls = xp.full((batch, 1), cls_id, dtype=xp.int32)  # [b, 1]
    tgt_teacher = xp.where(masked, xp.int32(mask_id), teacher_ids[tgt_out])  # [b, T]
    input_ids = xp.concatenate([cls, teacher_ids[src], tgt_teacher], axis=1)  # [b, 1+S+T]

    real = xp.concatenate(
        [xp.ones((batch, 1), dtype=bool), src_real, tgt_real], axis=1
    )  # [b, 1+S+T]
    token_type_ids = xp.concatenate(
        [
            xp.zeros((batch, 1 + src.shape[1]), dtype=xp.int32),
            xp.ones(tgt_out.shape, dtype=xp.int32),
        ],
        axis=1,
    )  # [b, 1+S+T]
    # Positions count real tokens only, so the middle padding is skipped: 0 for [CLS].
    position_ids = xp.where(real, xp.cumsum(real.astype(xp.int32), axis=1) - 1, 0)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "position_ids": position_ids.astype(xp.int32),
        "attention_mask": real.astype(xp.int32),
        "labels": tgt_out,  # [b, T]
        "label_weights": masked.astype(xp.float32),  # [b, T]
    }


def masked_capacity(tgt_len: int, rate: float) -> int:
    """The most positions a C-MLM training mask of ``tgt_len`` target positions may mask.

    The mean plus three standard deviations of the binomial count, plus one, capped at
    ``tgt_len``: ``random_target_mask`` redraws the rare mask that masks more (about one
    in 700 at rate 0.15-0.3), so the teacher's output layer runs on a fixed number of
    positions per row (``masked_positions``, ``train.cmlm_loss_fn``). Non-decreasing in
    ``tgt_len``, so a batch padded to ``T`` holds at most ``masked_capacity(T, rate)``
    masked positions in any row.
    """
    spread = 3.0 * math.sqrt(tgt_len * rate * (1.0 - rate))
    return min(tgt_len, math.ceil(rate * tgt_len + spread) + 1)


def random_target_mask(
    tgt_len: int, seed: int, example_index: int, rate: float = DEFAULT_MASK_RATE
) -> np.ndarray:
    """C-MLM training mask for one target of ``tgt_len`` positions (EOS slot included).

    Each position is masked with probability ``rate``; the draw is repeated until at
    least one position and at most ``masked_capacity(tgt_len, rate)`` are masked. The
    mask depends only on ``(seed, example_index)``, so any host computes the same mask
    for the same example.

    Returns:
      ``[tgt_len]`` bool.
    """
    if tgt_len < 1:
        raise ValueError(f"random_target_mask: tgt_len must be >= 1, got {tgt_len}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"random_target_mask: rate must be in (0, 1], got {rate}")
    if seed < 0 or example_index < 0:
        raise ValueError(
            f"random_target_mask: seed ({seed}) and example_index ({example_index}) must be >= 0"
        )
    most = masked_capacity(tgt_len, rate)
    rng = np.random.default_rng([int(seed), int(example_index)])
    while True:
        mask = rng.random(tgt_len) < rate  # [tgt_len]
        if 1 <= mask.sum() <= most:
            return mask


def masked_positions(mask, capacity: int):
    """The masked positions of each row, in order, padded with -1 to ``capacity``.

    Args:
      mask: ``[b, T]`` bool, e.g. ``mlm_mask & (tgt_out != 0)``.
      capacity: static width of the result; numpy input with a row that masks more
        raises ``ValueError``. On JAX arrays (inside ``jit``) the caller guarantees it,
        e.g. with ``capacity = T``.

    Returns:
      ``[b, capacity]`` int32 target positions, -1 where a row has fewer. Uses numpy on
      numpy input and ``jax.numpy`` on JAX arrays.
    """
    xp = _array_module(mask)
    mask = xp.asarray(mask).astype(bool)  # [b, T]
    if xp is np and mask.shape[0] and int(mask.sum(axis=1).max()) > capacity:
        raise ValueError(
            f"masked_positions: a row masks {int(mask.sum(axis=1).max())} "
            f"positions, more than the capacity {capacity}"
        )
    width = mask.shape[1]
    # A stable sort of "not masked" puts each row's masked positions first, in order.
    order = xp.argsort(~mask, axis=1, stable=True)[:, :capacity]  # [b, min(T, capacity)]
    kept = xp.take_along_axis(mask, order, axis=1)  # [b, min(T, capacity)]
    positions = xp.where(kept, order, -1).astype(xp.int32)
    if capacity > width:
        positions = xp.pad(positions, ((0, 0), (0, capacity - width)), constant_values=-1)
    return positions  # [b, capacity]


def stride_masks(tgt_len: int, stride: int = DEFAULT_STRIDE) -> np.ndarray:
    """Deterministic soft-target masks: copy ``i`` masks positions ``i, i+stride, ...``.

    Only copies that mask something are returned (``min(stride, tgt_len)`` of them), so
    every position is masked in exactly one copy.

    Returns:
      ``[num_copies, tgt_len]`` bool.
    """
    if tgt_len < 1 or stride < 1:
        raise ValueError(f"stride_masks: tgt_len ({tgt_len}) and stride ({stride}) must be >= 1")
    copies = np.arange(min(stride, tgt_len))[:, None]  # [num_copies, 1]
    positions = np.arange(tgt_len)[None, :]  # [1, tgt_len]
    return positions % stride == copies  # [num_copies, tgt_len]
