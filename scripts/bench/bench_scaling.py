"""Scaling benchmark: the distilled student's train step over mesh shapes and device counts.

For every (mesh shape, global batch) it compiles the real jitted step (offline KD loss,
AdamW, the project's sharding rules), then reports

* step time (median of >= 5 timed steps after warm-up) and target tokens/s;
* per-device memory: parameters and optimizer state (from the arrays' shard shapes),
  and the compiled program's own ``memory_analysis()`` (arguments, outputs, temporaries:
  the temporaries are the activations and gradients);
* the collectives of the compiled (SPMD-partitioned, per-device) HLO: how many of each
  kind, their payload bytes, and the bytes each device sends with a bandwidth-optimal
  ring algorithm (all-reduce 2(n-1)/n x size, all-gather (n-1)/n x output, reduce-scatter
  (n-1)/n x input, all-to-all (n-1)/n x size, collective-permute 1 x size; n = replica
  group size);
* a projection of the communication time per step on TPU v5e and v5p slices from those
  bytes and the published ICI bandwidth (see BENCHMARKS.md for the model).

Suites:

* ``strong``: a fixed global batch over 1, 2, 4, 8 devices and several mesh shapes;
* ``weak``: a fixed batch per data shard, growing with the device count;
* ``processes``: a few 8-device meshes at one global batch, to run once as 1 process x 8
  devices and once as 2 processes x 4 devices (``scripts/launch_local.sh 2 ...``); only
  process 0 writes. ``--compare ONE.json TWO.json`` prints the 1-vs-2-process table.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python scripts/bench/bench_scaling.py --suite strong,weak --json results/bench_scaling.json \\
      --plot results/bench_scaling.png
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python scripts/bench/bench_scaling.py --suite processes --json results/bench_scaling_1proc.json
  DEVICES_PER_PROCESS=4 scripts/launch_local.sh 2 \\
      python scripts/bench/bench_scaling.py --suite processes --json results/bench_scaling_2proc.json
  python scripts/bench/bench_scaling.py --compare results/bench_scaling_1proc.json \\
      results/bench_scaling_2proc.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

# Published Cloud TPU figures (docs.cloud.google.com/tpu/docs/v5e, .../v5p): bidirectional
# ICI bandwidth per chip, ICI ports per chip, bf16 peak per chip.
TPU_SPECS = {
    "v5e": {"ici_bidir_gb_s": 400.0, "ports": 4, "bf16_tflop_s": 197.0, "topology": "2D torus"},
    "v5p": {"ici_bidir_gb_s": 1200.0, "ports": 6, "bf16_tflop_s": 459.0, "topology": "3D torus"},
}

MODELS = {
    "tiny": dict(
        vocab_size=64,
        d_model=32,
        num_heads=2,
        mlp_dim=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        max_len=64,
    ),  # for tests
    # the demo's students (configs/demo_multi30k.py) with the demo vocabulary's size
    "small": dict(
        vocab_size=10_320,
        d_model=256,
        num_heads=4,
        mlp_dim=1024,
        num_encoder_layers=3,
        num_decoder_layers=3,
        max_len=64,
    ),
    # the reference student (docs/method.md: 6+6, d 512, ff 2048, 8 heads)
    "reference": dict(vocab_size=10_320, max_len=64),
}

SRC_LEN = TGT_LEN = 24  # a Multi30k-like bucket
TOP_K = 8


@dataclasses.dataclass(frozen=True)
class Case:
    suite: str
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    rows: int  # global batch (sentences)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh)


def suite_cases(suite: str) -> list[Case]:
    if suite == "strong":  # 64 sentences in every step
        shapes = [
            (1, 1, 1),
            (2, 1, 1),
            (1, 2, 1),
            (1, 1, 2),
            (4, 1, 1),
            (1, 4, 1),
            (2, 1, 2),
            (8, 1, 1),
            (1, 8, 1),
            (2, 2, 2),
            (4, 1, 2),
            (1, 1, 8),
        ]
        return [Case("strong", s, 64) for s in shapes]
    if suite == "weak":  # 16 sentences per batch shard (data x fsdp)
        shapes = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (8, 1, 1), (1, 2, 1), (1, 4, 1), (1, 8, 1)]
        return [Case("weak", s, 16 * s[0] * s[1]) for s in shapes]
    if suite == "processes":  # batch split over processes: data x fsdp >= process count
        return [Case("processes", s, 64) for s in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]]
    raise SystemExit(f"unknown suite {suite!r}: choose strong, weak, processes")


# ----------------------------------------------------------------------------- HLO collectives

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(_COLLECTIVES) + r")(?P<start>-start)?\("
)


def _array_bytes(text: str) -> list[int]:
    """Byte sizes of every array shape in ``text`` (a result shape, maybe a tuple)."""
    sizes = []
    for dtype, dims in _ARRAY.findall(text):
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        sizes.append(count * _DTYPE_BYTES[dtype])
    return sizes


def _group_size(line: str, num_devices: int) -> int:
    match = re.search(r"replica_groups=\{(\{[0-9,]*\})", line)
    if match:
        return max(1, len([x for x in match.group(1).strip("{}").split(",") if x]))
    match = re.search(r"replica_groups=\[([0-9]+),([0-9]+)\]", line)  # iota form [groups,size]
    if match:
        return int(match.group(2))
    if "source_target_pairs" in line:
        return 2
    return num_devices  # replica_groups={} : all devices


def collective_stats(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
    """Per collective kind: ``count``, ``payload_bytes`` (the data the op reduces or
    produces, per device) and ``ring_bytes`` (bytes one device sends with a ring algorithm).

    Async pairs are counted once (at ``-start``). Collectives inside loops would run
    several times per step; the student's step has no loop over layers, so each
    instruction runs once (gradient accumulation would multiply them).
    """
    stats = {kind: {"count": 0, "payload_bytes": 0.0, "ring_bytes": 0.0} for kind in _COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        kind, sizes = match.group("op"), _array_bytes(match.group("shape"))
        if not sizes:
            continue
        if match.group("start") and kind in ("all-gather", "collective-permute"):
            sizes = sizes[len(sizes) // 2 :]  # (operands..., outputs...): keep the outputs
        n = _group_size(line, num_devices)
        size = float(sum(sizes))
        if n <= 1:
            continue  # a collective over one device moves nothing
        if kind == "all-reduce":
            ring = 2 * (n - 1) / n * size
        elif kind == "reduce-scatter":  # result is the 1/n shard: input = n x result
            ring = (n - 1) * size
            size *= n
        elif kind == "collective-permute":
            ring = size
        else:  # all-gather (result = gathered), all-to-all
            ring = (n - 1) / n * size
        entry = stats[kind]
        entry["count"] += 1
        entry["payload_bytes"] += size
        entry["ring_bytes"] += ring
    return {k: v for k, v in stats.items() if v["count"]}


def projected_comm_ms(ring_bytes: float) -> dict[str, dict[str, float]]:
    """Communication time per step on TPU slices if the same bytes moved over ICI.

    ``one_axis``: the collectives run as bidirectional rings along one torus axis, so a
    chip sends on 2 of its ports (each at its one-way share, bidir / ports / 2) -- the
    usual case for a 1-D mesh axis. ``all_links``: every port busy, a lower bound.
    """
    out = {}
    for name, spec in TPU_SPECS.items():
        per_port_one_way = spec["ici_bidir_gb_s"] / spec["ports"] / 2 * 1e9
        out[name] = {
            "one_axis": ring_bytes / (2 * per_port_one_way) * 1e3,
            "all_links": ring_bytes / (spec["ici_bidir_gb_s"] / 2 * 1e9) * 1e3,
        }
    return out


# ----------------------------------------------------------------------------- measurement


def _init_processes() -> None:
    """Joins a ``scripts/launch_local.sh`` (or cluster) job from DISTILL_JAX_* variables."""
    import jax

    count = int(os.environ.get("DISTILL_JAX_NUM_PROCESSES", "1") or 1)
    if count > 1:
        jax.distributed.initialize(
            coordinator_address=os.environ["DISTILL_JAX_COORDINATOR"],
            num_processes=count,
            process_id=int(os.environ["DISTILL_JAX_PROCESS_ID"]),
        )


def _per_device_bytes(tree: Any) -> int:
    """Bytes of the largest shard of each array, summed: the per-device footprint."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "sharding"):
            shape = leaf.sharding.shard_shape(leaf.shape)
            total += int(np.prod(shape)) * leaf.dtype.itemsize
    return total


