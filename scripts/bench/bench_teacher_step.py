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

Batches: one per ``--shapes`` entry ``ROWSxSxT`` (padded shapes of the pipeline's
token-budget buckets; the defaults are two of ``configs/multi30k_full.py``'s 2,048-token
buckets), real lengths drawn uniformly from the bucket's range, C-MLM masks as the pipeline
draws them at ``--mask-rate`` (the full config's 0.3). A run is one step on each batch;
throughput counts real (source + target) tokens per second. Dropout is on, as in
fine-tuning.

Run: ``python scripts/bench/bench_teacher_step.py [--runs 7] [--json results/bench_teacher_step.json]``.
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
    benchlib.add_common_args(parser)
    args = parser.parse_args(argv)

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

    batches = [
        make_batch(*shape, args.vocab, args.mask_rate, seed=i)
        for i, shape in enumerate(parse_shapes(args.shapes))
    ]
    tokens = sum(real for _, real in batches)
    sides, states, flops = {}, {}, {}
    for head in ("masked", "all"):
        state, shardings = sharding.create_sharded_state(
            lambda: train.TrainState.create(init_params(), optimizer), mesh
        )
        if weights is not None:
            state = state.replace(params=sharding.place_tree(weights, shardings.params))
        loss_fn = train.cmlm_loss_fn(
            model, teacher_ids, cls_id=101, mask_id=103, head_positions=head
        )
        step = train.make_train_step(
            loss_fn,
            optimizer,
            mesh,
            shardings,
            {k: sharding.batch_sharding(mesh) for k in batches[0][0]},
            options=train.StepOptions(compute_dtype=dtype),
        )
        device_batches = [sharding.shard_batch(b, mesh) for b, _ in batches]
        states[head] = state
        flops[head] = sum(
            benchlib.jax_compiled_flops(step.lower(state, b, jax.random.PRNGKey(1)).compile())
            or 0.0
            for b in device_batches
        )

        def run(head=head, step=step, device_batches=device_batches):
            losses = []
            for batch in device_batches:
                states[head], metrics = step(states[head], batch, jax.random.PRNGKey(1))
                losses.append(metrics["loss"])
            return losses

        sides[head] = (run, benchlib.block)
    # The two sides compute the same loss on the same first step (fresh states).
    first = {head: [float(s) / float(c) for s, c in fn()] for head, (fn, _) in sides.items()}
    print(
        "first-step losses (masked / all): "
        + ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(first["masked"], first["all"]))
    )
    timings = benchlib.time_interleaved(sides, warmup=args.warmup, runs=args.runs)
    records = []
    for head, timing in timings.items():
        records.append(
            {
                "benchmark": "teacher_step",
                "system": head,
                "config": {
                    "shapes": args.shapes,
                    "vocab": args.vocab,
                    "mask_rate": args.mask_rate,
                    "dtype": args.dtype,
                    "teacher": source,
                },
                "median_s": timing.median_s,
                "min_s": timing.min_s,
                "runs_s": timing.runs_s,
                "throughput": tokens / timing.median_s,
                "throughput_unit": "tokens/s",
                "xla_gflop": flops[head] / 1e9,
                "machine": machine,
            }
        )
    ratio = records[0]["throughput"] / records[1]["throughput"]
    for record in records:
        record["ratio_masked_over_all"] = ratio
    for record in records:
        print(
            f"{record['system']:>6}: {record['throughput']:.0f} tokens/s "
            f"(median {1e3 * record['median_s']:.0f} ms for {tokens} tokens; XLA counts "
            f"{record['xla_gflop']:.1f} GFLOP)"
        )
    print(f"masked / all: {ratio:.3f}x")
    benchlib.write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
