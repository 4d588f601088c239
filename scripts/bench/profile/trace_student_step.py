"""Where one student train step spends its time: a profiler trace and a kernel table.

Builds the reference student step exactly as ``scripts/bench/bench_student_step.py`` does
(post-LN 6 + 6, d 512, ff 2048, label smoothing + top-K "paper" distillation, Adam,
``--dtype``), runs ``--warmup`` steps, then records ``--steps`` steps under
``jax.profiler.trace(..., create_perfetto_trace=True)`` and prints the device ops that
took the most time (summed over the traced steps, divided by the number of steps),
grouped by name, with their share of the device time. The table is meant for GPUs,
whose kernels form one flat timeline; on CPUs it sums the host's XLA thread events,
which nest, so its totals there overstate the step (the trace itself is still useful).

Run: ``python scripts/bench/profile/trace_student_step.py OUT_DIR [--batch 512 --src-len 64 --tgt-len 64]``
(``OUT_DIR/trace`` then holds the trace, viewable in Perfetto or TensorBoard).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_student_step  # noqa: E402
import benchlib  # noqa: E402

MATMUL_WORDS = ("gemm", "dot", "xmma", "cutlass", "cublas", "matmul", "wgmma", "nvjet")


def kernel_table(trace_dir: str, steps: int, top: int = 30) -> str:
    """Sums the durations of the trace's device events by name (perfetto JSON)."""
    events = benchlib.perfetto_events(trace_dir)
    # Device timelines are the processes whose name mentions the device ("/device:GPU:0").
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and "/device:" in str(e.get("args", {}).get("name", ""))
    }
    # On CPUs there is no device timeline: XLA's work runs on the host's XLA threads.
    host_python = {
        (e["pid"], e.get("tid"))
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "thread_name"
        and e.get("args", {}).get("name") == "python"
    }

    def on_device(e):
        if device_pids:
            return e.get("pid") in device_pids
        return (e.get("pid"), e.get("tid")) not in host_python

    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and on_device(e):
            totals[e["name"]] += e.get("dur", 0.0)
            counts[e["name"]] += 1
    total = sum(totals.values()) or 1.0
    matmul = sum(d for n, d in totals.items() if any(k in n.lower() for k in MATMUL_WORDS))
    lines = [
        f"device time per step: {total / steps / 1e3:.2f} ms over {len(totals)} op names "
        f"(device timelines: {len(device_pids)}); matmul kernels "
        f"{matmul / steps / 1e3:.2f} ms ({100 * matmul / total:.0f}%), other "
        f"{(total - matmul) / steps / 1e3:.2f} ms",
        "| op | ms / step | share | calls / step |",
        "|---|---|---|---|",
    ]
    for name, dur in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(
            f"| {name[:90]} | {dur / steps / 1e3:.3f} | {100 * dur / total:.1f}% | "
            f"{counts[name] / steps:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--src-len", type=int, default=64)
    parser.add_argument("--tgt-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from distill_jax.models.transformer import TransformerConfig

    dtype = jnp.dtype(args.dtype)
    cfg = TransformerConfig(
        vocab_size=args.vocab,
        d_model=512,
        num_heads=8,
        mlp_dim=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout_rate=0.3,
        max_len=max(args.src_len, args.tgt_len),
        dtype=dtype,
    )
    batch_np = bench_student_step.make_batch(
        args.batch, args.src_len, args.tgt_len, args.vocab, args.top_k, args.batch // 8
    )
    state, _, batch, step = bench_student_step.our_step(cfg, batch_np, dtype)
    rng = jax.random.PRNGKey(1)
    for _ in range(args.warmup):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    trace_dir = os.path.join(args.out_dir, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
    print(kernel_table(trace_dir, args.steps))


if __name__ == "__main__":
    main()
