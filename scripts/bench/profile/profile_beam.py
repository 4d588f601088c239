"""Where our jitted beam search spends its time on a CPU, grouped by what each op computes.

Builds the same model and sources as ``scripts/bench/bench_beam.py`` (random post-LN student,
d 512, 6 + 6 layers, vocabulary 10k, EOS = BOS so that every sentence runs all N steps),
compiles ``decode.beam_search``, runs it ``--warmup`` times, then ``--calls`` times under
``jax.profiler.trace`` and prints the XLA thunks of the host trace, mapped to the
``op_name`` of the compiled module (``layer_3`` -> ``layer_N``), in ms per call:

  * the largest ops, one row each (``--top``);
  * the same time grouped by what it computes: the decoder's self-attention core over the
    key/value cache (scores, mask, softmax, weighted sum), the cache writes, the copies
    that grow the cache between decoding phases, the cross-attention core, the dense layers of the decoder step, the output projection,
    LayerNorm and residuals, beam bookkeeping (top-k, scores, ancestry), and the encoder
    with the cross-attention keys/values (computed once per call).

The trace's thunk durations add up to about the call's wall time on this backend (one
thunk at a time on the main thread; each thunk uses the intra-op thread pool). Cache
slots grow with ``--new-tokens`` (``max_len * beams`` slots per sentence, or per phase
``end * beams``), so running the script for several N with ``--cache-phases 1`` shows how
the self-attention core scales with the cache.

Run: ``python scripts/bench/profile/profile_beam.py [--new-tokens 32] [--cache-phases N]
[--compiler-option KEY=VALUE]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_beam  # noqa: E402
import benchlib  # noqa: E402

# (group, predicate on the op_name, whether it runs once per decoder layer and step);
# the first match wins, in this order.
GROUPS = (
    (
        "encoder + cross keys/values (once per call)",
        lambda op: "Transformer.encode" in op or "_cross_attention_cache" in op,
        False,
    ),
    ("self-attention cache write", lambda op: "_self_attention_cache" in op, True),
    ("cache growth between decoding phases", lambda op: op.startswith("grow_cache/"), False),
    (
        "self-attention core (scores, mask, softmax, weighted sum)",
        lambda op: "self_attention._attend" in op and "_output" not in op,
        True,
    ),
    (
        "cross-attention core",
        lambda op: "cross_attention._attend" in op and "_output" not in op,
        True,
    ),
    (
        "decoder dense layers (q/k/v, out, feed-forward)",
        lambda op: "/dot_general" in op and "layer_N" in op and "/norm/" not in op,
        True,
    ),
    # LayerNorm's statistics are matrix-vector products in inference calls: counted here
    ("LayerNorm, residuals, activation", lambda op: "layer_N" in op, True),
    ("output projection (logits)", lambda op: op.endswith("Transformer.decode/dot_general"), False),
    ("beam bookkeeping (log-softmax, top-k, ancestry)", lambda op: True, False),
)
PER_LAYER_STEP = {name for name, _, per_step in GROUPS if per_step}


def group_of(op_name: str) -> str:
    return next(name for name, test, _ in GROUPS if test(op_name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_beam.add_shape_args(parser)
    parser.add_argument("--dtype", choices=benchlib.DTYPES, default="float32")
    parser.add_argument("--calls", type=int, default=2, help="traced calls")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument(
        "--cache-phases",
        type=int,
        default=None,
        metavar="N",
        help="beam_search(cache_phases=N) (default: the library's)",
    )
    parser.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--host-memory", default="keep", choices=("keep", "system"))
    args = parser.parse_args(argv)
    benchlib.configure_host(args)

    import jax

    from distill_jax import decode

    model, params = bench_beam.make_model(args)
    src = jax.device_put(
        bench_beam.make_sources(args.batch, args.src_len, args.vocab, args.padded_rows)
    )
    options = benchlib.parse_compiler_options(args.compiler_option)
    phases = {} if args.cache_phases is None else {"cache_phases": args.cache_phases}
    compiled, *_ = bench_beam.compile_search(model, params, src, args, options, **phases)
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, src))
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, src))
    wall_ms = (time.perf_counter() - start) * 1e3
    rows = benchlib.traced_thunks(compiled, lambda: compiled(params, src), args.calls)

    total = sum(ms for _, _, ms in rows)
    slots = args.new_tokens * args.beams
    print(
        f"ours: decode.beam_search, batch {args.batch}, beams {args.beams}, source "
        f"{args.src_len}, N {args.new_tokens} steps ({slots} cache slots per sentence), "
        f"vocab {args.vocab}, cache phases ending at steps "
        f"{decode.phase_ends(args.new_tokens, args.cache_phases or decode.DEFAULT_CACHE_PHASES)}; "
        f"one untraced call {wall_ms:.0f} ms; ms per call over "
        f"{args.calls} traced calls"
        + (f"; {benchlib.describe_options(options)}" if options else "")
    )
    print(
        benchlib.thunk_markdown(
            rows[: args.top], lambda op: op.replace("while/body/Transformer.decode/", "step/")
        )
    )
    groups: collections.Counter = collections.Counter()
    for _, op, ms in rows:
        groups[group_of(op)] += ms
    steps = args.new_tokens * args.layers
    print()
    print(
        benchlib.markdown_table(
            ["what", "ms per call", "share", "us per decoder layer and step"],
            [
                [
                    name,
                    f"{ms:.1f}",
                    f"{100 * ms / total:.1f}%",
                    f"{1e3 * ms / steps:.0f}" if name in PER_LAYER_STEP else "-",
                ]
                for name, ms in groups.most_common()
            ],
        )
    )
    print(f"all listed thunks: {total:.0f} ms per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
