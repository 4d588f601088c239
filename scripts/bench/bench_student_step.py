"""Student train step: our jitted sharded step vs a PyTorch reference of the same model.

Both sides train the reference student (IWSLT config: post-LN Transformer, 6 + 6 layers,
d 512, ff 2048, 8 heads, shared source/target/output embeddings, sinusoidal positions,
dropout 0.3) with the reference objective (label smoothing 0.1 + "paper" distillation
from top-K = 8 offline teacher logits, alpha 0.5, T 10) and Adam (0.9, 0.98) with the
inverse-sqrt schedule, on the same float32 batch, in one process. One timed run is one
full update: forward, backward, optimizer.

  ours    ``train.student_loss_fn`` + ``train.make_train_step`` (one ``jax.jit`` with
          shardings and a donated state) on a 1-device mesh, state from
          ``sharding.create_sharded_state``, optimizer ``optim.OptimizerConfig.student()``
  theirs  ``scripts/bench/torch_student.py``: ``nn.TransformerEncoderLayer`` /
          ``nn.TransformerDecoderLayer`` (eager), the same loss, ``torch.optim.Adam``
          (``--torch-adam``, default the fused CPU kernel) + ``LambdaLR``,
          ``torch.set_num_threads(os.cpu_count())``

Before timing, the torch model receives our initial parameters and both sides compute
the loss and the gradient norm of the same batch without dropout; the differences are
printed (they must be at float32 rounding level).

Batch: ``--batch`` sentences, ``--src-len`` source and ``--tgt-len`` target positions,
vocabulary ``--vocab`` (default 32 x 32 x 32, 10,000: an IWSLT-sized joint vocabulary);
``--padded-rows`` rows are shorter and padded.

FLOPs per step (padded shapes; B batch, S source and T target positions, d width, f ff
width, V vocabulary, Le / Ld layers; element-wise work not counted):

  forward = Le * [ B*S*(2*4*d*d + 2*2*d*f) + 4*B*S*S*d ]                 encoder
          + Ld * [ B*T*(2*4*d*d + 2*2*d*d + 2*2*d*f) + B*S*2*2*d*d         decoder: self q,k,v,o;
                   + 4*B*T*T*d + 4*B*T*S*d ]                               cross q,o; ff; cross k,v
          + 2*B*T*d*V                                                      output projection
  step    = 3 * forward      (the backward pass is two matmuls per forward matmul)

i.e. ~6 x (non-embedding parameters) x tokens + attention + output-projection terms.
Throughput is target tokens (B * T, padded) per second.

Run: ``python scripts/bench/bench_student_step.py [--batch 32 --src-len 32 --tgt-len 32] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

PAD, BOS, EOS, FIRST_PIECE = 0, 1, 2, 4


def make_batch(
    batch: int, src_len: int, tgt_len: int, vocab: int, top_k: int, padded_rows: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A student batch (``docs/interfaces.md``) with offline top-K teacher logits."""
    rng = np.random.default_rng(seed)
    src = rng.integers(FIRST_PIECE, vocab, (batch, src_len)).astype(np.int32)
    tgt = rng.integers(FIRST_PIECE, vocab, (batch, tgt_len + 1)).astype(np.int32)
    src_lengths = np.full(batch, src_len)
    tgt_lengths = np.full(batch, tgt_len)  # tokens of tgt_out, EOS included
    if padded_rows:
        src_lengths[-padded_rows:] = rng.integers(max(2, src_len // 4), src_len, padded_rows)
        tgt_lengths[-padded_rows:] = rng.integers(max(2, tgt_len // 4), tgt_len, padded_rows)
    for i in range(batch):
        src[i, src_lengths[i] - 1] = EOS
        src[i, src_lengths[i] :] = PAD
        tgt[i, 0] = BOS
        tgt[i, tgt_lengths[i]] = EOS
        tgt[i, tgt_lengths[i] + 1 :] = PAD
    tgt_in, tgt_out = tgt[:, :-1].copy(), tgt[:, 1:].copy()
    tgt_in[tgt_out == PAD] = PAD
    # Top-K teacher logits, sorted, with the reference token among the K entries.
    kd_logits = -np.sort(-rng.normal(size=(batch, tgt_len, top_k)) * 3.0, axis=-1)
    kd_indices = rng.integers(FIRST_PIECE, vocab, (batch, tgt_len, top_k))
    kd_indices[..., 0] = np.maximum(tgt_out, FIRST_PIECE)
    return {
        "src": src,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "kd_logits": kd_logits.astype(np.float32),
        "kd_indices": kd_indices.astype(np.int32),
    }


# The student loss both sides compute (``train.StudentLossConfig``'s fields).
LOSS = dict(alpha=0.5, label_smoothing=0.1, kd_mode="paper", temperature=10.0)


def our_step(cfg, batch_np: dict, compute_dtype):
    """Our side on a 1-device mesh: (initial state, loss function, sharded batch, jitted
    step) for the student ``cfg`` with ``benchlib.init_student``'s optimizer and ``LOSS``."""
    from distill_jax import sharding, train

    mesh = benchlib.one_device_mesh()
    model, optimizer, state, state_shardings = benchlib.init_student(cfg, mesh)
    loss_fn = train.student_loss_fn(model, train.StudentLossConfig(**LOSS))
    step = train.make_train_step(
        loss_fn,
        optimizer,
        mesh,
        state_shardings,
        sharding.batch_shardings(batch_np, mesh),
        options=train.StepOptions(compute_dtype=compute_dtype),
    )
    return state, loss_fn, sharding.shard_batch(batch_np, mesh), step


def step_flops(batch: int, src_len: int, tgt_len: int, cfg) -> int:
    """The analytic FLOP count of one update (module docstring) of the student ``cfg`` (a
    ``TransformerConfig``)."""
    d, ff = cfg.d_model, cfg.mlp_dim
    encoder = cfg.num_encoder_layers * benchlib.encoder_layer_flops(batch, src_len, d, ff)
    decoder = cfg.num_decoder_layers * (
        benchlib.decoder_layer_flops(batch, tgt_len, tgt_len, src_len, d, ff)
        + 2 * benchlib.dense_flops(batch * src_len, d, d)  # cross-attention keys and values
    )
    output = benchlib.dense_flops(batch * tgt_len, d, cfg.vocab_size)
    return 3 * (encoder + decoder + output)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--tgt-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--padded-rows", type=int, default=4)
    benchlib.add_student_args(parser)
    parser.add_argument("--torch-adam", choices=("fused", "foreach", "for-loop"), default="fused")
    parser.add_argument("--dropout", type=float, default=0.3, help="both sides' dropout rate")
    parser.add_argument(
        "--attention",
        default="einsum",
        choices=("einsum", "xla"),
        help="our attention kernel (TransformerConfig.attention_impl)",
    )
    parser.add_argument(
        "--prng-impl",
        default=None,
        choices=("threefry2x32", "rbg", "unsafe_rbg"),
        help="JAX's default PRNG (our dropout masks; default: JAX's threefry)",
    )
    benchlib.add_common_args(parser)
    args = parser.parse_args(argv)

    import jax

    if args.prng_impl:  # before the first random draw (the matmul peak's); starts no backend
        jax.config.update("jax_default_prng_impl", args.prng_impl)
    machine, threads, device = benchlib.start_comparison(args)
    import jax.numpy as jnp
    import torch

    from distill_jax import optim, train

    import torch_student

    compute_dtype = jnp.dtype(args.dtype)
    torch_dtype = getattr(torch, args.dtype)
    peak = machine["matmul_peak_gflops"]

    cfg = benchlib.transformer_config(
        args,
        dropout_rate=args.dropout,
        max_len=max(args.src_len, args.tgt_len),
        dtype=compute_dtype,
        attention_impl=args.attention,
    )
    opt_cfg = optim.OptimizerConfig.student()  # Adam (0.9, 0.98), inverse-sqrt, warm-up 4000
    batch_np = make_batch(
        args.batch, args.src_len, args.tgt_len, args.vocab, args.top_k, args.padded_rows
    )

    # ---- ours
    # optimizer: opt_cfg's Adam (optim.OptimizerConfig.student())
    state, loss_fn, batch, step = our_step(cfg, batch_np, compute_dtype)
    rng = jax.random.PRNGKey(1)

    # ---- theirs, with our initial parameters
    torch_model = torch_student.TorchStudent(
        args.vocab,
        args.d_model,
        args.heads,
        args.mlp_dim,
        args.layers,
        args.layers,
        dropout=args.dropout,
        max_len=cfg.max_len,
    )
    torch_student.load_flax_params(torch_model, jax.tree.map(np.asarray, state.params))
    torch_model.to(device)
    torch_batch = {
        k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v).to(device)
        for k, v in batch_np.items()
    }
    loss_kwargs = {k: v for k, v in LOSS.items() if k != "kd_mode"}

    # ---- same computation: loss and gradient norm without dropout
    def ours_eval(params):
        loss_sum, metrics = loss_fn(train.cast_floats(params, compute_dtype), batch, None)
        return loss_sum / metrics["loss"][1]

    ours_loss, ours_grads = jax.jit(jax.value_and_grad(ours_eval))(state.params)
    ours_norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(ours_grads))))
    torch_model.eval()
    with torch_student.autocast(device, torch_dtype):
        logits = torch_model(torch_batch["src"], torch_batch["tgt_in"])
        metrics = torch_student.combined_loss(
            logits,
            torch_batch["tgt_out"],
            torch_batch["kd_logits"],
            torch_batch["kd_indices"],
            **loss_kwargs,
        )
    torch_loss_tensor = metrics["loss"] / metrics["tokens"]
    torch_loss_tensor.backward()
    torch_loss = torch_loss_tensor.item()
    torch_norm = float(torch_student.grad_norm(torch_model))
    torch_model.zero_grad(set_to_none=True)
    print(
        f"no-dropout check: loss ours {float(ours_loss):.6f} torch {torch_loss:.6f} "
        f"(|diff| {abs(float(ours_loss) - torch_loss):.1e}); grad norm ours "
        f"{ours_norm:.6f} torch {torch_norm:.6f} (rel diff "
        f"{abs(ours_norm - torch_norm) / torch_norm:.1e})"
    )
    torch_model.train()
    torch_optimizer, torch_schedule = torch_student.make_optimizer(
        torch_model,
        learning_rate=opt_cfg.learning_rate,
        warmup_steps=opt_cfg.warmup_steps,
        implementation=args.torch_adam,
    )

    flops = step_flops(args.batch, args.src_len, args.tgt_len, cfg)
    xla_flops = benchlib.jax_compiled_flops(step.lower(state, batch, rng).compile())
    non_embedding = torch_student.count_parameters(torch_model, exclude=torch_model.embedding)
    print(
        f"parameters: {non_embedding / 1e6:.1f}M non-embedding + "
        f"{args.vocab * args.d_model / 1e6:.1f}M embedding; analytic "
        f"{flops / 1e9:.1f} GFLOP/step, XLA cost_analysis "
        f"{xla_flops / 1e9 if xla_flops else float('nan'):.1f} GFLOP/step"
    )

    holder = {"state": state}

    def ours_step():
        holder["state"], metrics = step(holder["state"], batch, rng)
        return holder["state"], metrics

    def theirs_step():
        return torch_student.train_step(
            torch_model,
            torch_optimizer,
            torch_schedule,
            torch_batch,
            compute_dtype=torch_dtype,
            **loss_kwargs,
        )

    ours, theirs = benchlib.time_interleaved(
        {"ours": (ours_step, benchlib.block), "theirs": (theirs_step, benchlib.torch_sync)},
        warmup=args.warmup,
        runs=args.runs,
    ).values()

    shapes = {
        "batch": args.batch,
        "src_len": args.src_len,
        "tgt_len": args.tgt_len,
        "vocab": args.vocab,
        "top_k": args.top_k,
        "padded_rows": args.padded_rows,
        "d_model": args.d_model,
        "mlp_dim": args.mlp_dim,
        "heads": args.heads,
        "layers": args.layers,
        "dropout": args.dropout,
        "dtype": args.dtype,
        "prng_impl": args.prng_impl or "threefry2x32 (default)",
        "attention_impl": args.attention,
        "real_target_tokens": int((batch_np["tgt_out"] != PAD).sum()),
    }
    common = dict(
        benchmark="student_train_step",
        config=shapes,
        flops=flops,
        items=args.batch * args.tgt_len,
        item_unit="target tokens",
        peak_gflops=peak,
        machine=machine,
    )
    check = {
        "loss_ours": float(ours_loss),
        "loss_torch": torch_loss,
        "grad_norm_ours": ours_norm,
        "grad_norm_torch": torch_norm,
    }
    ours_rec = benchlib.make_record(
        system="distill-jax (jitted train step, 1-device mesh"
        + (f", {args.attention} attention)" if args.attention != "einsum" else ")"),
        timing=ours,
        extra={**check, "xla_cost_analysis_gflop": xla_flops / 1e9 if xla_flops else None},
        **common,
    )
    theirs_rec = benchlib.make_record(
        system=f"torch nn.Transformer*Layer eager, Adam {args.torch_adam}"
        + (f", autocast {args.dtype}" if args.dtype != "float32" else ""),
        timing=theirs,
        extra={**check, "torch_threads": threads, "torch_device": device},
        **common,
    )
    benchlib.add_ratio(ours_rec, theirs_rec)
    records = [ours_rec, theirs_rec]
    benchlib.finish(
        records, args.json, lambda c: f"B{c['batch']} S{c['src_len']} T{c['tgt_len']} V{c['vocab']}"
    )


if __name__ == "__main__":
    main()