def random_kd_batch(
    vocab: int, rows: int, src_len: int, tgt_len: int, top_k: int, seed: int = 0
) -> dict:
    """An offline-KD student batch of random ids (>= 4: no special tokens) and sorted
    random teacher logits, as numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    kd_logits = np.sort(rng.normal(size=(rows, tgt_len, top_k)).astype(np.float32), -1)
    return {
        "src": rng.integers(4, vocab, (rows, src_len)).astype(np.int32),
        "tgt_in": rng.integers(4, vocab, (rows, tgt_len)).astype(np.int32),
        "tgt_out": rng.integers(4, vocab, (rows, tgt_len)).astype(np.int32),
        "kd_logits": np.ascontiguousarray(kd_logits[..., ::-1]),
        "kd_indices": rng.integers(4, vocab, (rows, tgt_len, top_k)).astype(np.int32),
    }


def measure(case: Case, model_name: str, runs: int, warmup: int) -> dict:
    import jax
    from bench_step import analytic_flops

    from distill_jax import sharding, train
    from distill_jax.models.transformer import TransformerConfig

    import benchlib

    cfg = TransformerConfig(**MODELS[model_name])
    mesh = sharding.make_mesh(
        sharding.MeshConfig(*case.mesh), devices=jax.devices()[: case.devices]
    )
    model, tx, state, state_shardings = benchlib.init_student(cfg, mesh)
    rows = case.rows
    batch = random_kd_batch(cfg.vocab_size, rows, SRC_LEN, TGT_LEN, TOP_K)
    local = rows // jax.process_count()
    start = jax.process_index() * local
    batch = {k: v[start : start + local] for k, v in batch.items()}
    loss_fn = train.student_loss_fn(model, train.StudentLossConfig(alpha=0.5))
    step = train.make_train_step(
        loss_fn, tx, mesh, state_shardings, sharding.batch_shardings(batch, mesh)
    )
    batch = sharding.shard_batch(batch, mesh)
    key = jax.random.PRNGKey(1)
    compiled = step.lower(state, batch, key).compile()
    memory = compiled.memory_analysis()
    collectives = collective_stats(compiled.as_text(), case.devices)

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        return metrics

    timing = benchlib.time_runs(one_step, warmup=warmup, runs=runs)
    metrics = jax.device_get(one_step())
    ring = sum(c["ring_bytes"] for c in collectives.values())
    tokens = rows * TGT_LEN
    return {
        "suite": case.suite,
        "model": model_name,
        "mesh": list(case.mesh),
        "devices": case.devices,
        "processes": jax.process_count(),
        "global_rows": rows,
        "target_tokens": tokens,
        "median_s": timing.median_s,
        "runs_s": timing.runs_s,
        "target_tokens_per_s": tokens / timing.median_s,
        "flops_analytic": analytic_flops(cfg, rows, SRC_LEN, TGT_LEN),
        "loss_after_timed_steps": float(metrics["loss"][0] / metrics["loss"][1]),
        "per_device_param_bytes": _per_device_bytes(holder["state"].params),
        "per_device_opt_state_bytes": _per_device_bytes(holder["state"].opt_state),
        "memory_analysis": None
        if memory is None
        else {
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "alias_bytes": int(memory.alias_size_in_bytes),
            "generated_code_bytes": int(memory.generated_code_size_in_bytes),
        },
        "collectives": collectives,
        "collective_ring_bytes_per_device": ring,
        "projected_comm_ms": projected_comm_ms(ring),
    }


# ----------------------------------------------------------------------------- reporting


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _mesh(m: Sequence[int]) -> str:
    return "(" + ",".join(str(x) for x in m) + ")"


def _kinds(collectives: dict) -> str:
    return ", ".join(f"{v['count']} {k}" for k, v in collectives.items()) or "none"


def print_table(records: list[dict]) -> None:
    import benchlib

    for suite in dict.fromkeys(r["suite"] for r in records):
        rows = [r for r in records if r["suite"] == suite]
        base = next((r for r in rows if r["devices"] == 1), None)
        header = [
            "mesh (d,f,t)",
            "devices",
            "rows",
            "step s",
            "tok/s",
            "vs 1 device",
            "params+opt MiB/dev",
            "temp MiB/dev",
            "collectives",
            "ring MiB/dev",
            "v5e ms",
            "v5p ms",
        ]
        table = []
        for r in rows:
            # a suite without a one-device case (processes) has no baseline to compare with
            rel = f"{r['target_tokens_per_s'] / base['target_tokens_per_s']:.2f}" if base else "-"
            mem = r["memory_analysis"] or {}
            table.append(
                [
                    _mesh(r["mesh"]),
                    r["devices"],
                    r["global_rows"],
                    r["median_s"],
                    r["target_tokens_per_s"],
                    rel,
                    _mb(r["per_device_param_bytes"] + r["per_device_opt_state_bytes"]),
                    _mb(mem.get("temp_bytes", float("nan"))),
                    _kinds(r["collectives"]),
                    _mb(r["collective_ring_bytes_per_device"]),
                    f"{r['projected_comm_ms']['v5e']['one_axis']:.2f}",
                    f"{r['projected_comm_ms']['v5p']['one_axis']:.2f}",
                ]
            )
        print(f"\n{suite} scaling ({rows[0]['model']} student, {SRC_LEN}->{TGT_LEN} tokens)")
        print(benchlib.markdown_table(header, table))


def compare(one_path: str, two_path: str) -> None:
    import benchlib

    one = {tuple(r["mesh"]): r for r in json.load(open(one_path))}
    two = {tuple(r["mesh"]): r for r in json.load(open(two_path))}
    header = [
        "mesh (d,f,t)",
        "rows",
        "1 proc x 8: step s",
        "2 proc x 4: step s",
        "2-proc / 1-proc time",
        "ring MiB/dev (1 / 2 proc)",
        "loss 1 proc",
        "loss 2 proc",
    ]
    table = []
    for mesh in one:
        if mesh not in two:
            continue
        a, b = one[mesh], two[mesh]
        table.append(
            [
                _mesh(mesh),
                a["global_rows"],
                a["median_s"],
                b["median_s"],
                f"{b['median_s'] / a['median_s']:.2f}",
                f"{_mb(a['collective_ring_bytes_per_device'])} / "
                f"{_mb(b['collective_ring_bytes_per_device'])}",
                f"{a['loss_after_timed_steps']:.6f}",
                f"{b['loss_after_timed_steps']:.6f}",
            ]
        )
    print(benchlib.markdown_table(header, table))


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for suite, ax in zip(("strong", "weak"), axes[:2]):
        rows = [r for r in records if r["suite"] == suite]
        by_axis: dict[str, list] = {}
        for r in rows:
            d, f, t = r["mesh"]
            label = (
                "data"
                if d > 1 and f == t == 1
                else "fsdp"
                if f > 1 and d == t == 1
                else "tensor"
                if t > 1 and d == f == 1
                else "mixed"
                if r["devices"] > 1
                else "1 device"
            )
            by_axis.setdefault(label, []).append(r)
        base = next((r for r in rows if r["devices"] == 1), None)
        for label, rs in by_axis.items():
            if label == "1 device" or not base:
                continue
            rs = [base] + sorted(rs, key=lambda r: r["devices"])
            ax.plot(
                [r["devices"] for r in rs],
                [r["target_tokens_per_s"] for r in rs],
                "o-" if label != "mixed" else "s",
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("simulated CPU devices")
        ax.set_ylabel("target tokens / s")
        ax.set_title(f"{suite} scaling (2 CPU cores shared)")
        ax.legend()
    ax = axes[2]
    rows = [r for r in records if r["suite"] == "strong" and r["devices"] > 1]
    labels = [_mesh(r["mesh"]) for r in rows]
    ax.bar(range(len(rows)), [r["collective_ring_bytes_per_device"] / 2**20 for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=60)
    ax.set_ylabel("MiB sent per device per step (ring)")
    ax.set_title("collective bytes, strong scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suite", default="strong,weak", help="strong, weak, processes (comma list)"
    )
    parser.add_argument("--model", default="small", choices=sorted(MODELS))
    parser.add_argument("--runs", type=int, default=5, help="timed steps per case (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case")
    parser.add_argument("--max-devices", type=int, default=None, help="skip larger meshes")
    parser.add_argument("--json", default=None, help="write the records here (process 0)")
    parser.add_argument("--plot", default=None, help="write a PNG here (process 0)")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("ONE_PROC.json", "TWO_PROC.json"),
        help="print the 1-vs-2-process table of two --suite processes runs",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="print the tables (and --plot) of earlier records; measure nothing",
    )
    args = parser.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return 0
    if args.from_json:
        records = json.load(open(args.from_json))
        print_table(records)
        if args.plot:
            plot(records, args.plot)
        return 0
    _init_processes()
    import jax

    import benchlib

    available = len(jax.devices())
    records = []
    for suite in args.suite.split(","):
        for case in suite_cases(suite):
            if case.devices > min(available, args.max_devices or available):
                print(f"skip {case}: {available} devices available", flush=True)
                continue
            if (
                case.rows % (case.mesh[0] * case.mesh[1] * 1)
                or (case.mesh[0] * case.mesh[1]) % jax.process_count()
            ):
                print(f"skip {case}: batch shards must split over the processes", flush=True)
                continue
            record = measure(case, args.model, args.runs, args.warmup)
            if jax.process_index() == 0:
                print(
                    f"{suite} mesh {_mesh(case.mesh)} rows {case.rows}: "
                    f"{record['median_s']:.3f} s/step, "
                    f"ring {_mb(record['collective_ring_bytes_per_device'])} MiB/device, "
                    f"{_kinds(record['collectives'])}",
                    flush=True,
                )
            records.append(record)
    if jax.process_index() != 0:
        return 0
    info = benchlib.machine_info(with_torch=False)
    for record in records:
        record["machine"] = info
    print_table(records)
    benchlib.write_json(args.json, records)
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
