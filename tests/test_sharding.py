"""Mesh construction, logical-axis rules, divisibility fallback and sharded init."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distill_jax import sharding


def test_mesh_config_resolves_minus_one():
    assert sharding.MeshConfig().resolve(8) == (8, 1, 1)
    assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert sharding.MeshConfig(data=1, fsdp=2, tensor=4).resolve(8) == (1, 2, 4)


def test_mesh_config_errors():
    with pytest.raises(ValueError, match=r"data=2, fsdp=2, tensor=1.*4 devices but 8 devices"):
        sharding.MeshConfig(2, 2, 1).resolve(8)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.MeshConfig(-1, -1, 1).resolve(8)
    with pytest.raises(ValueError, match="product 3.*do not divide"):
        sharding.MeshConfig(-1, 3, 1).resolve(8)
    with pytest.raises(ValueError, match="positive or -1"):
        sharding.MeshConfig(0, 1, 1).resolve(8)


def test_make_mesh_axes_and_devices():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, -1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    single = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    assert single.devices.size == 1


def test_logical_spec_to_mesh_spec():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    assert sharding.mesh_spec_for(P("embed", "heads", "kv"), (32, 4, 8), mesh) == P(
        "fsdp", "tensor", None
    )
    assert sharding.mesh_spec_for(P("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    assert sharding.mesh_spec_for(None, (3,), mesh) == P()


def test_divisibility_fallback_replicates_dim(caplog):
    """12 heads on tensor=8 are replicated (the embed dim stays on fsdp), with a log line."""
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 8))
    fallbacks = []
    spec = sharding.mesh_spec_for(P("embed", "heads", "kv"), (16, 12, 4), mesh, fallbacks=fallbacks)
    assert spec == P("fsdp", None, None)  # fsdp has size 1 here: harmless
    assert fallbacks == ["heads=12 not divisible by tensor=8"]

    class Heads(nn.Module):
        @nn.compact
        def __call__(self):
            return self.param(
                "w",
                nn.with_logical_partitioning(nn.initializers.ones, ("embed", "heads")),
                (16, 12),
            )

    mesh2 = sharding.make_mesh(sharding.MeshConfig(1, 1, 8))
    with caplog.at_level(logging.WARNING, logger="distill_jax.sharding"):
        state, shardings = sharding.create_sharded_state(
            lambda: Heads().init(jax.random.PRNGKey(0))["params"], mesh2
        )
    assert shardings["w"].spec == P("fsdp", None)
    assert state["w"].sharding.spec == P("fsdp", None)
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
    assert len([r for r in caplog.records if "heads=12" in r.getMessage()]) == 1


def test_batch_not_divisible_error():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    batch = {"src": np.zeros((6, 5), np.int32)}
    with pytest.raises(ValueError, match=r"'src'.*batch size 6.*data\*fsdp=4"):
        sharding.shard_batch(batch, mesh)


def test_shard_batch_layout():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    src = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    out = sharding.shard_batch({"src": src}, mesh)["src"]
    assert out.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out), src)
    assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}


class Tiny(nn.Module):
    """An embedding and a head-split projection with logical axes."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(
            64,
            32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(1.0), ("vocab", "embed")
            ),
        )(ids)
        return nn.DenseGeneral(
            (4, 8),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "heads", "kv")
            ),
        )(x)


def test_state_born_sharded_on_2x2x2():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    init = lambda: Tiny().init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]  # noqa: E731
    state, shardings = sharding.create_sharded_state(init, mesh)
    emb = state["Embed_0"]["embedding"]
    kernel = state["DenseGeneral_0"]["kernel"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert kernel.sharding.spec == P("fsdp", "tensor", None)
    assert state["DenseGeneral_0"]["bias"].sharding.spec == P()
    assert {s.data.shape for s in emb.addressable_shards} == {(32, 16)}
    # Same values as an unsharded init.
    plain = nn.unbox(init())
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain["DenseGeneral_0"]["kernel"]))
    # place_tree puts existing host arrays on the same layout.
    placed = sharding.place_tree(jax.tree.map(np.asarray, plain), shardings)
    assert placed["Embed_0"]["embedding"].sharding == emb.sharding


def test_maybe_initialize_distributed_single_process_is_noop():
    sharding.maybe_initialize_distributed()
    sharding.maybe_initialize_distributed(None, 1, 0)
    assert jax.process_count() == 1


def test_maybe_initialize_distributed_names_what_a_multi_process_run_lacks():
    from distill_jax.errors import UserError

    with pytest.raises(UserError, match="--coordinator, --num-processes and --process-id"):
        sharding.maybe_initialize_distributed("localhost:1234", 2, None)
    with pytest.raises(UserError, match="--coordinator"):
        sharding.maybe_initialize_distributed(None, 2, 0)
