"""Does the decode cache work? Per-token cost of jitted generation for output lengths
16 ... 128 (the cost of a whole output should grow linearly with its length).

For each N the student (reference size by default: d 512, 6+6 layers, ff 2048, 8 heads)
decodes a batch to exactly N tokens, forced by setting ``eos_id`` to ``bos_id`` (which
the searches never generate, so no hypothesis can end early; see bench_beam.py), with
``max_len = N`` so each run's cache has N slots. Reported: median seconds per call (>= 5
runs after warm-up), milliseconds per generated token, and the ratio of each length's
per-token cost to that of the shortest. Without a cache, step t would recompute all t
previous positions and the per-token cost would grow roughly linearly with N (ratio ~ N /
16); with it the ratio stays near 1 (attention over the cache is a small share of the
work at these sizes).

``--cache-phases 1,4`` times each length once per value of the searches'
``cache_phases`` (decoding in phases over growing caches; 1 = one cache of N slots from
the first step), so the table shows what growing the caches saves as N grows.

Run: ``python scripts/bench/bench_generate_scaling.py [--search beam|greedy] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from bench_beam import BOS, PAD, make_sources  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search", choices=("beam", "greedy"), default="beam")
    parser.add_argument("--lengths", default="16,32,64,128")
    parser.add_argument(
        "--cache-phases",
        default=None,
        help="comma-separated cache_phases values to time (default: the library's default only)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--src-len", type=int, default=24)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=10000)
    benchlib.add_student_args(parser)
    benchlib.add_common_args(parser, warmup=1)
    args = parser.parse_args(argv)

    import jax

    from distill_jax import decode

    machine = benchlib.machine_info(with_torch=False)
    print(f"machine: {benchlib.describe_machine(machine)}")
    benchlib.warn_if_loaded(machine)
    lengths = [int(x) for x in args.lengths.split(",")]
    phase_counts = (
        [int(x) for x in args.cache_phases.split(",")]
        if args.cache_phases
        else [decode.DEFAULT_CACHE_PHASES]
    )
    src = jax.device_put(make_sources(args.batch, args.src_len, args.vocab, padded_rows=2))
    rows, records = [], []
    base = {}
    for n in lengths:
        cfg = benchlib.transformer_config(
            args, max_len=max(n, args.src_len), pad_id=PAD, bos_id=BOS, eos_id=BOS
        )
        model, params = benchlib.init_transformer(cfg)
        for phases in phase_counts:
            if args.search == "beam":
                run = functools.partial(
                    decode.beam_search,
                    model,
                    params,
                    src,
                    beam_size=args.beams,
                    max_len=n,
                    cache_phases=phases,
                )
            else:
                run = functools.partial(
                    decode.greedy_search, model, params, src, max_len=n, cache_phases=phases
                )
            sequences = jax.device_get(run()[0])
            generated = sequences.shape[-1]
            assert generated == n and (sequences != PAD).all(), "the length was not forced"
            timing = benchlib.time_runs(
                run,
                warmup=args.warmup,
                runs=args.runs,
                label=f"{args.search} N={n} cache_phases={phases}",
            )
            per_token_ms = timing.median_s / n * 1e3
            base.setdefault(phases, per_token_ms)
            rows.append(
                [
                    n,
                    phases,
                    decode.phase_ends(n, phases),
                    f"{timing.median_s * 1e3:.0f}",
                    f"{per_token_ms:.2f}",
                    f"{per_token_ms / base[phases]:.2f}",
                    f"{timing.spread:.2f}",
                ]
            )
            records.append(
                {
                    "benchmark": "generate_scaling",
                    "search": args.search,
                    "new_tokens": n,
                    "batch": args.batch,
                    "beams": args.beams,
                    "cache_phases": phases,
                    "median_s": timing.median_s,
                    "runs_s": timing.runs_s,
                    "ms_per_token": per_token_ms,
                    "ratio_to_shortest": per_token_ms / base[phases],
                    "machine": machine,
                }
            )
    print(
        benchlib.markdown_table(
            (
                "output tokens N",
                "cache_phases",
                "phases end at",
                "median ms / call",
                "ms / token",
                f"per-token cost vs N={lengths[0]}",
                "run spread",
            ),
            rows,
        )
    )
    benchlib.write_json(args.json, records)


if __name__ == "__main__":
    main()
