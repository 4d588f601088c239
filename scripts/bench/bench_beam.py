"""Beam search: our jitted ``decode.beam_search`` vs transformers' ``MarianMTModel.generate``.

Both sides decode the same batch of sources (``--batch`` x ``--src-len``, a few rows
padded) with beam 5 and randomly initialised models of the same dimensions (post-LN
Transformer, d 512, 6 + 6 layers, 8 heads, ff 2048, ReLU, shared and tied embeddings
scaled by sqrt(d), sinusoidal positions, vocabulary ``--vocab``), float32, in one process:

  ours    ``distill_jax.decode.beam_search(model, params, src, beam_size=5,
          length_penalty=0.6, max_len=N)``: jitted ``lax.while_loop``s with a key/value
          cache that grows between decoding phases (``cache_phases``, default 4)
  theirs  ``MarianMTModel(MarianConfig(...)).eval().generate(input_ids, attention_mask,
          num_beams=5, do_sample=False, length_penalty=0.6, min_new_tokens=N,
          max_new_tokens=N, suppress_tokens=[pad, bos])`` (its key/value cache, eager),
          ``torch.set_num_threads(os.cpu_count())``

Both must generate exactly N tokens for every sentence, and this is forced so:

  ours    the model's ``eos_id`` is set to its ``bos_id`` (``TransformerConfig(eos_id=1)``).
          ``beam_search`` never generates BOS (its log-probability is -inf), so no
          hypothesis can finish before the length bound N: every sentence runs all N
          steps, and all 5 finished hypotheses have N tokens. The computation per step is
          unchanged (the EOS test still runs, it is just never true).
  theirs  ``min_new_tokens=N`` (transformers' ``MinNewTokensLengthLogitsProcessor`` sets
          the EOS logit to -inf while fewer than N tokens were generated) with
          ``max_new_tokens=N``; ``forced_eos_token_id=None`` so that the last token is not
          replaced by EOS. ``suppress_tokens=[pad, bos]`` mirrors our search, which never
          generates pad or BOS.

The script checks that every returned sequence holds N generated tokens with no EOS and
no padding (ours: ``[batch, beams, N]``; theirs: ``[batch, 1 + N]``, the decoder start
token first).

FLOPs per call (B sentences, k beams, n = B*k hypotheses, S source positions, N steps,
d width, f ff width, V vocabulary, Le / Ld layers; element-wise work, top-k and cache
reordering not counted):

  encoder            Le * [ B*S*(2*4*d*d + 2*2*d*f) + 4*B*S*S*d ]
  cross keys/values  Ld * n*S*2*2*d*d                   (on the beam-expanded encoder output)
  step t = 0..N-1    Ld * [ n*(2*4*d*d + 2*2*d*d + 2*2*d*f)      self q,k,v,o; cross q,o; ff
                            + 4*n*(t+1)*d + 4*n*S*d ]           self-attention over t+1 keys, cross
                     + 2*n*d*V                                  output projection

(our cache attends over all the slots the current phase's cache has, masked; the count
above is the work both need). Throughput: sentences/s and generated tokens/s (B * N per call).

Run: ``python scripts/bench/bench_beam.py [--batch 32 --src-len 32 --new-tokens 32] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

PAD, BOS, EOS, FIRST_PIECE = 0, 1, 2, 4


def make_sources(
    batch: int, src_len: int, vocab: int, padded_rows: int, seed: int = 0
) -> np.ndarray:
    """[batch, src_len] int32 sources ending in EOS; the last ``padded_rows`` rows are padded."""
    rng = np.random.default_rng(seed)
    src = rng.integers(FIRST_PIECE, vocab, (batch, src_len)).astype(np.int32)
    lengths = np.full(batch, src_len)
    if padded_rows:
        lengths[-padded_rows:] = rng.integers(max(2, src_len // 4), src_len, padded_rows)
    for i, n in enumerate(lengths):
        src[i, n - 1] = EOS
        src[i, n:] = PAD
    return src


def beam_flops(batch: int, beams: int, src_len: int, steps: int, cfg) -> int:
    """The analytic FLOP count of the module docstring for the student ``cfg`` (a
    ``TransformerConfig``)."""
    d, ff = cfg.d_model, cfg.mlp_dim
    n = batch * beams
    total = cfg.num_encoder_layers * benchlib.encoder_layer_flops(batch, src_len, d, ff)
    total += cfg.num_decoder_layers * 2 * benchlib.dense_flops(n * src_len, d, d)
    for t in range(steps):
        total += cfg.num_decoder_layers * benchlib.decoder_layer_flops(n, 1, t + 1, src_len, d, ff)
        total += benchlib.dense_flops(n, d, cfg.vocab_size)
    return total


def make_model(args):
    """Our randomly initialised student of the benchmark's dimensions, with EOS = BOS (so
    that beam search never finishes a hypothesis early): (model, params)."""
    import jax.numpy as jnp

    cfg = benchlib.transformer_config(
        args,
        dropout_rate=0.3,
        max_len=max(args.src_len, args.new_tokens),
        pad_id=PAD,
        bos_id=BOS,
        eos_id=BOS,
        dtype=jnp.dtype(args.dtype),
    )
    return benchlib.init_transformer(cfg)


def compile_search(model, params, src, args, options=None, **kwargs):
    """Our beam search over ``src`` as the flags of ``add_shape_args`` set it (``--beams``,
    ``--length-penalty``, N = ``--new-tokens`` steps; ``kwargs`` go to ``beam_search``),
    compiled with the XLA ``options``: (compiled search, seconds to lower, seconds to
    compile)."""
    from distill_jax import decode

    start = time.perf_counter()
    lowered = decode.beam_search.lower(
        model,
        params,
        src,
        beam_size=args.beams,
        length_penalty=args.length_penalty,
        max_len=args.new_tokens,
        **kwargs,
    )
    lowered_at = time.perf_counter()
    compiled = lowered.compile(compiler_options=options or None)
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def add_shape_args(parser) -> None:
    """The decoding problem's shapes and the model's dimensions."""
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="N, generated per sentence")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--padded-rows", type=int, default=4)
    benchlib.add_student_args(parser)
    parser.add_argument("--length-penalty", type=float, default=0.6)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument(
        "--compiler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time our search compiled with these XLA options (a third "
        "side in the same rounds)",
    )
    parser.add_argument(
        "--cache-phases",
        type=int,
        default=None,
        metavar="N",
        help="the variant side (with or without --compiler-option) decodes "
        "with beam_search(cache_phases=N) (default: the library's)",
    )
    # the output check below is one more untimed call of each side
    benchlib.add_common_args(parser, warmup=1)
    args = parser.parse_args(argv)
    steps = args.new_tokens

    machine, threads, device = benchlib.start_comparison(args)
    peak = machine["matmul_peak_gflops"]
    import jax
    import torch
    import transformers

    src_np = make_sources(args.batch, args.src_len, args.vocab, args.padded_rows)

    # ---- ours: EOS = BOS, which beam_search never generates -> always N tokens
    model, params = make_model(args)
    src = jax.device_put(src_np)
    ours_compiled, *ours_compile_s = compile_search(model, params, src, args)
    print(f"ours: lowered in {ours_compile_s[0]:.1f} s, compiled in {ours_compile_s[1]:.1f} s")

    def ours_search():
        return ours_compiled(params, src)

    # ---- theirs: a random Marian model of the same size
    marian_cfg = transformers.MarianConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=args.heads,
        decoder_attention_heads=args.heads,
        encoder_ffn_dim=args.mlp_dim,
        decoder_ffn_dim=args.mlp_dim,
        activation_function="relu",
        dropout=0.3,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=max(args.src_len, steps + 1),
        scale_embedding=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    marian = transformers.MarianMTModel(marian_cfg).eval().to(device, getattr(torch, args.dtype))
    attn_impl = getattr(marian.config, "_attn_implementation", "?")
    input_ids = torch.from_numpy(src_np.astype(np.int64)).to(device)
    attention_mask = (input_ids != PAD).long()

    def theirs_search():
        with torch.inference_mode():
            return marian.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=args.beams,
                do_sample=False,
                length_penalty=args.length_penalty,
                min_new_tokens=steps,
                max_new_tokens=steps,
                suppress_tokens=[PAD, BOS],
                num_return_sequences=1,
            )

    # ---- both generate exactly N tokens
    ours_seqs, ours_scores = jax.device_get(ours_search())  # [B, beams, N], [B, beams]
    theirs_seqs = theirs_search().cpu().numpy()  # [B, 1 + N]
    assert ours_seqs.shape == (args.batch, args.beams, steps), ours_seqs.shape
    assert np.all(np.isfinite(ours_scores)), "ours: a beam slot is empty"
    assert not np.isin(ours_seqs, [PAD, BOS, EOS]).any(), "ours: pad/bos/eos generated"
    assert theirs_seqs.shape == (args.batch, 1 + steps), theirs_seqs.shape
    assert not np.isin(theirs_seqs[:, 1:], [PAD, BOS, EOS]).any(), "theirs: pad/bos/eos generated"
    print(
        f"both generate exactly N={steps} tokens per sentence: ours {ours_seqs.shape} "
        f"[batch, beams, N], theirs {theirs_seqs.shape} [batch, 1 + N] "
        f"(transformers attention: {attn_impl})"
    )

    sides = {"ours": (ours_search, benchlib.block), "theirs": (theirs_search, benchlib.torch_sync)}
    options = benchlib.parse_compiler_options(args.compiler_option)
    phases = {} if args.cache_phases is None else {"cache_phases": args.cache_phases}
    variant_name = ", ".join(
        ([f"compiled with {benchlib.describe_options(options)}"] if options else [])
        + ([f"cache_phases={args.cache_phases}"] if phases else [])
    )
    if variant_name:
        variant, *variant_compile_s = compile_search(model, params, src, args, options, **phases)
        variant_seqs, _ = jax.device_get(variant(params, src))
        print(
            f"{variant_name}: lowered in {variant_compile_s[0]:.1f} s, compiled in "
            f"{variant_compile_s[1]:.1f} s; same sequences as the default program: "
            f"{bool(np.array_equal(variant_seqs, ours_seqs))}"
        )
        sides["variant"] = (lambda: variant(params, src), benchlib.block)
    timings = benchlib.time_interleaved(sides, warmup=args.warmup, runs=args.runs)
    ours, theirs = timings["ours"], timings["theirs"]

    flops = beam_flops(args.batch, args.beams, args.src_len, steps, model.config)
    print(f"analytic {flops / 1e9:.1f} GFLOP per call")
    shapes = {
        "batch": args.batch,
        "beams": args.beams,
        "src_len": args.src_len,
        "new_tokens": steps,
        "vocab": args.vocab,
        "padded_rows": args.padded_rows,
        "d_model": args.d_model,
        "mlp_dim": args.mlp_dim,
        "heads": args.heads,
        "layers": args.layers,
        "length_penalty": args.length_penalty,
        "dtype": args.dtype,
    }
    common = dict(
        benchmark="beam_search",
        config=shapes,
        flops=flops,
        items=args.batch * steps,
        item_unit="tokens",
        peak_gflops=peak,
        machine=machine,
    )
    ours_rec = benchlib.make_record(
        system="distill-jax decode.beam_search (jit)",
        timing=ours,
        extra={
            "sentences_per_s": args.batch / ours.median_s,
            "lower_s": ours_compile_s[0],
            "compile_s": ours_compile_s[1],
            "forcing": "TransformerConfig(eos_id=bos_id): EOS is never generated",
        },
        **common,
    )
    theirs_rec = benchlib.make_record(
        system=f"transformers MarianMTModel.generate (torch, {attn_impl})",
        timing=theirs,
        extra={
            "sentences_per_s": args.batch / theirs.median_s,
            "torch_threads": threads,
            "torch_device": device,
            "forcing": "min_new_tokens=max_new_tokens=N, forced_eos_token_id=None",
        },
        **common,
    )
    benchlib.add_ratio(ours_rec, theirs_rec)
    records = [ours_rec, theirs_rec]
    if variant_name:
        variant_rec = benchlib.make_record(
            system=f"distill-jax beam_search, {variant_name}",
            timing=timings["variant"],
            extra={
                "sentences_per_s": args.batch / timings["variant"].median_s,
                "lower_s": variant_compile_s[0],
                "compile_s": variant_compile_s[1],
                "compiler_options": options,
                **phases,
            },
            **common,
        )
        variant_rec["ratio_ours_over_theirs"] = variant_rec["throughput"] / theirs_rec["throughput"]
        records.append(variant_rec)

    def table():  # the default table with sentences/s beside tokens/s
        return benchlib.markdown_table(
            (
                "config",
                "system",
                "median ms",
                "sentences/s",
                "tokens/s",
                "GFLOP/s",
                "util. of peak",
                "ours/theirs",
            ),
            [
                [
                    f"B{args.batch} k{args.beams} S{args.src_len} N{steps} V{args.vocab}",
                    r["system"],
                    r["median_s"] * 1e3,
                    r["sentences_per_s"],
                    r["throughput"],
                    r["gflop_per_s"],
                    f"{100 * r['utilisation']:.1f}%",
                    f"{r['ratio_ours_over_theirs']:.2f}x",
                ]
                for r in records
            ],
        )

    benchlib.finish(records, args.json, table=table)


if __name__ == "__main__":
    main()
