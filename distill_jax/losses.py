"""Training losses: label-smoothed cross-entropy and distillation from a C-MLM teacher.

Shapes used throughout:
  student logits   [batch, length, vocab]     (any float dtype; softmaxes run in >= float32)
  targets          [batch, length]            int, student ids (``tgt_out``)
  weights          [batch, length]            float, 1.0 on non-pad target tokens, 0.0 elsewhere
  teacher logits   [batch, length, K]         sparse: the teacher's raw top-K logits, with
  teacher indices  [batch, length, K]         int student ids of those K entries;
                   or [batch, length, vocab]  dense: the full distribution, indices None.

Every loss returns a SUM over weighted positions, never a mean, so that the caller can
divide by the number of target tokens counted across devices and gradient-accumulation
steps. Metrics are ``(sum, count)`` pairs for the same reason (see ``runner.add_metrics``,
which accumulates them, and ``normalize_metrics``).

Distillation modes (``T`` is the temperature, ``p`` the teacher, ``q`` the student):

  "paper"      Chen et al.'s reference: L = -sum_k p_k log q(idx_k), with
               p = softmax(teacher_logits / T) renormalised over its K entries and
               q = softmax(student_logits) at temperature 1 over the full vocabulary.
               No T^2 factor.
  "kl"         Hinton-style KL: L = T^2 * sum_k p_k (log p_k - log q_T(idx_k)), with
               p = softmax(teacher_logits / T) over its K entries and
               q_T = softmax(student_logits / T) over the full vocabulary.
  "soft_ce_t"  The same as "kl" without the teacher-entropy term:
               L = -T^2 * sum_k p_k log q_T(idx_k). Its gradient equals that of "kl".

A dense teacher is the special case K = vocab, idx = arange(vocab).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp

KD_MODES = ("paper", "kl", "soft_ce_t")

Metrics = dict[str, tuple[jax.Array, jax.Array]]


# --------------------------------------------------------------------------- checks


def _check_logits_targets(logits, targets, weights, logits_name="logits"):
    """Raises ValueError unless logits [b, t, V], targets and weights [b, t] agree."""
    if logits.ndim != 3:
        raise ValueError(f"{logits_name} must be [batch, length, vocab]; got shape {logits.shape}")
    if targets is not None and tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"targets shape {targets.shape} does not match {logits_name} "
            f"shape {logits.shape} (expected {logits.shape[:2]})"
        )
    if tuple(weights.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"weights shape {weights.shape} does not match {logits_name} "
            f"shape {logits.shape} (expected {logits.shape[:2]})"
        )


def _check_teacher(student_logits, teacher_logits, teacher_indices):
    """Raises ValueError unless the teacher arrays fit the student logits."""
    if teacher_logits.ndim != 3 or tuple(teacher_logits.shape[:2]) != tuple(
        student_logits.shape[:2]
    ):
        raise ValueError(
            f"teacher_logits shape {teacher_logits.shape} does not match student "
            f"logits shape {student_logits.shape} (expected "
            f"{tuple(student_logits.shape[:2])} + (K,) or + (vocab,))"
        )
    vocab = student_logits.shape[-1]
    if teacher_indices is None:
        if teacher_logits.shape[-1] != vocab:
            raise ValueError(
                f"teacher_logits shape {teacher_logits.shape}: a dense teacher "
                f"(teacher_indices=None) needs the student vocabulary size {vocab} "
                f"as its last dimension"
            )
        return
    if tuple(teacher_indices.shape) != tuple(teacher_logits.shape):
        raise ValueError(
            f"teacher_indices shape {teacher_indices.shape} does not match "
            f"teacher_logits shape {teacher_logits.shape}"
        )
    if not jnp.issubdtype(teacher_indices.dtype, jnp.integer):
        raise ValueError(
            f"teacher_indices must be integer student ids; got dtype {teacher_indices.dtype}"
        )
    if teacher_logits.shape[-1] > vocab:
        raise ValueError(
            f"teacher_logits shape {teacher_logits.shape}: K = "
            f"{teacher_logits.shape[-1]} exceeds the student vocabulary size {vocab}"
        )


def _check_number(name, value, low, high, low_open=False, high_open=False):
    """Returns float(value), raising ValueError when it is not a number in the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not value == value or too_low or too_high:  # value != value catches NaN
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}; got {value!r}")
    return value


def _check_mode(mode):
    if mode not in KD_MODES:
        raise ValueError(f"mode must be one of {KD_MODES}; got {mode!r}")


# --------------------------------------------------------------------------- helpers


