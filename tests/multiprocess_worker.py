"""The program every process of the multi-process tests runs (see test_multiprocess.py).

Started by ``distill_jax.launch`` (N processes, the DISTILL_JAX_* variables set) or
directly (one process). It trains a tiny Transformer student with offline top-K teacher
logits on a synthetic dataset read through ``BatchPipeline`` (each process reads its own
rows of every global batch) and writes what the test compares to ``--out``:

  train_DxFxT.npz    per mesh of ``--train``: the loss, token count and gradient norm of
                     every step, the global record indices of every batch and the final
                     parameters; with ``--save-at K`` (first mesh only) also the parameters
                     and data-iterator state at step K, when a checkpoint is written
  restore_DxFxT.npz  with ``--restore-from``: the parameters and data-iterator state read
                     from the checkpoint, then the same for the steps trained after it
  done_P.json        every process: its view of the losses (the same in all processes)

Only process 0 writes the ``.npz`` files; all processes take part in every step,
gather and checkpoint operation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax import checkpoint, sharding, train
from distill_jax.commands import common
from distill_jax.data.pipeline import BatchPipeline, PipelineConfig

import tiny_models

VOCAB = 64
NUM_RECORDS = 44  # 3 global batches of 16 rows per epoch, the last one with 4 empty rows
TOP_K = 4
KEYS = ("src", "tgt_in", "tgt_out", "kd_logits", "kd_indices")
PIPELINE = PipelineConfig(
    seed=3,
    shuffle=True,
    tokens_per_batch=128,
    batch_multiple=8,
    bucket_step=8,
    num_threads=1,
    prefetch=2,
)


class SyntheticSource:
    """``NUM_RECORDS`` random (source, target) pairs, a function of the record index only.

    ``src`` ends in ``</s>`` (2); ``tgt`` holds the target pieces (the pipeline adds
    ``<s>`` / ``</s>``). Lengths stay within one 8 x 8 bucket.
    """

    def __init__(self):
        self.records = []
        for i in range(NUM_RECORDS):
            rng = np.random.default_rng([11, i])
            src = np.append(rng.integers(4, VOCAB, int(rng.integers(1, 8))), 2).astype(np.int32)
            tgt = rng.integers(4, VOCAB, int(rng.integers(1, 8))).astype(np.int32)
            self.records.append({"src": src, "tgt": tgt})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]

    def __getitems__(self, indices) -> list[dict]:
        return [self.records[i] for i in indices]

    def lengths(self) -> np.ndarray:
        """[n, 2] source / target lengths, ``</s>`` included (as prepared datasets store)."""
        return np.array([[len(r["src"]), len(r["tgt"]) + 1] for r in self.records], np.int32)


def with_soft_targets(batch: dict) -> dict:
    """Adds offline top-K teacher logits ``[rows, T, K]``, a function of the record index
    (as a soft-target cache would give them); zeros on filler rows and padding."""
    rows, tgt_len = batch["tgt_out"].shape
    logits = np.zeros((rows, tgt_len, TOP_K), np.float32)  # [rows, T, K]
    indices = np.zeros((rows, tgt_len, TOP_K), np.int32)  # [rows, T, K]
    for row, record in enumerate(batch["index"]):
        if record < 0:
            continue
        rng = np.random.default_rng([13, int(record)])
        length = int(np.count_nonzero(batch["tgt_out"][row]))
        logits[row, :length] = 3.0 * rng.normal(size=(length, TOP_K))
        indices[row, :length] = np.stack(
            [rng.choice(VOCAB, TOP_K, replace=False) for _ in range(length)]
        )
    return {**batch, "kd_logits": logits, "kd_indices": indices}


def mesh_name(shape) -> str:
    return "x".join(str(s) for s in shape)


def parse_mesh(text: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in text.split(","))
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"a mesh is data,fsdp,tensor; got {text!r}")
    return shape


def to_host(tree, mesh):
    """Numpy copies of a (possibly multi-process sharded) tree: replicated first."""
    replicated = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), replicated)


def gather_rows(local: np.ndarray, mesh) -> np.ndarray:
    """The global batch of a per-host array, rows in process order."""
    global_array = sharding.shard_batch({"x": local}, mesh)["x"]
    return to_host(global_array, mesh)


def flat_params(params) -> dict[str, np.ndarray]:
    return {
        "param" + jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


class Trainer:
    """A fresh sharded student state on ``mesh``, its train step and a data iterator."""

    def __init__(self, shape):
        self.shape = shape
        self.mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
        # a 1+1-layer width-32 student with dropout
        loss_fn, init_params, optimizer = tiny_models.student_setup(VOCAB, (1, 1))
        self.state, self.shardings = sharding.create_sharded_state(
            lambda: train.TrainState.create(init_params(), optimizer), self.mesh
        )
        self.step_fn = train.make_train_step(
            loss_fn,
            optimizer,
            self.mesh,
            self.shardings,
            {k: sharding.batch_sharding(self.mesh) for k in KEYS},
        )
        source = SyntheticSource()
        self.pipeline = BatchPipeline(source, source.lengths(), PIPELINE)
        self.batches = iter(self.pipeline)
        self.rng = jax.random.PRNGKey(42)
        self.record: dict[str, list] = {
            "loss_sum": [],
            "tokens": [],
            "grad_norm": [],
            "indices": [],
        }

    def train(self, steps: int, print_steps: bool = False) -> None:
        for _ in range(steps):
            batch = with_soft_targets(next(self.batches))
            global_batch = sharding.shard_batch({k: batch[k] for k in KEYS}, self.mesh)
            self.state, metrics = self.step_fn(self.state, global_batch, self.rng)
            self.record["loss_sum"].append(float(metrics["loss"][0]))
            self.record["tokens"].append(float(metrics["loss"][1]))
            self.record["grad_norm"].append(float(metrics["grad_norm"][0]))
            self.record["indices"].append(gather_rows(batch["index"], self.mesh))
            if print_steps:
                print(f"STEP {len(self.record['loss_sum'])}", flush=True)

    def params(self) -> dict[str, np.ndarray]:
        return flat_params(to_host(self.state.params, self.mesh))

    def results(self) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v) for k, v in self.record.items()}
        out["step"] = np.asarray(int(jax.device_get(self.state.step)))
        return {**out, **self.params()}


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: Path, trainer: Trainer) -> None:
    """Writes the train state and the data-iterator state at the current step (an
    asynchronous save, as in training, waited for before returning)."""
    step = int(jax.device_get(trainer.state.step))
    with checkpoint.Checkpointer(
        checkpoint.CheckpointConfig(str(directory), save_every=1)
    ) as manager:
        manager.save(step, trainer.state, extra={"data": trainer.batches.get_state()})


def restore_checkpoint(directory: Path, trainer: Trainer) -> dict:
    """Restores the latest checkpoint onto ``trainer``'s mesh; returns the data state."""
    target = sharding.abstract_with_shardings(trainer.state, trainer.shardings)
    with checkpoint.Checkpointer(checkpoint.CheckpointConfig(str(directory))) as manager:
        restored = manager.restore_latest(target)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    trainer.state, extra = restored
    trainer.batches.set_state(extra["data"])
    return dict(extra["data"])


