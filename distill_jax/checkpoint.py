"""Orbax checkpoints of the train state: async saves, retention, restore onto any mesh,
and averaging of the last N checkpoints.

A checkpoint step holds two items: ``state`` (the ``TrainState`` pytree, written by each
process for its own shards) and ``extra`` (a JSON-able dict: data-iterator position,
config, anything the loop needs to resume). Restoring takes an abstract state whose
leaves are ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` built for the *new*
mesh (``sharding.abstract_with_shardings``), so a checkpoint written on one mesh is read
straight onto another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_preservation

from distill_jax import storage
from distill_jax.errors import UserError

STATE = "state"
EXTRA = "extra"
BEST_MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often checkpoints are written, and which are kept."""

    directory: str  # checkpoint root folder (one sub-folder per step), local or gs://
    save_every: int = 1000  # save when step % save_every == 0
    keep_last: int = 3  # the most recent checkpoints kept
    best_metric: str | None = None  # a metric name passed to save(); keeps the best one
    best_mode: str = "min"  # "min" or "max": which value of best_metric is best
    keep_best: int = 1  # how many best-by-metric checkpoints are kept besides the last ones
    async_save: bool = True  # write in a background thread (call wait() before reading)

    def __post_init__(self):
        if self.save_every < 1 or self.keep_last < 1 or self.keep_best < 0:
            raise ValueError(
                f"save_every ({self.save_every}) and keep_last ({self.keep_last}) must be >= 1 "
                f"and keep_best ({self.keep_best}) >= 0"
            )
        if self.best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be one of {BEST_MODES}, got {self.best_mode!r}")


def _metric_getter(name: str):
    """metrics dict -> float value of ``name``."""
    return lambda metrics: float(metrics[name])


