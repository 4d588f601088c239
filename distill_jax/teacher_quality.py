"""How good a C-MLM teacher's soft targets are: what to check before spending student runs.

With the stride masking of soft-target extraction (``teacher.stride_topk``: every target
position masked once, with the positions ``teacher.stride`` apart), over every real target
position (``</s>`` included):

* ``stride_top1``: the share of positions where the teacher's most likely piece is the
  reference;
* ``stride_topk``: the share where the reference is among its K kept pieces;
* ``stride_p_ref``: the mean probability the paper's soft target (softmax of the K kept
  logits / T) gives the reference (0 where it is not among the K).

A teacher helps a student only when it is clearly more accurate than the student itself:
compare ``stride_top1`` with the baseline student's validation ``accuracy`` (teacher-forced
next-token accuracy). ``train-teacher`` reports these figures at every validation,
``soft-targets`` prints them for the checkpoint it used, and ``scripts/teacher_quality.py``
computes them from a cached split beside the students' accuracies.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

QUALITY_KEYS = ("stride_top1", "stride_topk", "stride_p_ref")


def agreement_sums(values, ids, references, temperature: float) -> dict:
    """Sums over the real positions of a batch of soft targets.

    Args:
      values: ``[b, T, K]`` float, the kept logits (any order).
      ids: ``[b, T, K]`` int, their student ids; ``ids[..., 0]`` is the teacher's top-1.
      references: ``[b, T]`` int, the reference ids, 0 (padding) where no position is.
      temperature: the soft target's temperature.

    Returns:
      ``{"positions", "top1", "topk", "p_ref"}`` sums (float scalars). Uses numpy on numpy
      input and ``jax.numpy`` on JAX arrays (also inside ``jit``).
    """
    import jax
    import jax.numpy as jnp

    xp = jnp if any(isinstance(a, jax.Array) for a in (values, ids, references)) else np
    real = references != 0  # [b, T]
    match = (ids == references[..., None]) & real[..., None]  # [b, T, K]
    scaled = values.astype(xp.float32) / temperature
    soft = xp.exp(scaled - scaled.max(axis=-1, keepdims=True))
    soft = soft / soft.sum(axis=-1, keepdims=True)  # [b, T, K]
    return {
        "positions": real.sum().astype(xp.float32),
        "top1": match[..., 0].sum().astype(xp.float32),
        "topk": match.any(axis=-1).sum().astype(xp.float32),
        "p_ref": (soft * match).sum().astype(xp.float32),
    }


def rates(sums: dict) -> dict:
    """``agreement_sums`` totals -> ``stride_top1``, ``stride_topk``, ``stride_p_ref``."""
    positions = max(float(sums["positions"]), 1.0)
    return {
        "stride_top1": float(sums["top1"]) / positions,
        "stride_topk": float(sums["topk"]) / positions,
        "stride_p_ref": float(sums["p_ref"]) / positions,
    }


def add_sums(total: dict | None, sums: dict) -> dict:
    """Running totals of ``agreement_sums`` dicts (as host floats)."""
    sums = {k: float(v) for k, v in sums.items()}
    return sums if total is None else {k: total[k] + sums[k] for k in total}


def make_scorer(
    teacher: Any, param_shardings: Any, mesh: Any, *, stride: int, top_k: int, temperature: float
):
    """``score(params, src, tgt_out) -> agreement_sums`` jitted: the teacher's stride top-K
    soft targets of a batch compared with its references, on ``mesh``."""
    import jax

    from distill_jax import sharding
    from distill_jax.teacher import stride_topk

    rows = sharding.batch_sharding(mesh)

    def score(params, src, tgt_out):
        values, ids = stride_topk(teacher, params, src, tgt_out, stride=stride, top_k=top_k)
        return agreement_sums(values, ids, tgt_out, temperature)

    return jax.jit(score, in_shardings=(param_shardings, rows, rows))


def describe(values: dict, top_k: int, temperature: float) -> str:
    """One line: ``stride top-1 70.9%, top-8 86.3%, p(ref) at T 10 0.173``."""
    return (
        f"stride top-1 {100 * values['stride_top1']:.1f}%, top-{top_k} "
        f"{100 * values['stride_topk']:.1f}%, p(ref) at T {temperature:g} "
        f"{values['stride_p_ref']:.3f}"
    )


def logged_quality(metrics_path: Any, step: int) -> dict | None:
    """The validation record of ``step`` in a teacher run's ``metrics.jsonl`` if it has
    the stride figures (None otherwise: no such record, or a run from before they were
    measured)."""
    from distill_jax import storage

    path = storage.path(metrics_path)
    if not path.exists():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (
            record.get("split") == "valid"
            and record.get("step") == step
            and all(k in record for k in QUALITY_KEYS)
        ):
            found = record
    return found


def checkpoint_summary(teacher_dir: Any, step: int, top_k: int, temperature: float) -> str:
    """What ``soft-targets`` prints about the teacher checkpoint it used: its validation
    figures from the teacher run's log, or why there are none."""
    from distill_jax import storage

    record = logged_quality(storage.path(teacher_dir) / "metrics.jsonl", step)
    if record is None:
        return (
            f"teacher quality: no validation record with stride figures at step {step} "
            f"(validations run every teacher.eval_every steps)"
        )
    line = f"teacher quality at step {step} on validation: " + describe(record, top_k, temperature)
    if "masked_accuracy" in record:
        line += f", masked accuracy {100 * record['masked_accuracy']:.1f}%"
    return line + " (compare stride top-1 with the baseline student's validation accuracy)"