# ----------------------------------------------------------------------------- main


def _env_int(name: str):
    value = os.environ.get(name)
    return int(value) if value else None


def initialize() -> None:
    """Joins the job the launcher started (no-op when run as a single process), through
    the same function as the ``distill-jax`` training commands."""
    common.initialize_processes(
        argparse.Namespace(
            coordinator=os.environ.get("DISTILL_JAX_COORDINATOR"),
            num_processes=_env_int("DISTILL_JAX_NUM_PROCESSES"),
            process_id=_env_int("DISTILL_JAX_PROCESS_ID"),
            distributed_auto=False,
        )
    )


def save_npz(path: Path, arrays: dict) -> None:
    if jax.process_index() == 0:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--train",
        type=parse_mesh,
        action="append",
        default=[],
        metavar="D,F,T",
        help="train --steps steps on this mesh",
    )
    parser.add_argument(
        "--save-at",
        type=int,
        default=None,
        help="checkpoint the first --train run after this many steps",
    )
    parser.add_argument("--save-dir", type=Path, default=None)
    parser.add_argument(
        "--restore-from",
        type=Path,
        default=None,
        help="restore this checkpoint onto --restore-mesh, train to --steps",
    )
    parser.add_argument("--restore-mesh", type=parse_mesh, default=(-1, 1, 1))
    parser.add_argument(
        "--print-steps",
        action="store_true",
        help="print STEP n after every step (the kill test's cue)",
    )
    args = parser.parse_args(argv)

    initialize()
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices, "
        f"PID {os.getpid()}",
        flush=True,
    )
    views = {}
    for run, shape in enumerate(args.train):
        trainer = Trainer(shape)
        extra = {}
        if run == 0 and args.save_at is not None:
            trainer.train(args.save_at)
            extra = {"saved_" + k: v for k, v in trainer.params().items()}
            extra["saved_data_state"] = np.asarray(json.dumps(trainer.batches.get_state()))
            save_checkpoint(args.save_dir, trainer)
            trainer.train(args.steps - args.save_at)
        else:
            trainer.train(args.steps, args.print_steps)
        save_npz(args.out / f"train_{mesh_name(shape)}.npz", {**trainer.results(), **extra})
        views[f"train_{mesh_name(shape)}"] = trainer.record["loss_sum"]
    if args.restore_from is not None:
        trainer = Trainer(args.restore_mesh)
        data_state = restore_checkpoint(args.restore_from, trainer)
        restored = {"restored_" + k: v for k, v in trainer.params().items()}
        restored["restored_step"] = np.asarray(int(jax.device_get(trainer.state.step)))
        restored["restored_data_state"] = np.asarray(json.dumps(data_state))
        trainer.train(args.steps - int(restored["restored_step"]))
        name = f"restore_{mesh_name(trainer.mesh.devices.shape)}"
        save_npz(args.out / f"{name}.npz", {**trainer.results(), **restored})
        views[name] = trainer.record["loss_sum"]
    (args.out / f"done_{jax.process_index()}.json").write_text(json.dumps(views))
    return 0


def exit_on_error() -> None:
    """Makes an uncaught exception end this process at once, with status 1.

    A multi-process JAX program that raises otherwise waits at exit in
    ``jax.distributed``'s shutdown barrier for its peers (up to 5 minutes), while the
    peers wait for it in their next collective; exiting lets the launcher stop the job.
    """

    def hook(kind, value, tb):
        sys.__excepthook__(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


if __name__ == "__main__":
    exit_on_error()
    sys.exit(main())