def _as_float(x):
    """Casts to float32, or keeps a wider float (float64 in x64 tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _weighted_sum(per_token, weights):
    """sum_{b,t} weights * per_token, with non-finite values at zero-weight positions ignored.

    per_token: [batch, length]; weights: [batch, length]. Returns a scalar.
    """
    weights = weights.astype(per_token.dtype)
    return jnp.sum(jnp.where(weights != 0, per_token * weights, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def log_softmax_at(logits, indices, temperature=1.0):
    """``log_softmax(logits / T)`` over the vocabulary, read at ``indices``, and its mean
    over the vocabulary, without materialising the log-softmax.

    Args:
      logits: [batch, length, vocab] (any float dtype; computed in >= float32).
      indices: [batch, length, n] int ids in [0, vocab).
      temperature: T > 0 (a Python float).

    Returns:
      (log_p_at [batch, length, n], mean_log_p [batch, length]), float32 (or wider).

    Forward: one max and one sum of exponentials over the vocabulary (the log-sum-exp),
    a gather and a mean. Backward: with ``g_at`` and ``g_mean`` the cotangents,
    ``d/dz = scatter(g_at at indices) + g_mean / V - softmax(z) * (sum g_at + g_mean)``
    (z = logits / T), one fused pass over the logits that recomputes the softmax from the
    saved log-sum-exp, plus a scatter of n values per position. Differentiating
    ``jax.nn.log_softmax`` + ``take_along_axis`` + ``mean`` instead materialises several
    float32 [batch, length, vocab] intermediates (the log-softmax, the gather's dense
    zero-filled cotangent, the broadcast mean) on both passes; on a CPU they were a
    tenth of the student step's non-matmul time, on a GPU the loss's memory-bound share.
    """
    return _log_softmax_at_fwd(logits, indices, temperature)[0]


def _log_softmax_at_fwd(logits, indices, temperature):
    z = _as_float(logits) / temperature if temperature != 1.0 else _as_float(logits)  # [b, t, V]
    top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))  # [b, t, 1]
    lse = top + jnp.log(jnp.sum(jnp.exp(z - top), axis=-1, keepdims=True))  # [b, t, 1]
    at = jnp.take_along_axis(z, indices.astype(jnp.int32), axis=-1) - lse  # [b, t, n]
    mean = jnp.mean(z, axis=-1) - lse[..., 0]  # [b, t]
    return (at, mean), (logits, indices, lse)


def _log_softmax_at_bwd(temperature, residuals, cotangents):
    logits, indices, lse = residuals
    g_at, g_mean = cotangents  # [b, t, n], [b, t]
    z = _as_float(logits) / temperature if temperature != 1.0 else _as_float(logits)
    vocab = z.shape[-1]
    total = (jnp.sum(g_at, axis=-1) + g_mean)[..., None]  # [b, t, 1]
    dz = (g_mean[..., None] / vocab - jnp.exp(z - lse) * total).astype(g_at.dtype)  # [b, t, V]
    # n entries per position, scattered with (batch, length) as batching dimensions (the
    # vmaps), so that XLA's SPMD partitioner keeps the scatter local to each batch shard
    # (with explicit (b, t, id) coordinates it all-gathered the indices and updates).
    scatter = jax.vmap(jax.vmap(lambda row, ids, g: row.at[ids].add(g)))
    dz = scatter(dz, indices.astype(jnp.int32), g_at)  # [b, t, V]
    if temperature != 1.0:
        dz = dz / temperature
    return dz.astype(logits.dtype), None


log_softmax_at.defvjp(_log_softmax_at_fwd, _log_softmax_at_bwd)


# --------------------------------------------------------------------------- cross-entropy


def cross_entropy(logits, targets, weights, label_smoothing=0.0):
    """Label-smoothed cross-entropy, summed over weighted positions.

    With log p = log_softmax(logits) over the V vocabulary entries, eps = label_smoothing
    and y the target, each position contributes

        loss_t = (1 - eps) * (-log p_y) + eps * (1/V) * sum_v (-log p_v)

    i.e. the cross-entropy against the target distribution (1 - eps) * onehot(y) + eps / V
    (eps spread uniformly over the whole vocabulary, the target included). This is
    fairseq's original ``label_smoothed_nll_loss`` and the form used by optax/T2T. Current
    fairseq instead gives the other V - 1 classes eps / (V - 1) each and the target exactly
    1 - eps, i.e. (1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum_v(-log p_v); the two differ
    by O(eps / V) and this module implements only the first.

    Args:
      logits: [batch, length, vocab] student logits (softmax runs in >= float32).
      targets: [batch, length] int target ids.
      weights: [batch, length] float, 1.0 on real target tokens, 0.0 on padding.
      label_smoothing: eps in [0, 1).

    Returns:
      (loss_sum, nll_sum): scalars; nll_sum is the unsmoothed sum of -log p_y (for
      perplexity), loss_sum the smoothed one.
    """
    _check_logits_targets(logits, targets, weights)
    eps = _check_number("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
    log_p_y, mean_log_p = log_softmax_at(logits, targets[..., None])  # [b, t, 1], [b, t]
    return _smoothed_sums(log_p_y[..., 0], mean_log_p, weights, eps)


def _smoothed_sums(log_p_y, mean_log_p, weights, eps):
    """(smoothed loss sum, nll sum) from log p_y and mean_v log p_v, both [b, t]."""
    nll = -log_p_y  # [b, t]
    loss = (1.0 - eps) * nll + eps * (-mean_log_p)  # [b, t]
    return _weighted_sum(loss, weights), _weighted_sum(nll, weights)


# --------------------------------------------------------------------------- distillation


def _teacher_probs(teacher_logits, temperature):
    """Teacher log p and p = softmax(teacher_logits / T) over the last axis ([b, t, K])."""
    scaled = _as_float(jax.lax.stop_gradient(teacher_logits)) / temperature  # [b, t, K]
    log_p = jax.nn.log_softmax(scaled, axis=-1)  # [b, t, K]
    return log_p, jnp.exp(log_p)


def _student_log_probs_at(student_logits, teacher_indices, temperature):
    """Student log_softmax(logits / T) over the full vocabulary, gathered at the indices.

    Returns [b, t, K] (K = vocab when teacher_indices is None).
    """
    if teacher_indices is None:
        return jax.nn.log_softmax(_as_float(student_logits) / temperature, axis=-1)  # [b, t, V]
    return log_softmax_at(student_logits, teacher_indices, temperature)[0]  # [b, t, K]


def distillation_per_token(
    student_logits, teacher_logits, teacher_indices=None, *, mode="paper", temperature=10.0
):
    """The distillation loss at every position, [batch, length] (unweighted).

    See the module docstring for the three modes. Teacher entries with probability 0
    (-inf logits) contribute nothing; a NaN teacher logit gives a NaN loss at that
    position. The teacher is never differentiated.

    Args:
      student_logits: [batch, length, vocab].
      teacher_logits: [batch, length, K] raw top-K logits (sparse) or [batch, length, vocab].
      teacher_indices: [batch, length, K] int student ids, or None for a dense teacher.
      mode: "paper", "kl" or "soft_ce_t".
      temperature: T > 0.
    """
    _check_mode(mode)
    temp = _check_number(
        "temperature", temperature, 0.0, float("inf"), low_open=True, high_open=True
    )
    _check_teacher(student_logits, teacher_logits, teacher_indices)
    student_temp = 1.0 if mode == "paper" else temp
    log_q = _student_log_probs_at(student_logits, teacher_indices, student_temp)  # [b, t, K]
    return _distillation_terms(teacher_logits, log_q, mode, temp)


def _distillation_terms(teacher_logits, log_q, mode, temp):
    """Per-token distillation loss [b, t] from the teacher's logits and the student's
    log-probabilities at the same entries (both [b, t, K])."""
    log_p, p = _teacher_probs(teacher_logits, temp)  # [b, t, K]
    if mode == "paper":
        terms = -p * log_q  # [b, t, K]
    elif mode == "soft_ce_t":
        terms = -(temp**2) * p * log_q
    else:  # "kl"
        terms = (temp**2) * p * (log_p - log_q)
    terms = jnp.where(p == 0, 0.0, terms)  # 0 * log 0 = 0
    return jnp.sum(terms, axis=-1)  # [b, t]


def distillation_loss(
    student_logits, teacher_logits, teacher_indices, weights, *, mode="paper", temperature=10.0
):
    """Distillation loss summed over weighted positions (see the module docstring).

    Args:
      student_logits: [batch, length, vocab] student logits.
      teacher_logits: [batch, length, K] raw teacher top-K logits (sparse teacher) or
        [batch, length, vocab] (dense teacher).
      teacher_indices: [batch, length, K] int student ids of the K entries, or None
        for a dense teacher.
      weights: [batch, length] float, 1.0 on real target tokens, 0.0 on padding.
      mode: "paper" (default, Chen et al.), "kl" or "soft_ce_t".
      temperature: T > 0 (the reference uses 10).

    Returns:
      kd_sum: scalar, sum over positions of weights * per-token loss. Teacher values at
      zero-weight positions are ignored (they may be anything, NaN included).
    """
    _check_logits_targets(student_logits, None, weights, "student_logits")
    _check_teacher(student_logits, teacher_logits, teacher_indices)
    # whatever a cache holds at padding (even NaN) must reach neither loss nor gradient
    teacher_logits = jnp.where(weights[..., None] != 0, teacher_logits, 0)  # [b, t, K]
    per_token = distillation_per_token(
        student_logits, teacher_logits, teacher_indices, mode=mode, temperature=temperature
    )  # [b, t]
    return _weighted_sum(per_token, weights)


# --------------------------------------------------------------------------- combined


@dataclasses.dataclass(frozen=True)
class StudentLossConfig:
    """Settings of the student's combined loss (``combined_loss``)."""

    alpha: float = 0.5  # weight of the distillation term (0 = plain cross-entropy), in [0, 1]
    label_smoothing: float = 0.1  # eps of the cross-entropy term (``cross_entropy``)
    kd_mode: str = "paper"  # one of KD_MODES (``distillation_loss``'s ``mode``)
    temperature: float = 10.0  # T > 0 of the distillation term


def combined_loss(
    student_logits,
    targets,
    weights,
    settings=StudentLossConfig(),
    *,
    teacher_logits=None,
    teacher_indices=None,
):
    """The student's training loss (1 - alpha) * xe + alpha * kd, summed, with metrics.

    Without a teacher (teacher_logits None) the loss is the label-smoothed cross-entropy
    alone and alpha is ignored (but still validated).

    Args:
      student_logits: [batch, length, vocab].
      targets: [batch, length] int labels (``tgt_out``).
      weights: [batch, length] float, 1.0 on real target tokens, 0.0 on padding.
      settings: ``StudentLossConfig``: alpha, label smoothing, distillation mode and
        temperature.
      teacher_logits, teacher_indices: as in ``distillation_loss``.

    Returns:
      (total_sum, metrics): total_sum the scalar to differentiate (divide it by the
      global token count), metrics a dict of (sum, count) pairs with keys "loss", "xe"
      (smoothed), "nll", "accuracy" (argmax == target) and, with a teacher, "kd"; every
      count is sum(weights).
    """
    alpha = _check_number("alpha", settings.alpha, 0.0, 1.0)
    label_smoothing, kd_mode = settings.label_smoothing, settings.kd_mode
    temperature = settings.temperature
    if teacher_logits is None and teacher_indices is not None:
        raise ValueError("teacher_indices was given without teacher_logits")
    kd_sum = None
    if teacher_logits is not None and teacher_indices is not None and kd_mode == "paper":
        # Both terms read the same log_softmax(logits) (the paper's student is at T = 1):
        # one log-sum-exp pass, one gather of [target, the K teacher ids], and one fused
        # backward pass over the logits for the two terms together.
        _check_logits_targets(student_logits, targets, weights)
        eps = _check_number("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        temp = _check_number(
            "temperature", temperature, 0.0, float("inf"), low_open=True, high_open=True
        )
        _check_teacher(student_logits, teacher_logits, teacher_indices)
        indices = jnp.concatenate(
            [targets[..., None].astype(jnp.int32), teacher_indices.astype(jnp.int32)], axis=-1
        )  # [b, t, 1+K]
        log_p_at, mean_log_p = log_softmax_at(student_logits, indices)  # [b, t, 1+K], [b, t]
        xe_sum, nll_sum = _smoothed_sums(log_p_at[..., 0], mean_log_p, weights, eps)
        teacher_logits = jnp.where(weights[..., None] != 0, teacher_logits, 0)  # [b, t, K]
        kd_sum = _weighted_sum(
            _distillation_terms(teacher_logits, log_p_at[..., 1:], "paper", temp), weights
        )
    else:
        xe_sum, nll_sum = cross_entropy(student_logits, targets, weights, label_smoothing)
    count = jnp.sum(weights.astype(xe_sum.dtype))
    correct = (jnp.argmax(student_logits, axis=-1) == targets).astype(xe_sum.dtype)  # [b, t]
    metrics = {
        "xe": (xe_sum, count),
        "nll": (nll_sum, count),
        "accuracy": (_weighted_sum(correct, weights), count),
    }
    if teacher_logits is None:
        total = xe_sum
    else:
        if kd_sum is None:
            kd_sum = distillation_loss(
                student_logits,
                teacher_logits,
                teacher_indices,
                weights,
                mode=kd_mode,
                temperature=temperature,
            )
        total = (1.0 - alpha) * xe_sum + alpha * kd_sum
        metrics["kd"] = (kd_sum, count)
    metrics["loss"] = (total, count)
    return total, metrics


# --------------------------------------------------------------------------- metrics


def normalize_metrics(metrics: Mapping) -> dict[str, float]:
    """(sum, count) pairs → Python floats sum / count (0.0 where count is 0)."""
    out = {}
    for name, (s, c) in metrics.items():
        c = float(c)
        out[name] = float(s) / c if c != 0 else 0.0
    return out
