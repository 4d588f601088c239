"""C-MLM teacher fine-tuning throughput: the output layer on masked positions only against
the all-positions form it replaced, in one process, alternating runs.

Both sides are the real jitted train step (``train.make_train_step``: forward, backward,
AdamW with clipping, donated state) of a MiniLM-sized BERT (6 layers, hidden 384, 12 heads,
ff 1536; all-MiniLM-L6-v2's weights when ``--checkpoint`` exists, else random ones of that
shape: the speed does not depend on the values) with a C-MLM head over a student
vocabulary of ``--vocab`` pieces, on the same batches:

  masked  ``train.cmlm_loss_fn(head_positions="masked")`` (the default since #35): the
          head runs at each row's ``mlm_positions`` only
  all     ``head_positions="all"``: the head on every position of
          ``[CLS] src [SEP] tgt [SEP]``, then the target sliced (the form before)

Batches, without ``--lengths``: one per ``--shapes`` entry ``ROWSxSxT`` (padded shapes of
the pipeline's token-budget buckets; the defaults are two of ``configs/multi30k_full.py``'s
2,048-token buckets), real lengths drawn uniformly from the bucket's range. With
``--lengths LENGTHS.npy`` (a prepared dataset's ``lengths/train.npy``): one epoch's batch
plan is made from those real lengths as the teacher's pipeline makes it (``--tokens``
budget, ``--bucket-step``), and its most frequent shapes, covering at least ``--coverage``
of the epoch's batches, are timed, one batch each (random ids of the real lengths); each
shape's time counts as often as the epoch has batches of it. C-MLM masks as the pipeline
draws them at ``--mask-rate`` (the full config's 0.3). Throughput counts
real (source + target) tokens per second. Dropout is on, as in fine-tuning.

Run: ``python scripts/bench/bench_teacher_step.py [--lengths DATA/lengths/train.npy]
[--runs 7] [--json results/bench_teacher_step.json]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from bench_teacher import DEFAULT_CHECKPOINT  # noqa: E402

MINILM_SHAPE = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"64x16x16,42x24x24"`` -> [(64, 16, 16), (42, 24, 24)]."""
    shapes = []
    for item in filter(None, text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: {item!r} is not ROWSxSRCxTGT")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def make_batch(rows: int, src_len: int, tgt_len: int, vocab: int, rate: float, seed: int) -> dict:
    """A padded C-MLM batch as the pipeline gives it (``src``, ``tgt_out``, ``mlm_mask``,
    ``mlm_positions``) and its real token count."""
    from distill_jax.data.cmlm import masked_capacity, masked_positions, random_target_mask

    rng = np.random.default_rng(seed)
    src = np.zeros((rows, src_len), np.int32)
    tgt = np.zeros((rows, tgt_len), np.int32)
    mask = np.zeros((rows, tgt_len), bool)
    real = 0
    for row in range(rows):
        n = int(rng.integers(max(2, src_len - 7), src_len + 1))
        m = int(rng.integers(max(2, tgt_len - 7), tgt_len + 1))
        src[row, :n] = rng.integers(4, vocab, n)
        tgt[row, :m] = rng.integers(4, vocab, m)
        src[row, n - 1] = tgt[row, m - 1] = 2  # </s>
        mask[row, :m] = random_target_mask(m, seed, row, rate)
        real += n + m
    positions = masked_positions(mask, masked_capacity(tgt_len, rate))
    return {"src": src, "tgt_out": tgt, "mlm_mask": mask, "mlm_positions": positions}, real


def epoch_batches(lengths_path: str, args) -> tuple[list, dict]:
    """``[(batch, real tokens, batches of that shape in the epoch), ...]`` for the most
    frequent shapes of one epoch of the teacher's pipeline on real lengths, and a
    description of what they cover."""
    from distill_jax.data.pipeline import BatchPipeline, PipelineConfig

    lengths = np.load(lengths_path).reshape(-1, 2)
    rng = np.random.default_rng(0)
    # records with random ids of the real lengths (src with its </s>; tgt without it)
    records = [
        {
            "src": np.append(rng.integers(4, args.vocab, s - 1), 2).astype(np.int32),
            "tgt": rng.integers(4, args.vocab, t - 1).astype(np.int32),
        }
        for s, t in lengths
    ]

    class Source(list):
        def __getitems__(self, indices):
            return [self[i] for i in indices]

    config = PipelineConfig(
        seed=0,
        tokens_per_batch=args.tokens,
        batch_multiple=1,
        bucket_step=args.bucket_step,
        mlm_mask_rate=args.mask_rate,
    )
    pipeline = BatchPipeline(Source(records), lengths, config, process_index=0, process_count=1)
    plan = pipeline.plan(0)
    first, counts = {}, {}
    for position, bucket in enumerate(plan.buckets):
        first.setdefault(bucket, position)
        counts[bucket] = counts.get(bucket, 0) + 1
    chosen, total = [], 0
    for bucket in sorted(counts, key=lambda b: -counts[b]):
        if total >= args.coverage * len(plan.buckets):
            break
        chosen.append(bucket)
        total += counts[bucket]
    entries = []
    for bucket in chosen:
        batch = pipeline.load_batch(first[bucket])
        real = int((batch["src"] != 0).sum() + (batch["tgt_out"] != 0).sum())
        batch = {k: batch[k] for k in ("src", "tgt_out", "mlm_mask", "mlm_positions")}
        entries.append((batch, real, counts[bucket]))
    covered = {
        "shapes": [[b.rows, b.src_len, b.tgt_len] for b in chosen],
        "batches_covered": total,
        "batches_per_epoch": len(plan.buckets),
        "padding_fraction": pipeline.statistics()["padding_fraction"],
    }
    print(
        f"{len(chosen)} of {len(counts)} shapes, {total} of {len(plan.buckets)} batches of "
        f"the epoch; padding {covered['padding_fraction']:.1%}",
        flush=True,
    )
    return entries, covered


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help="Hugging Face BERT folder (random MiniLM-shaped weights if absent)",
    )
    parser.add_argument("--vocab", type=int, default=8000, help="student vocabulary size")
    parser.add_argument("--shapes", default="64x16x16,42x24x24", help="ROWSxSRCxTGT,...")
    parser.add_argument("--mask-rate", type=float, default=0.3)
    parser.add_argument(
        "--lengths",
        default=None,
        metavar="NPY",
        help="[N, 2] source / target lengths (a prepared dataset's lengths/train.npy): time "
        "an epoch's shapes instead of --shapes",
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens_per_batch (--lengths)")
    parser.add_argument("--bucket-step", type=int, default=8, help="bucket_step (--lengths)")
    parser.add_argument(
        "--coverage", type=float, default=0.9, help="share of the epoch's batches timed"
    )
    benchlib.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.lengths is not None and not os.path.isfile(args.lengths):
        raise SystemExit(f"--lengths: {args.lengths} does not exist")

    benchlib.configure_host(args)  # before JAX starts
    import jax
    import jax.numpy as jnp

    from distill_jax import optim, sharding, train
    from distill_jax.models.bert import BertConfig, BertModel

    machine = benchlib.machine_info(with_torch=False)
    print(f"machine: {benchlib.describe_machine(machine)}")
    benchlib.warn_if_loaded(machine)
    dtype = jnp.dtype(args.dtype)
    if os.path.isfile(os.path.join(args.checkpoint, "model.safetensors")):
        from distill_jax.hf import load_bert
        from distill_jax.models.bert import init_cmlm_head

        _, weights, config = load_bert(args.checkpoint, cmlm_vocab_size=args.vocab, dtype=dtype)
        teacher_ids = np.random.default_rng(0).integers(1000, config.vocab_size, args.vocab)
        weights = init_cmlm_head(config, weights, teacher_ids, jax.random.PRNGKey(0))
        # Host copies: each side's state gets its own buffers (the step donates them).
        weights = jax.tree.map(np.asarray, weights)
        source = args.checkpoint
    else:
        config = BertConfig(**MINILM_SHAPE, cmlm_vocab_size=args.vocab, dtype=dtype)
        teacher_ids = np.random.default_rng(0).integers(1000, config.vocab_size, args.vocab)
        weights, source = None, "random MiniLM-shaped weights"
    model = BertModel(config)
    print(f"teacher: {source}; C-MLM head over {args.vocab} pieces; compute {args.dtype}")

    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer = optim.make_optimizer(
        optim.OptimizerConfig.teacher(10_000, learning_rate=5e-5, warmup_fraction=0.05)
    )

    def init_params():
        return model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), method="cmlm_logits"
        )["params"]

    # system -> (output-layer form, [(batch, real tokens, weight), ...])
    if args.lengths is None:
        synthetic = [
            (*make_batch(*shape, args.vocab, args.mask_rate, seed=i), 1)
            for i, shape in enumerate(parse_shapes(args.shapes))
        ]
        systems = {"masked": ("masked", synthetic), "all": ("all", synthetic)}
        covered = None
    else:
        entries, covered = epoch_batches(args.lengths, args)
        systems = {"masked": ("masked", entries), "all": ("all", entries)}
    sides, states, flops, first = {}, {}, {}, {}
    for name, (head, entries) in systems.items():
        state, shardings = sharding.create_sharded_state(
            lambda: train.TrainState.create(init_params(), optimizer), mesh
        )
        if weights is not None:
            state = state.replace(params=sharding.place_tree(weights, shardings.params))
        states[name] = state
        loss_fn = train.cmlm_loss_fn(
            model, teacher_ids, cls_id=101, mask_id=103, head_positions=head
        )
        step = train.make_train_step(
            loss_fn,
            optimizer,
            mesh,
            shardings,
            {k: sharding.batch_sharding(mesh) for k in entries[0][0]},
            options=train.StepOptions(compute_dtype=dtype),
        )
        flops[name] = 0.0
        for index, (batch, _, weight) in enumerate(entries):
            device_batch = sharding.shard_batch(batch, mesh)
            compiled = step.lower(state, device_batch, jax.random.PRNGKey(1)).compile()
            flops[name] += weight * (benchlib.jax_compiled_flops(compiled) or 0.0)

            # the executable just compiled (calling ``step`` would compile the shape again)
            def run(name=name, compiled=compiled, device_batch=device_batch):
                states[name], metrics = compiled(states[name], device_batch, jax.random.PRNGKey(1))
                return metrics["loss"]

            sides[f"{name}/{index}"] = (run, benchlib.block)
            if index == 0:  # the first step from the same fresh weights, for the log
                loss_sum, count = run()
                first[name] = float(loss_sum) / float(count)
    print("first-step losses: " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
    timings = benchlib.time_interleaved(sides, warmup=args.warmup, runs=args.runs)
    records = []
    for name, (_, entries) in systems.items():
        parts = [timings[f"{name}/{i}"] for i in range(len(entries))]
        epoch_s = sum(w * t.median_s for (_, _, w), t in zip(entries, parts))
        tokens = sum(w * real for _, real, w in entries)
        records.append(
            {
                "benchmark": "teacher_step",
                "system": name,
                "config": {
                    "shapes": args.shapes if args.lengths is None else covered,
                    "lengths": args.lengths,
                    "tokens_per_batch": args.tokens if args.lengths else None,
                    "vocab": args.vocab,
                    "mask_rate": args.mask_rate,
                    "dtype": args.dtype,
                    "teacher": source,
                },
                "median_s": epoch_s,
                "runs_s": [
                    sum(w * t.runs_s[r] for (_, _, w), t in zip(entries, parts))
                    for r in range(args.runs)
                ],
                "tokens": tokens,
                "throughput": tokens / epoch_s,
                "throughput_unit": "tokens/s",
                "xla_gflop": flops[name] / 1e9,
                "machine": machine,
            }
        )
    reference = next(r for r in records if r["system"] == "all")
    for record in records:
        record["ratio_over_all"] = record["throughput"] / reference["throughput"]
        print(
            f"{record['system']:>6}: {record['throughput']:.0f} tokens/s "
            f"({record['median_s']:.2f} s for {record['tokens']} tokens; XLA counts "
            f"{record['xla_gflop']:.1f} GFLOP); {record['ratio_over_all']:.3f}x all"
        )
    benchlib.write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
