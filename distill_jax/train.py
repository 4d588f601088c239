"""Train state, the jitted train / eval steps, and the teacher and student objectives.

A loss function has the signature ``loss_fn(params, batch, rng) -> (loss_sum, metrics)``:
``loss_sum`` is a scalar SUM over target tokens, ``metrics`` a dict of ``(sum, count)``
pairs whose ``metrics["loss"][1]`` is the number of tokens the loss was summed over;
``rng`` is a dropout key, or ``None`` for a deterministic (evaluation) pass.

``make_train_step`` turns it into ONE ``jax.jit`` with explicit input/output shardings
and a donated state. Gradients of the summed loss are accumulated over micro-batches and
divided by the global token count at the end, so splitting a batch into micro-batches
changes nothing but floating-point rounding, and every mesh shape computes the same
update. Dropout keys come from ``fold_in(fold_in(rng, step), micro_batch)``, which does
not depend on the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_jax import losses
from distill_jax.data.cmlm import build_cmlm_inputs, masked_positions
from distill_jax.losses import StudentLossConfig
from distill_jax.sharding import BATCH_AXES, LOGICAL_AXIS_RULES, Rules, logical_context

Batch = Mapping[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, Metrics]]
# An online teacher: (student batch, frozen teacher params) -> (teacher_logits,
# teacher_indices or None).
TeacherFn = Callable[[Batch, Any], tuple[jax.Array, jax.Array | None]]


class TrainState(struct.PyTreeNode):
    """Everything a train step updates: the update counter, parameters, optimizer state."""

    step: jax.Array  # int32 scalar, number of updates applied
    params: Any  # float32 parameter tree (master weights)
    opt_state: Any  # optax state of ``params``

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> TrainState:
        """A fresh state at step 0 (call it inside the init function of
        ``sharding.create_sharded_state`` so that it is born sharded)."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Casts the float32 leaves of ``tree`` to ``dtype`` (others unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, tree)


