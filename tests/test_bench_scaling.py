"""scripts/bench/bench_scaling.py: the HLO collective accounting and one real measurement."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "bench"))
import bench_scaling  # noqa: E402

pytestmark = pytest.mark.bench  # benchmark tools: out of the fast tier, run in CI

HLO = """
ENTRY %main {
  %all-reduce.1 = (f32[512,256]{1,0}, f32[256]{0}) all-reduce(f32[512,256]{1,0} %a, f32[256]{0} %b), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %all-reduce.2 = bf16[1024]{0} all-reduce(bf16[1024]{0} %c), channel_id=2, replica_groups=[4,2]<=[8], to_apply=%add
  %all-gather-start.3 = (f32[128,64]{1,0}, f32[1024,64]{1,0}) all-gather-start(f32[128,64]{1,0} %d), channel_id=3, replica_groups={}, dimensions={0}
  %all-gather-done.3 = f32[1024,64]{1,0} all-gather-done((f32[128,64]{1,0}, f32[1024,64]{1,0}) %all-gather-start.3)
  %reduce-scatter.4 = f32[64,32]{1,0} reduce-scatter(f32[256,32]{1,0} %e), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %collective-permute.5 = s32[10]{0} collective-permute(s32[10]{0} %f), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %all-reduce.6 = f32[8]{0} all-reduce(f32[8]{0} %g), channel_id=6, replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add
}
"""


def test_collective_accounting_on_known_hlo():
    stats = bench_scaling.collective_stats(HLO, num_devices=8)
    f32 = 4
    tuple_bytes = (512 * 256 + 256) * f32
    # groups of 4 (explicit) and of 2 (iota [4,2]); the group of 1 moves nothing
    assert stats["all-reduce"]["count"] == 2
    assert stats["all-reduce"]["payload_bytes"] == tuple_bytes + 1024 * 2
    assert stats["all-reduce"]["ring_bytes"] == pytest.approx(
        2 * 3 / 4 * tuple_bytes + 2 * 1 / 2 * 1024 * 2
    )
    # async all-gather: counted once, by its output, over all 8 devices ({} groups)
    assert stats["all-gather"] == {
        "count": 1,
        "payload_bytes": 1024 * 64 * f32,
        "ring_bytes": pytest.approx(7 / 8 * 1024 * 64 * f32),
    }
    # reduce-scatter: input is 4 x the result; a device sends 3 result-sized pieces
    assert stats["reduce-scatter"]["payload_bytes"] == 256 * 32 * f32
    assert stats["reduce-scatter"]["ring_bytes"] == 3 * 64 * 32 * f32
    assert stats["collective-permute"] == {"count": 1, "payload_bytes": 40.0, "ring_bytes": 40.0}


def test_projection_scales_with_bytes_and_bandwidth():
    one = bench_scaling.projected_comm_ms(1e9)
    two = bench_scaling.projected_comm_ms(2e9)
    for chip in bench_scaling.TPU_SPECS:
        assert two[chip]["one_axis"] == pytest.approx(2 * one[chip]["one_axis"])
        assert one[chip]["all_links"] < one[chip]["one_axis"]
    # v5p has 3x the ICI bandwidth of v5e over 1.5x the ports: 2x per port
    assert one["v5e"]["one_axis"] == pytest.approx(2 * one["v5p"]["one_axis"])


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")
def test_data_parallel_step_all_reduces_exactly_the_gradients():
    """On a (2,1,1) mesh the only cross-device traffic of the train step is the gradient
    all-reduce (plus scalar metrics): its payload is the parameters' size -- plus, on
    XLA's CPU compiler, which does not reassociate add(all-reduce(a), all-reduce(b)), two
    more copies of the tied embedding's gradient (its three uses: encoder input, decoder
    input, output layer). One device has no collectives at all."""
    single = bench_scaling.measure(bench_scaling.Case("t", (1, 1, 1), 8), "tiny", runs=5, warmup=1)
    assert single["collectives"] == {}
    assert single["memory_analysis"]["temp_bytes"] > 0
    data = bench_scaling.measure(bench_scaling.Case("t", (2, 1, 1), 8), "tiny", runs=5, warmup=1)
    params = data["per_device_param_bytes"]  # replicated: the full parameter size
    assert params == single["per_device_param_bytes"]
    reduce = data["collectives"]["all-reduce"]
    embedding = 64 * 32 * 4  # tiny: vocab 64 x d_model 32, float32
    assert params <= reduce["payload_bytes"] <= params + 2 * embedding + 256  # + metric scalars
    assert set(data["collectives"]) == {"all-reduce"}
    # same batch, same initialisation: the step computes the same loss on 1 and 2 devices
    assert data["loss_after_timed_steps"] == pytest.approx(
        single["loss_after_timed_steps"], rel=1e-5
    )


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")
def test_fsdp_step_gathers_each_kernel_once():
    """On a (1,2,1) mesh every parameter is sharded over fsdp and all-gathered for use.
    The backward's input gradient must reuse the forward's gathered kernel: when it started
    again from the sharded kernel the partitioner gathered every kernel a second time, in
    the transposed layout (about twice the bytes). Allowed on top of one gather of the
    parameters: the tied embedding's second, transposed use (the output layer) and the
    layer-norm vectors, which autodiff gathers again for the backward (a few hundred
    bytes each)."""
    single = bench_scaling.measure(bench_scaling.Case("t", (1, 1, 1), 8), "tiny", runs=5, warmup=1)
    fsdp = bench_scaling.measure(bench_scaling.Case("t", (1, 2, 1), 8), "tiny", runs=5, warmup=1)
    params = single["per_device_param_bytes"]
    assert fsdp["per_device_param_bytes"] < params  # the parameters really are sharded
    gathered = fsdp["collectives"]["all-gather"]["payload_bytes"]
    embedding = 64 * 32 * 4  # tiny: vocab 64 x d_model 32, float32
    assert params <= gathered <= params + 2 * embedding
    assert fsdp["loss_after_timed_steps"] == pytest.approx(
        single["loss_after_timed_steps"], rel=1e-5
    )
