"""``distill-jax export``: a trained student as a Hugging Face transformers FSMT checkpoint
(weights, config, tokenizer, model card), written atomically to ``--out``."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill_jax import export, runner, student
from distill_jax.commands import common
from distill_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_trained_student_arguments(parser)
    parser.add_argument("--out", required=True, help="folder to write the FSMT checkpoint to")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (only once the new export is complete)")


def run(args: argparse.Namespace) -> int:
    from distill_jax import sharding
    from distill_jax.data.prepared import open_prepared

    common.initialize_processes(args)
    config = common.load_experiment(args)
    export.check_exportable(config.student)  # before loading anything
    if Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} exists; choose another --out or pass --overwrite")
    workdir = Path(args.workdir)
    name = args.name or student.default_name(config)
    mesh = sharding.make_mesh(config.mesh)
    model, params, vocab = student.load_trained(config, workdir, name, args.checkpoint, mesh)
    if not runner.is_chief():
        return 0
    meta = open_prepared(runner.prepared_dir(config, workdir)).meta
    direction = str(meta.get("direction", "src-tgt")).split("-")
    langs = direction if len(direction) == 2 else ["src", "tgt"]
    card = export.model_card(workdir / "students" / name, name, model.config, vocab, meta,
                             args.checkpoint)
    out = export.export(args.out, params, model.config, vocab, config.decode, card, langs,
                        overwrite=args.overwrite)
    print(f"[{name}] exported to {out}", flush=True)
    return 0
