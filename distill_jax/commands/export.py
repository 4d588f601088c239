"""``distill-jax export``: a trained student as a Hugging Face transformers checkpoint
(MarianMTModel for post-LN students, M2M100ForConditionalGeneration for pre-LN ones, or
FSMT) and/or a CTranslate2 model, with its tokenizer and a model card, written atomically
to ``--out`` (docs/export.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from distill_jax import export, runner, student
from distill_jax.commands import common

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_trained_student_arguments(parser)
    parser.add_argument("--out", required=True, help="folder to write the export to")
    parser.add_argument(
        "--format",
        default="auto",
        choices=export.FORMATS,
        help="auto (marian for post-LN students, m2m100 for pre-LN ones), "
        "marian, m2m100, fsmt, or ctranslate2 (a CTranslate2 model "
        "folder alone)",
    )
    parser.add_argument(
        "--ctranslate2",
        action="store_true",
        help="also write a CTranslate2 model (float32) into OUT/ctranslate2",
    )
    parser.add_argument(
        "--license",
        default="unknown",
        help="license of the model card's metadata (default: unknown)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export at --out (a folder holding only what "
        "distill-jax export wrote; never the work directory or a folder "
        "inside or above it), once the new export is complete",
    )


def run(args: argparse.Namespace) -> int:
    from distill_jax import sharding
    from distill_jax.data.prepared import open_prepared

    common.initialize_processes(args)
    config = common.load_experiment(args)
    # before loading anything
    fmt = export.check_exportable(config.student, args.format)
    export.check_target(args.out, args.workdir, args.overwrite)
    workdir = Path(args.workdir)
    name = args.name or student.default_name(config)
    mesh = sharding.make_mesh(config.mesh)
    logger.info("loading student %s (checkpoint %s) from %s", name, args.checkpoint, workdir)
    model, params, vocab = student.load_trained(config, workdir, name, args.checkpoint, mesh)
    if not runner.is_chief():
        return 0
    meta = open_prepared(runner.prepared_dir(config, workdir)).meta
    direction = str(meta.get("direction", "src-tgt")).split("-")
    langs = direction if len(direction) == 2 else ["src", "tgt"]
    exported = export.ExportedStudent(params, model.config, vocab, config.decode, tuple(langs))
    card = export.model_card(
        workdir / "students" / name,
        exported,
        export.CardInfo(name, args.checkpoint, meta, args.license),
        fmt,
    )
    logger.info("writing the %s export to %s", fmt, args.out)
    out = export.export(
        args.out,
        exported,
        card,
        fmt=fmt,
        ctranslate2=args.ctranslate2,
        overwrite=args.overwrite,
        workdir=args.workdir,
    )
    print(
        f"[{name}] exported to {out} ({fmt}"
        f"{', with ctranslate2/' if args.ctranslate2 and fmt != 'ctranslate2' else ''})",
        flush=True,
    )
    return 0
