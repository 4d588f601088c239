"""Teacher forward pass: our jitted Flax BERT vs transformers' PyTorch ``BertModel``.

Both sides load the same Hugging Face checkpoint (default: all-MiniLM-L6-v2, 6 layers,
hidden 384, 12 heads, ff 1536) and compute the last hidden states of the same batch in
float32, in one process:

  ours    ``distill_jax.hf.load_bert`` + ``jax.jit(model.apply)`` (deterministic)
  theirs  ``transformers.BertModel.from_pretrained(path, add_pooling_layer=False)``,
          ``eval()``, under ``torch.inference_mode()``, ``torch.set_num_threads(os.cpu_count())``
          and transformers' default attention implementation (printed)

Batch: ``[CLS] a [SEP] b [SEP]`` rows of random WordPiece ids (ids >= 1000, i.e. no
special or unused tokens), token types 0 on ``[CLS] a [SEP]`` and 1 on ``b [SEP]``; most
rows fill the length, ``--padded-rows`` rows are shorter and padded (attention mask 0).

FLOPs per forward pass (padded shapes B x L, hidden h, ff width f, N layers; embeddings,
LayerNorm, softmax and GELU not counted):

  N * [ B*L*(2*4*h*h + 2*2*h*f)      q, k, v, out projections and the two FF matmuls
        + 4*B*L*L*h ]                attention scores and weighted values

Throughput is tokens (B * L, padded) per second. The outputs of both sides are compared
(max absolute difference of the hidden states over all positions) so that the timing
compares the same computation.

``--compiler-option KEY=VALUE`` (repeatable) adds a third side timed in the same rounds: our
forward pass compiled with those XLA options (e.g.
``xla_cpu_experimental_ynn_fusion_type=`` for XLA's CPU dots without YNNPACK), so that a
compiler setting is compared with the default in one process, against the same torch runs.
``--mask-as-select`` adds the same third side for our forward traced with its attention
mask applied as a select (``fast_paths.MASK_BY_BIAS = False``, the form before
2026-12-02) instead of the additive bias of inference calls.

Run: ``python scripts/bench/bench_teacher.py [--lengths 64 128] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

DEFAULT_CHECKPOINT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    ".cache",
    "distill-jax",
    "all-MiniLM-L6-v2",
)
CLS, SEP = 101, 102  # BERT uncased special ids ([PAD] = 0)
FIRST_WORD_ID = 1000  # ids below are [PAD]/[unused*]/[UNK]/[CLS]/[SEP]/[MASK] and symbols


def make_batch(batch: int, length: int, vocab: int, padded_rows: int, seed: int = 0) -> dict:
    """``[CLS] a [SEP] b [SEP]`` rows; the last ``padded_rows`` rows are shorter and padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_WORD_ID, vocab, (batch, length)).astype(np.int32)
    types = np.zeros((batch, length), np.int32)
    mask = np.ones((batch, length), np.int32)
    lengths = np.full(batch, length)
    if padded_rows:
        lengths[-padded_rows:] = rng.integers(length // 4, length, padded_rows)
    for i, n in enumerate(lengths):
        split = max(2, n // 2)  # [CLS] a [SEP] takes positions 0 .. split
        ids[i, 0], ids[i, split], ids[i, n - 1] = CLS, SEP, SEP
        types[i, split + 1 : n] = 1
        ids[i, n:], types[i, n:], mask[i, n:] = 0, 0, 0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def forward_flops(batch: int, length: int, hidden: int, ff: int, layers: int) -> int:
    """The analytic FLOP count of the module docstring."""
    return layers * benchlib.encoder_layer_flops(batch, length, hidden, ff)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="Hugging Face BERT folder")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--padded-rows", type=int, default=4, help="rows shorter than the length")
    parser.add_argument(
        "--attn-implementation",
        default=None,
        help="transformers attention implementation (default: its own choice)",
    )
    parser.add_argument(
        "--compiler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time our forward compiled with these XLA options",
    )
    parser.add_argument(
        "--mask-as-select",
        action="store_true",
        help="also time our forward with the attention mask applied as a "
        "select instead of a bias (fast_paths.MASK_BY_BIAS = False)",
    )
    parser.add_argument(
        "--attention",
        default="einsum",
        choices=("einsum", "xla", "cudnn"),
        help="our attention kernel (BertConfig.attention_impl)",
    )
    benchlib.add_common_args(parser)
    args = parser.parse_args(argv)

    machine, threads, device = benchlib.start_comparison(args)
    peak = machine["matmul_peak_gflops"]
    import jax
    import torch
    import transformers

    from distill_jax.hf import load_bert

    model, params, config = load_bert(
        args.checkpoint, dtype=jax.numpy.dtype(args.dtype), attention_impl=args.attention
    )
    if args.dtype != "float32":  # both sides hold the weights in the compute dtype
        params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    kwargs = {"add_pooling_layer": False}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    torch_model = transformers.BertModel.from_pretrained(args.checkpoint, **kwargs).eval()
    torch_model.to(device, getattr(torch, args.dtype))
    attn_impl = getattr(torch_model.config, "_attn_implementation", "?")
    print(
        f"checkpoint: {args.checkpoint} (layers {config.num_hidden_layers}, hidden "
        f"{config.hidden_size}, heads {config.num_attention_heads}, ff "
        f"{config.intermediate_size}); transformers attention: {attn_impl}"
    )

    def apply(params, input_ids, token_type_ids, attention_mask):
        return model.apply(
            {"params": params}, input_ids, token_type_ids, attention_mask, deterministic=True
        )  # [batch, length, hidden]

    forward = jax.jit(apply)
    options = benchlib.parse_compiler_options(args.compiler_option)
    if options and args.mask_as_select:
        parser.error(
            "--compiler-option and --mask-as-select both add the third side; give one of them"
        )
    variant = jax.jit(apply, compiler_options=options) if options else None
    variant_label = benchlib.describe_options(options)
    if args.mask_as_select:
        from distill_jax.models import fast_paths

        variant_label = "attention mask as a select"

        def select_variant(*jax_args):
            """Our forward traced and compiled with fast_paths.MASK_BY_BIAS off."""

            def fresh(*a):  # a new function, so that jit does not reuse apply's trace
                return apply(*a)

            fast_paths.MASK_BY_BIAS = False
            try:
                return jax.jit(fresh).lower(*jax_args).compile()
            finally:
                fast_paths.MASK_BY_BIAS = True

    records = []
    for length in args.lengths:
        batch = make_batch(args.batch, length, config.vocab_size, args.padded_rows)
        shapes = {
            "batch": args.batch,
            "length": length,
            "padded_rows": args.padded_rows,
            "real_tokens": int(batch["attention_mask"].sum()),
            "dtype": args.dtype,
            "attention_impl": args.attention,
            "checkpoint": os.path.basename(os.path.normpath(args.checkpoint)),
        }
        flops = forward_flops(
            args.batch,
            length,
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
        )
        tokens = args.batch * length

        jax_batch = {k: jax.device_put(v) for k, v in batch.items()}
        jax_args = (
            params,
            jax_batch["input_ids"],
            jax_batch["token_type_ids"],
            jax_batch["attention_mask"],
        )
        forward_compiled = forward.lower(*jax_args).compile()
        xla_flops = benchlib.jax_compiled_flops(forward_compiled)
        if args.mask_as_select:
            variant = select_variant(*jax_args)
            if variant.as_text() == forward_compiled.as_text():
                raise SystemExit("--mask-as-select compiled the same program as the default")
        torch_batch = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in batch.items()}

        def torch_forward(torch_batch=torch_batch):
            with torch.inference_mode():
                return torch_model(**torch_batch).last_hidden_state

        sides = {
            f"ours   L={length}": (lambda a=jax_args: forward(*a), benchlib.block),
            f"theirs L={length}": (torch_forward, benchlib.torch_sync),
        }
        if variant is not None:
            sides[f"ours ({variant_label}) L={length}"] = (
                lambda f=variant, a=jax_args: f(*a),
                benchlib.block,
            )
        timings = benchlib.time_interleaved(sides, warmup=args.warmup, runs=args.runs)
        ours, theirs = list(timings.values())[:2]

        ours_out = np.asarray(forward(*jax_args), np.float32)
        theirs_out = torch_forward().float().cpu().numpy()
        real = batch["attention_mask"].astype(bool)
        diff_all = float(np.max(np.abs(ours_out - theirs_out)))
        diff_real = float(np.max(np.abs(ours_out - theirs_out)[real]))
        print(
            f"L={length}: max |ours - torch| = {diff_real:.2e} on real tokens, "
            f"{diff_all:.2e} on all positions; analytic {flops / 1e9:.2f} GFLOP, "
            f"XLA cost_analysis {xla_flops / 1e9 if xla_flops else float('nan'):.2f} GFLOP"
        )

        common = dict(
            benchmark="teacher_forward",
            config=shapes,
            flops=flops,
            items=tokens,
            item_unit="tokens",
            peak_gflops=peak,
            machine=machine,
        )
        ours_rec = benchlib.make_record(
            system="distill-jax (jax.jit Flax BERT"
            + (f", {args.attention} attention)" if args.attention != "einsum" else ")"),
            timing=ours,
            extra={
                "max_abs_diff": diff_real,
                "max_abs_diff_all_positions": diff_all,
                "xla_cost_analysis_gflop": xla_flops / 1e9 if xla_flops else None,
            },
            **common,
        )
        theirs_rec = benchlib.make_record(
            system=f"transformers BertModel (torch, {attn_impl})",
            timing=theirs,
            extra={"max_abs_diff": diff_real, "torch_threads": threads, "torch_device": device},
            **common,
        )
        benchlib.add_ratio(ours_rec, theirs_rec)
        records += [ours_rec, theirs_rec]
        if variant is not None:
            variant_out = np.asarray(variant(*jax_args), np.float32)
            variant_rec = benchlib.make_record(
                system=(
                    f"distill-jax, compiled with {variant_label}"
                    if options
                    else f"distill-jax, {variant_label}"
                ),
                timing=list(timings.values())[2],
                extra={
                    "compiler_options": options,
                    "mask_as_select": args.mask_as_select,
                    "max_abs_diff": float(np.max(np.abs(variant_out - theirs_out)[real])),
                },
                **common,
            )
            # (not add_ratio: the torch record keeps the default side's ratio)
            variant_rec["ratio_ours_over_theirs"] = (
                variant_rec["throughput"] / theirs_rec["throughput"]
            )
            records.append(variant_rec)

    benchlib.finish(records, args.json, lambda c: f"B{c['batch']} x L{c['length']}")


if __name__ == "__main__":
    main()