def _preservation_policy(cfg: CheckpointConfig):
    """Keep the last ``keep_last`` steps, plus the ``keep_best`` best by ``best_metric``."""
    policies = [ocp_preservation.LatestN(n=cfg.keep_last)]
    if cfg.best_metric is not None and cfg.keep_best > 0:
        metric = cfg.best_metric
        policies.append(
            ocp_preservation.BestN(
                get_metric_fn=_metric_getter(metric),
                reverse=cfg.best_mode == "min",
                n=cfg.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    return ocp_preservation.AnyPreservationPolicy(policies)


class Checkpointer:
    """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` (use as a context
    manager, or call ``close()``)."""

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=cfg.save_every,
            preservation_policy=_preservation_policy(cfg),
            # Orbax writes the per-step metrics only when it has a best_fn.
            best_fn=None if cfg.best_metric is None else _metric_getter(cfg.best_metric),
            best_mode=cfg.best_mode,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        directory = storage.path(cfg.directory)
        self._manager = ocp.CheckpointManager(
            directory if storage.is_remote(directory) else directory.absolute(),
            options=options,
            item_names=(STATE, EXTRA),
        )

    def save(
        self,
        step: int,
        state: Any,
        *,
        extra: Mapping | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (and the JSON-able ``extra``) at ``step`` if ``step`` is due
        (or ``force``). ``metrics`` (floats) feed the keep-best policy. Returns whether a
        save was started."""
        if (
            self.cfg.best_metric is not None
            and metrics is not None
            and self.cfg.best_metric not in metrics
        ):
            raise ValueError(
                f"metrics {sorted(metrics)} lack the best_metric {self.cfg.best_metric!r}"
            )
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                EXTRA: ocp.args.JsonSave(dict(extra or {})),
            }
        )
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self._manager.save(step, args=args, metrics=metrics, force=force)

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` among the kept checkpoints (None without one)."""
        if self.cfg.best_metric is None:
            return None
        scored = [(m[self.cfg.best_metric], s) for s, m in self._metrics().items()]
        if not scored:
            return None
        pick = min if self.cfg.best_mode == "min" else max
        return pick(scored)[1]

    def _metrics(self) -> dict[int, dict]:
        out = {}
        for step in self.all_steps():
            metrics = self._manager.metrics(step)
            if metrics and self.cfg.best_metric in metrics:
                out[step] = metrics
        return out

    def step_directory(self, step: int):
        """The folder of checkpoint ``step`` (Orbax names it by the step number)."""
        return storage.path(self.cfg.directory) / str(step)

    def fingerprint(self, step: int) -> str:
        """A sha256 (hex) that identifies checkpoint ``step`` by what was recorded when it
        was saved: the step, its validation metrics and its ``extra`` item (the data
        position). Cheap (two small JSON files; the same on ``gs://``) and the same for a
        run that was interrupted and resumed as for an uninterrupted one, because both are
        (resume is exact); a checkpoint of another training run at the same step differs
        in its validation metrics. It does not hash the parameter bytes."""
        metrics = self._manager.metrics(step) if self.cfg.best_metric is not None else None
        extra = self._guarded(
            step,
            lambda: self._manager.restore(
                step, args=ocp.args.Composite(**{EXTRA: ocp.args.JsonRestore()})
            )[EXTRA],
        )
        payload = json.dumps(
            {"step": int(step), "metrics": metrics or {}, "extra": dict(extra or {})},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def _guarded(self, step: int, read):
        """``read()``, with a damaged checkpoint (an emptied or cut JSON metadata file, a
        missing or truncated array file) reported as a ``UserError`` naming its folder
        (and the metadata file that does not parse)."""
        try:
            return read()
        except Exception as err:  # noqa: BLE001 (only storage damage is translated below)
            chain, cause = [], err
            while cause is not None and len(chain) < 16:
                chain.append(cause)
                cause = cause.__cause__ or cause.__context__
            folder = self.step_directory(step)
            advice = (
                "; remove that step's folder to fall back on the checkpoint before it, or "
                "rerun from scratch"
            )
            if any(isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)) for e in chain):
                bad = _unparsable_json(folder)
                what = (
                    f"{', '.join(map(str, bad))} is not valid JSON"
                    if bad
                    else "a metadata file is not valid JSON"
                )
                raise UserError(f"checkpoint {folder} is damaged: {what}{advice}") from None
            damage = next(
                (
                    e
                    for e in chain
                    if isinstance(e, FileNotFoundError)
                    or any(code in str(e) for code in ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND"))
                ),
                None,
            )
            if damage is None:
                raise
            raise UserError(
                f"checkpoint {folder} is damaged or incomplete: "
                f"{str(damage).splitlines()[0][:300]}{advice}"
            ) from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """``(state, extra)`` of ``step``, laid out as the shardings in ``abstract_state``.
        A damaged checkpoint is refused with a ``UserError`` naming its folder."""
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardRestore(abstract_state),
                EXTRA: ocp.args.JsonRestore(),
            }
        )
        restored = self._guarded(step, lambda: self._manager.restore(step, args=args))
        return restored[STATE], dict(restored[EXTRA] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """``restore`` of the latest step, or None when there is no checkpoint."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_state)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unparsable_json(folder) -> list:
    """The JSON metadata files of a checkpoint step folder that do not parse."""
    bad = []
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "extra/metadata", "metrics/metrics"):
        file = storage.path(folder) / name
        try:
            if file.exists():
                json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError):
            bad.append(file)
    return bad


def average_checkpoints(directory: str, last_n: int, abstract_state: Any) -> Any:
    """Float32 mean of the ``params`` of the last ``last_n`` checkpoints in ``directory``.

    ``abstract_state`` is the abstract ``TrainState`` (with shardings) to restore into;
    returns a params tree with the same shardings. Non-float leaves come from the latest.
    """
    if last_n < 1:
        raise ValueError(f"last_n must be >= 1, got {last_n}")
    manager = Checkpointer(CheckpointConfig(directory, keep_last=10**9, async_save=False))
    try:
        steps = manager.all_steps()
        if len(steps) < last_n:
            raise ValueError(
                f"asked to average the last {last_n} checkpoints but {directory} has "
                f"{len(steps)} ({steps})"
            )
        total = None
        for step in steps[-last_n:]:
            params = manager.restore(step, abstract_state)[0].params
            params32 = jax.tree.map(
                lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                params,
            )
            total = (
                params32
                if total is None
                else jax.tree.map(
                    lambda a, b: a + b if jnp.issubdtype(a.dtype, jnp.floating) else b,
                    total,
                    params32,
                )
            )
    finally:
        manager.close()
    return jax.tree.map(lambda x: x / last_n if jnp.issubdtype(x.dtype, jnp.floating) else x, total)
