"""The CPU profile readers the profiling scripts share (scripts/bench/benchlib.py), and
scripts/bench/profile/profile_beam.py end to end on a tiny model."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench")
sys.path.insert(0, os.path.join(BENCH, "profile"))
sys.path.insert(0, BENCH)
import benchlib  # noqa: E402
import profile_beam  # noqa: E402

pytestmark = pytest.mark.bench  # investigation tools: out of the fast tier, run in CI


def test_thunk_table_maps_traced_thunks_to_op_names(tmp_path):
    def f(x, w):
        for i in range(2):
            with jax.named_scope(f"layer_{i}"):
                x = jnp.tanh(x @ w)
        return x

    x = jnp.ones((64, 64), jnp.float32)
    compiled = jax.jit(f).lower(x, x).compile()
    names = benchlib.hlo_op_names(compiled.as_text())
    # layer indices are folded and the jit(...) prefix is gone
    assert any(op == "layer_N/dot_general" for op in names.values()), sorted(set(names.values()))
    assert not any(op.startswith("jit(") or "layer_1" in op for op in names.values())
    jax.block_until_ready(compiled(x, x))
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(compiled(x, x))
    rows = benchlib.thunk_table(str(tmp_path), names, calls=2)
    ops = {op for _, op, _ in rows}
    assert "layer_N/dot_general" in ops, rows
    assert all(ms >= 0 for _, _, ms in rows)
    assert [ms for _, _, ms in rows] == sorted((ms for _, _, ms in rows), reverse=True)


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
def test_profile_beam_groups_every_op():
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCH, "profile", "profile_beam.py"),
            "--batch",
            "2",
            "--src-len",
            "6",
            "--new-tokens",
            "4",
            "--beams",
            "3",
            "--vocab",
            "40",
            "--padded-rows",
            "1",
            "--d-model",
            "16",
            "--mlp-dim",
            "32",
            "--heads",
            "2",
            "--layers",
            "1",
            "--calls",
            "1",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    groups = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in {group[0] for group in profile_beam.GROUPS}:
            groups[cells[0]] = float(cells[1])
    total = float(re.search(r"all listed thunks: (\d+) ms", out.stdout).group(1))
    assert "self-attention core (scores, mask, softmax, weighted sum)" in groups, out.stdout
    assert "output projection (logits)" in groups, out.stdout
    assert "encoder + cross keys/values (once per call)" in groups, out.stdout
    # every listed thunk lands in exactly one group
    assert abs(sum(groups.values()) - total) <= 1 + 0.01 * total, (groups, total)


def test_group_of_names_the_decoder_ops():
    step = "while/body/Transformer.decode/decoder/layer_N/"
    assert profile_beam.group_of(
        step + "self_attention/self_attention._attend/bhqd,bhdk->bhqk/dot_general"
    ).startswith("self-attention core")
    assert profile_beam.group_of(
        step + "self_attention/self_attention._attend/self_attention._output/out/dot_general"
    ).startswith("decoder dense layers")
    assert (
        profile_beam.group_of(
            step + "self_attention/self_attention._self_attention_cache/dynamic_update_slice"
        )
        == "self-attention cache write"
    )
    assert profile_beam.group_of(step + "feed_forward_block.finish/norm/dot_general").startswith(
        "LayerNorm"
    )
    assert (
        profile_beam.group_of("while/body/Transformer.decode/dot_general")
        == "output projection (logits)"
    )
    assert profile_beam.group_of("while/body/top_k").startswith("beam bookkeeping")
    assert (
        profile_beam.group_of("grow_cache/jit(_pad)/pad") == "cache growth between decoding phases"
    )
