"""Orbax checkpoints: exact resume in a new process, restore onto other meshes,
retention (keep-last-N + keep-best) and averaging.

This file is also a script (``python tests/test_checkpoint.py run ...``): the resume
test starts it in fresh processes, so nothing survives in memory between the runs.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from distill_jax import checkpoint, optim, sharding, train  # noqa: E402

WIDTH, HIDDEN, BATCH = 16, 32, 8


class TinyMLP(nn.Module):
    """Two dense layers with logical axes and dropout (a stand-in model)."""

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        h = nn.Dense(
            HIDDEN,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
        )(x)
        h = nn.Dropout(0.2)(nn.relu(h), deterministic=deterministic)
        return nn.Dense(
            WIDTH,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "embed")
            ),
        )(h)


def loss_fn(params, batch, rng):
    det = rng is None
    out = TinyMLP().apply(
        {"params": params}, batch["x"], deterministic=det, rngs={} if det else {"dropout": rng}
    )
    err = jnp.sum((out - batch["y"]) ** 2)
    count = jnp.asarray(batch["x"].size, jnp.float32)
    return err, {"loss": (err, count)}


def make_batch(step):
    rng = np.random.default_rng(1000 + step)
    return {
        "x": rng.normal(size=(BATCH, WIDTH)).astype(np.float32),
        "y": rng.normal(size=(BATCH, WIDTH)).astype(np.float32),
    }


def setup(mesh):
    """(init state, state shardings, jitted step) on ``mesh``."""
    tx = optim.make_optimizer(
        optim.OptimizerConfig(learning_rate=1e-2, schedule="linear", total_steps=20, warmup_steps=2)
    )
    init = lambda: train.TrainState.create(  # noqa: E731
        TinyMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, WIDTH)))["params"], tx
    )
    state, shardings = sharding.create_sharded_state(init, mesh)
    step = train.make_train_step(
        loss_fn, tx, mesh, shardings, sharding.batch_shardings(make_batch(0), mesh)
    )
    return state, shardings, step


def mesh_of(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return sharding.make_mesh(sharding.MeshConfig(*shape), devices=devices)


def train_run(directory, total_steps, restore_step=None, mesh_shape=(2, 2, 2)):
    """Trains to ``total_steps`` (from ``restore_step`` when given), saving every 2
    steps; returns {step: loss} of the steps it ran."""
    mesh = mesh_of(mesh_shape)
    state, shardings, step_fn = setup(mesh)
    rng = jax.random.PRNGKey(7)
    cfg = checkpoint.CheckpointConfig(directory, save_every=2, keep_last=5)
    with checkpoint.Checkpointer(cfg) as ckpt:
        next_batch = 0
        if restore_step is not None:
            target = sharding.abstract_with_shardings(state, shardings)
            state, extra = ckpt.restore(restore_step, target)
            next_batch = extra["next_batch"]
            assert int(state.step) == restore_step
        losses = {}
        for i in range(next_batch, total_steps):
            state, metrics = step_fn(state, sharding.shard_batch(make_batch(i), mesh), rng)
            losses[i + 1] = float(metrics["loss"][0]) / float(metrics["loss"][1])
            ckpt.save(i + 1, state, extra={"next_batch": i + 1})
    return losses


def run_script(*args):
    """Runs this file as a script in a new process; returns its JSON output."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, __file__, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def test_resume_in_new_process_matches_uninterrupted_run(tmp_path):
    full = run_script("run", tmp_path / "full", 4)
    interrupted = run_script("run", tmp_path / "part", 2)
    resumed = run_script("run", tmp_path / "part", 4, 2)
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert interrupted == {1: full[1], 2: full[2]}
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=0)
    assert full[3] != full[4]


@pytest.fixture(scope="module")
def saved_on_8x1x1(tmp_path_factory):
    """A state trained 2 steps on mesh (8,1,1) and saved; returns (dir, numpy state)."""
    directory = tmp_path_factory.mktemp("reshard")
    mesh = mesh_of((8, 1, 1))
    state, _, step_fn = setup(mesh)
    for i in range(2):
        state, _ = step_fn(state, sharding.shard_batch(make_batch(i), mesh), jax.random.PRNGKey(7))
    cfg = checkpoint.CheckpointConfig(str(directory), save_every=1)
    with checkpoint.Checkpointer(cfg) as ckpt:
        ckpt.save(2, state, extra={"note": "8x1x1"})
    return directory, jax.tree.map(np.asarray, state)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 8), (1, 1, 1)])
def test_restore_onto_other_mesh(saved_on_8x1x1, shape):
    directory, expected = saved_on_8x1x1
    mesh = mesh_of(shape)
    state, shardings, _ = setup(mesh)
    target = sharding.abstract_with_shardings(state, shardings)
    with checkpoint.Checkpointer(checkpoint.CheckpointConfig(str(directory))) as ckpt:
        restored, extra = ckpt.restore_latest(target)
    assert extra == {"note": "8x1x1"}
    for got, want, s in zip(
        jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(shardings)
    ):
        assert got.sharding == s
        np.testing.assert_array_equal(np.asarray(got), want)


def test_keep_last_and_best(tmp_path):
    cfg = checkpoint.CheckpointConfig(
        str(tmp_path),
        save_every=1,
        keep_last=2,
        best_metric="loss",
        best_mode="min",
        async_save=False,
    )
    state = {"w": jnp.zeros((2,))}
    with checkpoint.Checkpointer(cfg) as ckpt:
        for step, loss in zip(range(1, 7), [5.0, 1.0, 4.0, 3.0, 6.0, 7.0]):
            ckpt.save(step, {"w": state["w"] + step}, metrics={"loss": loss})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 5, 6]
        assert ckpt.best_step() == 2
    cfg_max = checkpoint.CheckpointConfig(
        str(tmp_path / "max"), save_every=1, keep_last=1, best_metric="bleu", best_mode="max"
    )
    with checkpoint.Checkpointer(cfg_max) as ckpt:
        for step, bleu in zip(range(1, 5), [10.0, 30.0, 20.0, 15.0]):
            ckpt.save(step, state, metrics={"bleu": bleu})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
        with pytest.raises(ValueError, match="best_metric 'bleu'"):
            ckpt.save(5, state, metrics={"loss": 1.0})


def test_average_last_n_equals_numpy_mean(tmp_path):
    mesh = mesh_of((2, 2, 2))
    state, shardings, _ = setup(mesh)
    rng = np.random.default_rng(0)
    saved = []
    with checkpoint.Checkpointer(
        checkpoint.CheckpointConfig(str(tmp_path), save_every=1, keep_last=5)
    ) as ckpt:
        for step in range(1, 5):
            params = jax.tree.map(
                lambda x: rng.normal(size=x.shape).astype(np.float32), state.params
            )
            saved.append(params)
            ckpt.save(
                step,
                state.replace(
                    step=jnp.asarray(step), params=sharding.place_tree(params, shardings.params)
                ),
            )
    target = sharding.abstract_with_shardings(state, shardings)
    averaged = checkpoint.average_checkpoints(str(tmp_path), 3, target)
    expected = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *saved[-3:])
    for got, want in zip(jax.tree.leaves(averaged), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="last 9 checkpoints"):
        checkpoint.average_checkpoints(str(tmp_path), 9, target)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "run":
        restore = int(sys.argv[4]) if len(sys.argv) > 4 else None
        print(json.dumps(train_run(sys.argv[2], int(sys.argv[3]), restore)))
    else:
        sys.exit("usage: test_checkpoint.py run DIR TOTAL_STEPS [RESTORE_STEP]")