def split_micro_batches(batch: Batch, accum_steps: int) -> dict[str, jax.Array]:
    """``[B, ...]`` arrays -> ``[accum_steps, B / accum_steps, ...]``.

    Micro-batch ``j`` takes rows ``j, j + accum_steps, ...``, so each device's
    contiguous block of rows contributes equally to every micro-batch (no resharding).
    """
    out = {}
    for key, value in batch.items():
        rows = value.shape[0]
        if rows % accum_steps:
            raise ValueError(
                f"batch entry {key!r} has {rows} rows, not divisible by accum_steps={accum_steps}"
            )
        value = value.reshape((rows // accum_steps, accum_steps) + value.shape[1:])
        out[key] = jnp.swapaxes(value, 0, 1)  # [accum, B / accum, ...]
    return out


def _zeros_like_metrics(metrics_shape: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)


def _check_metrics(metrics: Mapping) -> None:
    if "loss" not in metrics:
        raise ValueError(
            f"loss_fn metrics must contain 'loss' = (sum, token count); got keys {sorted(metrics)}"
        )


def accumulate_gradients(
    loss_fn: LossFn,
    params: Any,
    batch: Batch,
    rng: jax.Array,
    accum_steps: int,
    compute_dtype: Any,
    mesh: Mesh,
) -> tuple[Any, Metrics]:
    """Gradients of the SUMMED loss and summed metrics over ``accum_steps`` micro-batches."""

    def summed_loss(p, micro_batch, micro_rng):
        return loss_fn(cast_floats(p, compute_dtype), micro_batch, micro_rng)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
    if accum_steps == 1:
        (_, metrics), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0))
        _check_metrics(metrics)
        return grads, metrics

    micro_batches = split_micro_batches(batch, accum_steps)
    micro_batches = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
        ),
        micro_batches,
    )
    first = jax.tree.map(lambda x: x[0], micro_batches)
    metrics_shape = jax.eval_shape(lambda: summed_loss(params, first, rng)[1])
    _check_metrics(metrics_shape)

    def body(carry, inputs):
        grads_acc, metrics_acc = carry
        index, micro_batch = inputs
        (_, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
        return (grads_acc, metrics_acc), None

    init = (jax.tree.map(jnp.zeros_like, params), _zeros_like_metrics(metrics_shape))
    (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro_batches))
    return grads, metrics


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How ``make_train_step`` computes an update (not what it optimises)."""

    accum_steps: int = 1  # micro-batches per update (gradients summed over them)
    compute_dtype: Any = jnp.float32  # activations' dtype (parameters stay float32)
    rules: Rules = LOGICAL_AXIS_RULES  # logical -> mesh axes of the activation constraints
    # XLA options of the step; None: the platform's choice,
    # ``donated_state_compiler_options(mesh)`` (an experiment's ``runtime`` section sets it)
    compiler_options: Mapping[str, Any] | None = None


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: Any,
    batch_shardings: Any,
    *,
    options: StepOptions = StepOptions(),
    frozen_shardings: Any = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """``train_step(state, batch, rng) -> (new_state, metrics)``, one jitted function.

    ``rng`` is the base dropout key (the same every step; the step number is folded in).
    ``state`` is donated. ``metrics`` are the summed ``(sum, count)`` pairs of the whole
    batch plus ``grad_norm`` (the global norm of the normalised gradient, count 1).
    ``options``: micro-batches, compute dtype, axis rules and XLA options (``StepOptions``).

    With ``frozen_shardings`` (e.g. an online teacher's parameters), the step is
    ``train_step(state, batch, rng, frozen)``: ``frozen`` is a step input laid out as
    ``frozen_shardings``, passed to ``loss_fn(params, batch, rng, frozen)`` and never
    updated (nor baked into the compiled program as a constant).
    """
    accum_steps, compute_dtype = options.accum_steps, options.compute_dtype
    compiler_options = options.compiler_options
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None):
        objective = (
            loss_fn
            if frozen_shardings is None
            else (lambda p, b, r: loss_fn(p, b, r, cast_floats(frozen, compute_dtype)))
        )
        with logical_context(mesh, options.rules):
            step_rng = jax.random.fold_in(rng, state.step)
            grads, metrics = accumulate_gradients(
                objective, state.params, batch, step_rng, accum_steps, compute_dtype, mesh
            )
            tokens = metrics["loss"][1]
            grads = jax.tree.map(lambda g: g / jnp.maximum(tokens, 1.0), grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = dict(metrics)
            metrics["grad_norm"] = (optax.global_norm(grads), jnp.ones((), jnp.float32))
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    in_shardings = (state_shardings, batch_shardings, replicated)
    if frozen_shardings is not None:
        in_shardings += (frozen_shardings,)
    return jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=dict(
            donated_state_compiler_options(mesh) if compiler_options is None else compiler_options
        ),
    )


def donated_state_compiler_options(mesh: Mesh, cpu_region_analysis: bool = True) -> dict[str, Any]:
    """XLA options for a step that updates a donated state in place (``runtime.
    cpu_copy_region_analysis`` of an experiment is ``cpu_region_analysis``).

    On CPUs: copy insertion with region analysis (``xla_cpu_copy_insertion_use_region_analysis``,
    the default of XLA's GPU compiler). Without it XLA's CPU compiler copies every
    parameter that the step both reads (forward and backward) and overwrites (the
    update) before using it: 156 copies, 176 MB per step for the reference student, which
    region analysis proves unnecessary. Other platforms: no options.
    """
    if mesh.devices.flat[0].platform == "cpu" and cpu_region_analysis:
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return {}


def make_eval_step(
    loss_fn: LossFn,
    mesh: Mesh,
    param_shardings: Any,
    batch_shardings: Any,
    *,
    compute_dtype: Any = jnp.float32,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> Callable[[Any, Batch], Metrics]:
    """``eval_step(params, batch) -> metrics`` (deterministic, no gradients), jitted."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(params, batch):
        with logical_context(mesh, rules):
            _, metrics = loss_fn(cast_floats(params, compute_dtype), batch, None)
        _check_metrics(metrics)
        return metrics

    return jax.jit(step, in_shardings=(param_shardings, batch_shardings), out_shardings=replicated)


def _dropout(rng: jax.Array | None) -> tuple[bool, dict]:
    """(deterministic, rngs) for ``Module.apply`` from an optional dropout key."""
    return (True, {}) if rng is None else (False, {"dropout": rng})


def _require(batch: Batch, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{what} needs batch keys {missing}; the batch has {sorted(batch)}")


# Where the C-MLM objective runs the teacher's output layer (see ``cmlm_loss_fn``).
CMLM_HEAD_POSITIONS = ("masked", "all")
# The C-MLM objective's ``combined_loss`` settings: cross-entropy without label smoothing
# (no teacher, so alpha and the distillation settings are not used).
NO_SMOOTHING = StudentLossConfig(label_smoothing=0.0)
STUDENT_LOSS = StudentLossConfig()  # the student's default loss settings


def cmlm_loss_fn(
    teacher_model: nn.Module,
    teacher_ids: Any,
    *,
    cls_id: int,
    mask_id: int,
    head_positions: str = "masked",
) -> LossFn:
    """The teacher's C-MLM objective on a student batch (``src``, ``tgt_out``, ``mlm_mask``,
    optionally ``mlm_positions``).

    Builds ``[CLS] src [SEP] tgt [SEP]`` teacher inputs with the masked target positions
    replaced by ``[MASK]`` (``data.cmlm.build_cmlm_inputs``) and sums the cross-entropy
    of the C-MLM head (over the student vocabulary) on masked, non-pad target positions.
    Metrics: ``loss``, ``xe``, ``nll``, ``accuracy`` (counts = masked tokens).

    ``head_positions`` says where the output layer (hidden -> student vocabulary, the
    largest product of the step after the encoder) runs:

    * ``"masked"``: only at the masked target positions. The pipeline's batches carry them
      as ``mlm_positions`` (``[b, M]``, ``M = data.cmlm.masked_capacity(T, rate)``, about a
      third of ``T`` at rate 0.15); without that key they are derived from ``mlm_mask``
      with ``M = T``. BERT's last layer then computes only those rows (their queries
      attend over all keys; ``BertModel(output_positions=...)``), and the head runs on
      them. Rows are gathered along the length (``take_along_axis``), so every batch row
      stays on its device.
    * ``"all"``: every position of the input, source included, through the last layer and
      the head, then the target part is sliced off: the plain form, kept as the reference
      that tests compare against.

    Both give the same loss and gradients up to float32 rounding. With dropout they draw
    the same masks except in the last layer (other shapes there), so equal in distribution.
    """
    if head_positions not in CMLM_HEAD_POSITIONS:
        raise ValueError(
            f"head_positions must be one of {CMLM_HEAD_POSITIONS}, got {head_positions!r}"
        )
    teacher_ids = np.asarray(teacher_ids, np.int32)
    head = lambda module, hidden: module.cmlm_head(hidden)  # noqa: E731

    def loss_fn(params, batch, rng):
        _require(batch, ("src", "tgt_out", "mlm_mask"), "the C-MLM teacher loss")
        inputs = build_cmlm_inputs(
            batch["src"],
            batch["tgt_out"],
            jnp.asarray(teacher_ids),
            batch["mlm_mask"],
            cls_id=cls_id,
            mask_id=mask_id,
        )
        deterministic, rngs = _dropout(rng)
        args = (
            inputs["input_ids"],
            inputs["token_type_ids"],
            inputs["attention_mask"],
            inputs["position_ids"],
        )
        start = 1 + batch["src"].shape[1]  # the first target position of the input
        if head_positions == "all":
            logits = teacher_model.apply(
                {"params": params},
                *args,
                deterministic=deterministic,
                method="cmlm_logits",
                rngs=rngs,
            )  # [b, 1+S+T, student vocab]
            return losses.combined_loss(
                logits[:, start:], inputs["labels"], inputs["label_weights"], NO_SMOOTHING
            )
        positions = batch.get("mlm_positions")  # [b, M] target positions, -1 = none
        if positions is None:
            positions = masked_positions(
                inputs["label_weights"] > 0, inputs["labels"].shape[1]
            )  # [b, T]
        picked = jnp.maximum(positions, 0)  # [b, M]
        hidden = teacher_model.apply(
            {"params": params},
            *args,
            deterministic=deterministic,
            output_positions=start + picked,
            rngs=rngs,
        )  # [b, M, H]
        logits = teacher_model.apply({"params": params}, hidden, method=head)  # [b, M, V]
        labels = jnp.take_along_axis(inputs["labels"], picked, axis=1)  # [b, M]
        weights = jnp.where(
            positions >= 0, jnp.take_along_axis(inputs["label_weights"], picked, axis=1), 0.0
        )  # [b, M]
        return losses.combined_loss(logits, labels, weights, NO_SMOOTHING)

    return loss_fn


def student_loss_fn(
    student_model: nn.Module,
    settings: StudentLossConfig = STUDENT_LOSS,
    teacher: TeacherFn | None = None,
) -> LossFn:
    """The student's objective on a student batch (``src``, ``tgt_in``, ``tgt_out``).

    Soft targets come from ``teacher(batch, teacher_params)`` (online; no gradient flows
    into it) if given -- the loss is then ``loss_fn(params, batch, rng, teacher_params)``,
    for ``make_train_step(..., frozen_shardings=...)`` -- else from the batch's offline
    ``kd_logits`` / ``kd_indices`` if present; without either, the loss is label-smoothed
    cross-entropy.
    """

    def loss_fn(params, batch, rng, teacher_params=None):
        _require(batch, ("src", "tgt_in", "tgt_out"), "the student loss")
        deterministic, rngs = _dropout(rng)
        logits = student_model.apply(
            {"params": params},
            batch["src"],
            batch["tgt_in"],
            deterministic=deterministic,
            rngs=rngs,
        )  # [b, T, V]
        if teacher is not None:
            teacher_logits, teacher_indices = jax.lax.stop_gradient(teacher(batch, teacher_params))
        else:
            teacher_logits, teacher_indices = batch.get("kd_logits"), batch.get("kd_indices")
        weights = (batch["tgt_out"] != 0).astype(jnp.float32)  # [b, T]
        return losses.combined_loss(
            logits,
            batch["tgt_out"],
            weights,
            settings,
            teacher_logits=teacher_logits,
            teacher_indices=teacher_indices,
        )

    return loss_fn
