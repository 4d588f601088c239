"""Serving speed: CTranslate2 (float32 and int8) against our jitted beam search, with BLEU.

A trained student from a work directory (``--config``, ``--workdir``, ``--name``,
``--checkpoint``, ``--set``: as for ``distill-jax generate``) translates the first
``--sentences`` sources of ``--split`` three ways, on this machine's CPU:

  ours          ``distill_jax.translate.translate_ids`` (what ``distill-jax generate``
                runs): jitted beam search over length-bucketed batches of
                ``decode.tokens_per_batch`` source tokens
  ct2-float32   the student written by ``distill_jax.export.write_ctranslate2`` (the
                model ``distill-jax export --ctranslate2`` writes), ``Translator(...,
                compute_type="float32")``, ``translate_batch`` on the whole list
  ct2-int8      the same model, ``compute_type="int8"`` (weights quantized when loaded)

Same sources (the prepared split's ids; CTranslate2 gets their pieces), same beam
(``--beam``), length penalty 0 for all three (the student's GNMT penalty and CTranslate2's
``length ** alpha`` differ otherwise, docs/export.md) and the student's per-sentence
length bound (CTranslate2 takes one bound per call, so it is called once per group of
sentences with equal bounds, inside the timed region). pad and ``<s>`` are suppressed in
CTranslate2 as the student never generates them. CTranslate2 uses ``--threads``
intra-op threads (default: all cores); JAX sizes its own pool.

Timing: ``benchlib.time_interleaved`` (warm-up rounds, then ``--runs`` rounds alternating
the order of the systems), median wall time of translating all sentences; sentences/s =
sentences / median. BLEU: detokenized case-insensitive sacreBLEU of each system's
hypotheses (``Vocabulary.decode``) against the split's references. The float32
hypotheses are also compared with ours token for token (``identical_to_ours``).

``--train-steps N`` first trains the student (``distill-jax train-student`` with
``train.steps=N``) when the work directory has none yet; the prepared dataset must exist.

Run: ``python scripts/bench/bench_ctranslate2.py --config configs/multi30k_full.py --workdir
runs/bench_ct2 --set teacher.checkpoint=$TEACHER --set distill.kd=none --name baseline
--split test2016 --sentences 500 --json results/bench_ctranslate2.json``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default=None, help="student run (default: from distill.kd)")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--split", default="test2016")
    parser.add_argument("--sentences", type=int, default=500, help="first N of the split")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="CTranslate2 intra_threads"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="train the student first (train.steps=N) if it has no checkpoint",
    )
    benchlib.add_common_args(parser, warmup=1)
    return parser.parse_args(argv)


def train_if_missing(args: argparse.Namespace, name: str) -> None:
    """Runs ``distill-jax train-student`` when the run has no checkpoints."""
    if (Path(args.workdir) / "students" / name / "checkpoints").is_dir() or not args.train_steps:
        return
    command = [
        sys.executable,
        "-m",
        "distill_jax.cli",
        "train-student",
        "--config",
        args.config,
        "--workdir",
        args.workdir,
        "--name",
        name,
        "--no-progress",
        "--set",
        f"train.steps={args.train_steps}",
    ]
    for item in args.overrides:
        command += ["--set", item]
    subprocess.run(command, check=True)


def ct2_translate(
    translator, pieces: list[list[str]], bounds: list[int], beam: int, suppressed: list[list[str]]
) -> list[list[str]]:
    """Hypotheses of every source, one ``translate_batch`` per group of equal bounds."""
    groups = collections.defaultdict(list)
    for i, bound in enumerate(bounds):
        groups[bound].append(i)
    out: list = [None] * len(pieces)
    for bound, rows in groups.items():
        results = translator.translate_batch(
            [pieces[i] for i in rows],
            beam_size=beam,
            length_penalty=0.0,
            max_decoding_length=bound,
            suppress_sequences=suppressed,
        )
        for i, result in zip(rows, results):
            out[i] = result.hypotheses[0]
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    benchlib.configure_host(args)
    import ctranslate2

    from distill_jax import export, metrics, sharding, student
    from distill_jax.commands.common import load_experiment
    from distill_jax.data.prepared import open_prepared
    from distill_jax.runner import prepared_dir
    from distill_jax.translate import TrainedModel, translate_ids, truncate_sources

    config = load_experiment(args)
    name = args.name or student.default_name(config)
    train_if_missing(args, name)
    mesh = sharding.make_mesh(config.mesh)
    model, params, vocab = student.load_trained(config, args.workdir, name, args.checkpoint, mesh)
    dataset = open_prepared(prepared_dir(config, Path(args.workdir)))
    sources, references = student.reference_texts(dataset, args.split, args.sentences)
    max_len = model.config.max_len
    sources = [
        np.asarray(s).tolist() for s in truncate_sources(sources, max_len, model.config.eos_id)
    ]
    decode = dataclasses.replace(
        config.decode, method="beam", beam_size=args.beam, length_penalty=0.0
    )
    bounds = [export.max_new_tokens(s, decode, max_len) for s in sources]
    pieces = [[vocab.pieces[i] for i in s if i != export.EOS] for s in sources]
    suppressed = export.ctranslate2_suppressed(vocab)
    arrays = [np.asarray(s, np.int32) for s in sources]

    machine = benchlib.machine_info(with_torch=False)
    machine["ctranslate2"] = ctranslate2.__version__
    machine["ctranslate2_threads"] = args.threads
    print(
        f"machine: {benchlib.describe_machine(machine)}, ctranslate2 "
        f"{ctranslate2.__version__} ({args.threads} threads)"
    )
    benchlib.warn_if_loaded(machine)

    with tempfile.TemporaryDirectory() as tmp:
        export.write_ctranslate2(Path(tmp) / "ct2", params, model.config, vocab)
        translators = {
            kind: ctranslate2.Translator(
                str(Path(tmp) / "ct2"), device="cpu", compute_type=kind, intra_threads=args.threads
            )
            for kind in ("float32", "int8")
        }
        outputs: dict[str, list] = {}

        def ours():
            outputs["ours"] = [
                o.tolist()
                for o in translate_ids(TrainedModel(model, params, vocab, mesh), arrays, decode)
            ]
            return None

        def ct2(kind):
            def run():
                hyps = ct2_translate(translators[kind], pieces, bounds, args.beam, suppressed)
                outputs[f"ct2-{kind}"] = [[vocab.ids[p] for p in h] for h in hyps]

            return run

        fns = {
            "ours": (ours, lambda _: None),
            "ct2-float32": (ct2("float32"), lambda _: None),
            "ct2-int8": (ct2("int8"), lambda _: None),
        }
        timings = benchlib.time_interleaved(fns, warmup=args.warmup, runs=args.runs)

    records = []
    for system, timing in timings.items():
        hypotheses = [vocab.decode(ids) for ids in outputs[system]]
        bleu = metrics.bleu(hypotheses, references, lowercase=True)
        records.append(
            {
                "benchmark": "ctranslate2",
                "system": system,
                "config": {
                    "config": args.config,
                    "overrides": args.overrides,
                    "name": name,
                    "checkpoint": args.checkpoint,
                    "split": args.split,
                    "sentences": len(sources),
                    "beam": args.beam,
                    "length_penalty": 0.0,
                    "student": {
                        "layers": [
                            model.config.num_encoder_layers,
                            model.config.num_decoder_layers,
                        ],
                        "d_model": model.config.d_model,
                        "mlp_dim": model.config.mlp_dim,
                        "heads": model.config.num_heads,
                        "vocab": model.config.vocab_size,
                        "pre_layer_norm": model.config.pre_layer_norm,
                    },
                },
                "runs": len(timing.runs_s),
                "runs_s": [round(t, 4) for t in timing.runs_s],
                "median_s": round(timing.median_s, 4),
                "sentences_per_s": round(len(sources) / timing.median_s, 2),
                "bleu": round(bleu["bleu"], 2),
                "bleu_signature": bleu["signature"],
                "identical_to_ours": sum(a == b for a, b in zip(outputs[system], outputs["ours"])),
                "machine": machine,
            }
        )
    ours_rate = records[0]["sentences_per_s"]
    rows = [
        [
            r["system"],
            f"{r['median_s']:.2f}",
            f"{r['sentences_per_s']:.1f}",
            f"{r['sentences_per_s'] / ours_rate:.2f}x",
            f"{r['bleu']:.2f}",
            f"{r['identical_to_ours']}/{len(sources)}",
        ]
        for r in records
    ]
    print(
        benchlib.markdown_table(
            ["system", "median s", "sentences/s", "vs ours", "BLEU", "same tokens as ours"], rows
        )
    )
    benchlib.write_json(args.json, records)


if __name__ == "__main__":
    main()
