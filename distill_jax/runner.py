"""What training and decoding runs share: the work directory, the config check on resume,
metrics logging, progress bars, and the resumable training loop.

Only process 0 writes logs, metrics and progress bars; every process takes part in the
jitted steps and in Orbax's (collective) checkpoint saves and restores.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from distill_jax import configlib, storage
from distill_jax.errors import UserError
from distill_jax.experiment import ExperimentConfig

logger = logging.getLogger("distill_jax")

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_chief() -> bool:
    return jax.process_index() == 0


def check_or_save_config(config: Any, path: storage.PathLike, *, what: str) -> None:
    """Saves ``config`` at ``path`` (local or ``gs://``) on the first run; refuses to resume
    ``what`` with a different config (the differing fields are named)."""
    path = storage.path(path)
    current = configlib.to_dict(config)
    if path.exists():
        saved = json.loads(path.read_text())
        changed = configlib.diff(saved, current, defaults=configlib.declared_defaults(config))
        if changed:
            raise UserError(
                f"{path.parent} holds a {what} run with another config; changed fields: "
                + "; ".join(changed) + ". Use another --workdir (or name) or remove it.")
        return
    if is_chief():
        storage.write_text_atomic(path, json.dumps(current, indent=2, sort_keys=True))


def prepared_dir(config: ExperimentConfig, workdir: storage.PathLike):
    """The prepared dataset of a run: ``data.prepared``, else ``WORKDIR/data``. It must be
    local: its array_record files are read through grain / ``tfds.data_source``, which
    open local files only."""
    where = config.data.prepared if config.data.prepared else storage.path(workdir) / "data"
    return storage.require_local(
        where, "the prepared dataset",
        "copy it to local disk on every host (e.g. `gcloud storage cp -r "
        f"{where} ~/data/`, or run `distill-jax prepare` on every host: it is deterministic) "
        "and point data.prepared at the copy (--set data.prepared=PATH)")


def compute_dtype(config: ExperimentConfig):
    try:
        return COMPUTE_DTYPES[config.train.compute_dtype]
    except KeyError:
        raise UserError(f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got "
                        f"{config.train.compute_dtype!r}") from None


def data_shards(mesh) -> int:
    """How many ways the batch dimension is split (data * fsdp)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """Appends metrics records to ``metrics.jsonl`` (and TensorBoard when tensorboardX is
    installed); only process 0 writes."""

    def __init__(self, directory: storage.PathLike):
        directory = storage.path(directory)
        self.path = directory / "metrics.jsonl"
        self._lines = storage.LineLog(self.path)
        self.enabled = is_chief()
        self._tb = None
        if self.enabled and not storage.is_remote(directory):
            # (TensorBoard event files are written for local directories only.)
            storage.makedirs(directory)
            try:
                from tensorboardX import SummaryWriter  # optional
                self._tb = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": time.time(),
                  **{k: float(v) for k, v in values.items()}}
        self._lines.append(json.dumps(record))
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (left by a run killed after its last checkpoint), so a
        resumed run's log reads as one run."""
        if not self.enabled or not self.path.exists():
            return
        self._lines.replace([line for line in self._lines.lines()
                             if json.loads(line)["step"] <= step])


def add_metrics(total: Optional[dict], metrics: Mapping[str, Any]) -> dict:
    """Accumulates (sum, count) pairs on the host."""
    metrics = jax.device_get(dict(metrics))
    if total is None:
        return {k: (float(s), float(c)) for k, (s, c) in metrics.items()}
    return {k: (total[k][0] + float(s), total[k][1] + float(c)) for k, (s, c) in metrics.items()}


def progress(total: int, initial: int, desc: str, disable: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=disable or not is_chief(), file=sys.stderr, smoothing=0.1)


# ----------------------------------------------------------------------------- the loop


def resume(checkpoints: Any, state: Any, shardings: Any, batches: Any, log: MetricsLog) -> Any:
    """Restores the latest checkpoint, if any, onto ``shardings`` (any mesh): the state,
    the data iterator's position and a metrics log without the steps after it."""
    from distill_jax import sharding

    latest = checkpoints.latest_step()
    if latest is None:
        return state
    state, extra = checkpoints.restore(latest, sharding.abstract_with_shardings(state, shardings))
    batches.set_state(extra["data"])
    log.truncate_after(latest)
    return state


def evaluate_split(eval_step: Callable, params: Any, pipeline: Any,
                   to_device: Callable[[dict], dict]) -> dict:
    """(sum, count) metrics of ``eval_step`` over one pass of ``pipeline``, on the host."""
    total = None
    for i in range(pipeline.batches_per_epoch):
        total = add_metrics(total, eval_step(params, to_device(pipeline.load_batch(i))))
    return total


def train_loop(
    *,
    state: Any,
    train_step: Callable[[Any, dict, jax.Array], tuple[Any, dict]],
    batches: Iterator[dict],
    to_device: Callable[[dict], dict],
    total_steps: int,
    rng: jax.Array,
    checkpoints: Any,
    data_state: Callable[[], dict],
    log: MetricsLog,
    evaluate: Optional[Callable[[Any, int], dict[str, float]]],
    eval_every: int,
    save_every: int,
    desc: str,
    no_progress: bool,
    log_every: int = 10,
) -> Any:
    """Runs ``train_step`` from ``state.step`` up to ``total_steps``.

    Every ``save_every`` steps (and at the end) the state and ``data_state()`` are
    checkpointed; every ``eval_every`` steps ``evaluate(state, step)`` is logged and, when
    it falls on a checkpoint step, handed to the checkpoint manager, which keeps the best
    checkpoint by its configured metric. Training metrics are logged every ``log_every`` steps.
    """
    start = int(jax.device_get(state.step))
    bar = progress(total_steps, start, desc, no_progress)
    window: Optional[dict] = None
    tokens_since, time_since = 0.0, time.perf_counter()
    step = start
    while step < total_steps:
        batch = next(batches)
        state, metrics = train_step(state, to_device(batch), rng)
        step += 1
        window = add_metrics(window, metrics)
        tokens_since += float(np.count_nonzero(batch["tgt_out"]))
        if step % log_every == 0 or step == total_steps:
            values = {k: s / max(c, 1e-9) for k, (s, c) in window.items()}
            elapsed = time.perf_counter() - time_since
            values["target_tokens_per_s"] = tokens_since * jax.process_count() / max(elapsed, 1e-9)
            log.write(step, "train", values)
            bar.set_postfix(loss=f"{values['loss']:.3f}",
                            tok_s=f"{values['target_tokens_per_s']:.0f}")
            window, tokens_since, time_since = None, 0.0, time.perf_counter()
        bar.update(1)
        eval_values = None
        if evaluate is not None and (step % eval_every == 0 or step == total_steps):
            eval_values = evaluate(state, step)
            log.write(step, "valid", eval_values)
            if is_chief():
                bar.write(f"[{desc}] step {step}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in eval_values.items()))
        preempted = jax.process_count() > 1 and \
            multihost_utils.reached_preemption_sync_point(step)
        if step % save_every == 0 or step == total_steps or preempted:
            # Validation metrics (when this step has them) feed the keep-best policy.
            checkpoints.save(step, state, extra={"data": data_state()},
                             metrics=eval_values, force=True)
        if preempted:
            # SIGTERM (TPU maintenance, scancel) reached every process at this step: the
            # checkpoint above lets the rerun resume exactly here.
            logger.warning("preemption notice at step %d: checkpointed, stopping", step)
            break
    bar.close()
    checkpoints.wait()
    return state
