"""Conditional-MLM (C-MLM) examples: teacher inputs built from a student batch, and masks.

The teacher reads ``[CLS] src [SEP] tgt [SEP]`` (the last ``[SEP]`` is the EOS slot) and
predicts the masked target positions over the student vocabulary. The layout is fixed in
``docs/interfaces.md``; it is derived from a padded student batch without re-tokenizing,
so it works inside a jitted step.
"""

from __future__ import annotations

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
    src = xp.asarray(src, dtype=xp.int32)                        # [b, S]
    tgt_out = xp.asarray(tgt_out, dtype=xp.int32)                # [b, T]
    teacher_ids = xp.asarray(teacher_ids, dtype=xp.int32)        # [V]
    batch = src.shape[0]
    src_real = src != 0                                          # [b, S]
    tgt_real = tgt_out != 0                                      # [b, T]
    masked = xp.asarray(mlm_mask).astype(bool) & tgt_real        # [b, T]

    cls = xp.full((batch, 1), cls_id, dtype=xp.int32)            # [b, 1]
    tgt_teacher = xp.where(masked, xp.int32(mask_id), teacher_ids[tgt_out])  # [b, T]
    input_ids = xp.concatenate([cls, teacher_ids[src], tgt_teacher], axis=1)  # [b, 1+S+T]

    real = xp.concatenate(
        [xp.ones((batch, 1), dtype=bool), src_real, tgt_real], axis=1)        # [b, 1+S+T]
    token_type_ids = xp.concatenate(
        [xp.zeros((batch, 1 + src.shape[1]), dtype=xp.int32),
         xp.ones(tgt_out.shape, dtype=xp.int32)], axis=1)                    # [b, 1+S+T]
    # Positions count real tokens only, so the middle padding is skipped: 0 for [CLS].
    position_ids = xp.where(real, xp.cumsum(real.astype(xp.int32), axis=1) - 1, 0)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "position_ids": position_ids.astype(xp.int32),
        "attention_mask": real.astype(xp.int32),
        "labels": tgt_out,                                        # [b, T]
        "label_weights": masked.astype(xp.float32),               # [b, T]
    }


def random_target_mask(tgt_len: int, seed: int, example_index: int,
                       rate: float = DEFAULT_MASK_RATE) -> np.ndarray:
    """C-MLM training mask for one target of ``tgt_len`` positions (EOS slot included).

    Each position is masked with probability ``rate``; the draw is repeated until at
    least one position is masked. The mask depends only on ``(seed, example_index)``, so
    any host computes the same mask for the same example.

    Returns:
      ``[tgt_len]`` bool.
    """
    if tgt_len < 1:
        raise ValueError(f"random_target_mask: tgt_len must be >= 1, got {tgt_len}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"random_target_mask: rate must be in (0, 1], got {rate}")
    if seed < 0 or example_index < 0:
        raise ValueError(f"random_target_mask: seed ({seed}) and example_index "
                         f"({example_index}) must be >= 0")
    rng = np.random.default_rng([int(seed), int(example_index)])
    while True:
        mask = rng.random(tgt_len) < rate                        # [tgt_len]
        if mask.any():
            return mask


def stride_masks(tgt_len: int, stride: int = DEFAULT_STRIDE) -> np.ndarray:
    """Deterministic soft-target masks: copy ``i`` masks positions ``i, i+stride, ...``.

    Only copies that mask something are returned (``min(stride, tgt_len)`` of them), so
    every position is masked in exactly one copy.

    Returns:
      ``[num_copies, tgt_len]`` bool.
    """
    if tgt_len < 1 or stride < 1:
        raise ValueError(f"stride_masks: tgt_len ({tgt_len}) and stride ({stride}) must be >= 1")
    copies = np.arange(min(stride, tgt_len))[:, None]            # [num_copies, 1]
    positions = np.arange(tgt_len)[None, :]                      # [1, tgt_len]
    return positions % stride == copies                          # [num_copies, tgt_len]
