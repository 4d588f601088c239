"""Brings the soft-target caches that a GPU run of scripts/gpu_teacher.sh returned into a
CPU work directory (docs/gpu.md), after checking all of it:

  python scripts/gpu_unpack.py FILES WORKDIR [--config FILE] [--set FIELD=VALUE ...] [--data DIR]

FILES is the folder the returned files lie in (``record.json`` and the parts
``soft_targets.tar.gz.partNN``). In order:

1. ``record.json`` is read; every part it lists must be there with its size and SHA-256,
   and the parts joined must give the archive's SHA-256;
2. no cache of the record may exist in ``WORKDIR/soft_targets/`` (an existing cache is
   never overwritten), and WORKDIR must hold no teacher run (its checkpoints would be
   compared with the GPU teacher's and refused by ``train-student``);
3. the archive is unpacked into a temporary folder inside WORKDIR (only regular files and
   folders under ``soft_targets/SPLIT/``);
4. each cache is opened with ``distill_jax.soft_target_cache.open_cache`` against the
   identity the CPU run expects (``distill_jax.student.cache_identity`` of the config with
   the record's ``student_sets`` and then ``--set``, the prepared dataset, the record's
   teacher checkpoint), which reads and checks every chunk;
5. only then the prepared dataset is copied to ``WORKDIR/data`` when WORKDIR has none (from
   ``--data``, default the pack's ``.device/data``), and each cache is moved to
   ``WORKDIR/soft_targets/SPLIT`` with one rename; the record is kept as
   ``WORKDIR/gpu_record.json``.

Bad input (a missing or damaged part, a cache that exists, another identity) stops with a
message naming the file and exit status 2, and leaves WORKDIR as it was. Then, from the
directory the GPU run's teacher path is relative to (the repository root):

  distill-jax train-student --config C --workdir WORKDIR --set distill.kd=offline \\
      --set teacher.checkpoint=.device/teacher-fp16 --set teacher.steps=N ...

(the sets are printed at the end); with no teacher checkpoints in WORKDIR it trains on the
GPU-made targets as they are, noting the checkpoint they came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from provenance import add_set_argument  # noqa: E402

RECORD = "record.json"
FORMAT = "distill-jax-gpu-record/1"


class Refused(Exception):
    """Bad input: reported with exit status 2."""


def read_record(files: pathlib.Path) -> dict:
    path = files / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Refused(f"{path} is missing (the record scripts/gpu_teacher.py writes)") from None
    except (OSError, ValueError) as err:
        raise Refused(f"{path} cannot be read as JSON: {err}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise Refused(f"{path} is not a record of scripts/gpu_teacher.py (format {FORMAT!r})")
    for key in ("parts", "archive", "caches", "student_sets"):
        if key not in record:
            raise Refused(
                f"{path} has no {key!r}: the GPU run packed no caches (status "
                f"{record.get('status')!r}; notes: {record.get('notes')})"
            )
    return record


def check_parts(files: pathlib.Path, record: dict) -> list[pathlib.Path]:
    """The parts in order, each checked for presence, size and SHA-256; then the whole."""
    paths, whole = [], hashlib.sha256()
    for part in record["parts"]:
        name = str(part["name"])
        if pathlib.Path(name).name != name:
            raise Refused(f"{files / RECORD} names a part outside {files}: {name!r}")
        path = files / name
        if not path.is_file():
            raise Refused(f"{path} is missing ({len(record['parts'])} parts are listed)")
        if path.stat().st_size != part["bytes"]:
            raise Refused(
                f"{path} has {path.stat().st_size} bytes, the record says {part['bytes']}"
            )
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise Refused(f"{path} is damaged: its SHA-256 differs from the record's")
        whole.update(data)
        paths.append(path)
    if whole.hexdigest() != record["archive"]["sha256"]:
        raise Refused(f"the parts in {files} do not join into the archive the record names")
    return paths


def unpack(parts: list[pathlib.Path], staging: pathlib.Path, splits: list[str]) -> None:
    joined = staging / "archive.tar.gz"
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    allowed = {f"soft_targets/{split}" for split in splits}
    try:
        with tarfile.open(joined, "r:gz") as tar:
            for member in tar.getmembers():
                top = "/".join(member.name.split("/")[:2])
                if (
                    top not in allowed
                    or ".." in member.name.split("/")
                    or not (member.isfile() or member.isdir())
                ):
                    raise Refused(
                        f"{parts[0]}: the archive holds an unexpected entry {member.name!r}"
                    )
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise Refused(f"{parts[0]}: the archive cannot be unpacked: {err}") from None
    joined.unlink()


def expected_identity(config, dataset, split: str, header: dict):
    from distill_jax import student

    identity = student.cache_identity(config, dataset, split, config.teacher.top_k)
    return dataclasses.replace(
        identity,
        teacher_step=header.get("teacher_step"),
        teacher_digest=header.get("teacher_digest"),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Check and bring a GPU run's soft-target caches into WORKDIR (docs/gpu.md)."
    )
    parser.add_argument("files", help="the folder of the returned files (record.json, parts)")
    parser.add_argument("workdir", help="the CPU work directory")
    parser.add_argument("--config", help="the experiment config (default: the record's)")
    add_set_argument(
        parser, help="overrides after the record's student_sets (those of the CPU students)"
    )
    parser.add_argument(
        "--data", help="the prepared dataset to copy when WORKDIR has none (default PACK/data)"
    )
    args = parser.parse_args(argv)
    files, workdir = pathlib.Path(args.files), pathlib.Path(args.workdir)
    created = not workdir.exists()
    staging = None
    try:
        record = read_record(files)
        parts = check_parts(files, record)
        splits = sorted(record["caches"])
        for split in splits:
            if (workdir / "soft_targets" / split).exists():
                raise Refused(
                    f"{workdir / 'soft_targets' / split} exists; a cache is never overwritten "
                    "(use a fresh work directory, or remove it yourself)"
                )
        if (workdir / "teacher" / "checkpoints").exists():
            raise Refused(
                f"{workdir / 'teacher'} holds a teacher run, whose checkpoints train-student "
                "would compare with the GPU teacher's and refuse: use a fresh work directory"
            )

        from distill_jax import runner
        from distill_jax.api import load_config
        from distill_jax.data.prepared import open_prepared
        from distill_jax.errors import UserError
        from distill_jax.soft_target_cache import open_cache

        config_path = args.config or record["config"]
        try:
            config = load_config(config_path, [*record["student_sets"], *args.sets])
        except UserError as err:
            raise Refused(str(err)) from None
        copy_data = None
        prepared = pathlib.Path(runner.prepared_dir(config, workdir))
        if not config.data.prepared and not (prepared / "dataset.json").is_file():
            copy_data = pathlib.Path(args.data or record.get("data") or ".device/data")
            if prepared.exists():
                raise Refused(f"{prepared} exists but is not a prepared dataset")
            if not (copy_data / "dataset.json").is_file():
                raise Refused(
                    f"{workdir} has no prepared dataset and {copy_data} is none either "
                    "(--data DIR: the dataset the GPU run used, scripts/gpu_pack.py's data/)"
                )
            prepared = copy_data
        try:
            dataset = open_prepared(prepared)
        except UserError as err:
            raise Refused(str(err)) from None

        workdir.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=workdir, prefix=".gpu-unpack-"))
        unpack(parts, staging, splits)
        for split in splits:
            path = staging / "soft_targets" / split
            count = len(dataset.records(split, config.data.example_limit(split))[0])
            identity = expected_identity(config, dataset, split, record["caches"][split])
            try:
                cache = open_cache(path, identity, num_examples=count)
            except UserError as err:
                raise Refused(f"{files} ({split}): {err}") from None
            print(f"checked {split}: {len(cache)} examples, K={cache.top_k}", flush=True)

        # everything is checked: move into place
        if copy_data is not None:
            shutil.copytree(copy_data, staging / "data")
            if (workdir / "data").exists():
                raise Refused(f"{workdir / 'data'} appeared while unpacking")
            os.rename(staging / "data", workdir / "data")
            print(f"copied the prepared dataset {copy_data} -> {workdir / 'data'}")
        (workdir / "soft_targets").mkdir(exist_ok=True)
        for split in splits:
            dest = workdir / "soft_targets" / split
            if dest.exists():
                raise Refused(f"{dest} appeared while unpacking; it is left as it is")
            os.rename(staging / "soft_targets" / split, dest)
            print(f"soft targets ({split}) -> {dest}")
        (workdir / "gpu_record.json").write_text(json.dumps(record, indent=1) + "\n")
    except Refused as err:
        print(f"gpu_unpack: error: {err}", file=sys.stderr)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created and workdir.is_dir() and not any(workdir.iterdir()):
            workdir.rmdir()
        return 2
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    sets = " ".join(f"--set {s}" for s in [*record["student_sets"], *args.sets])
    teacher = record.get("teacher", {})
    print(
        f"the GPU teacher: {teacher.get('steps_reached')} of {teacher.get('steps_planned')} "
        f"steps, soft targets from step {teacher.get('checkpoint_step')}; status "
        f"{record.get('status')}"
    )
    print(
        "train students on them (from the directory the teacher path is relative to):\n"
        f"  distill-jax train-student --config {args.config or record['config']} "
        f"--workdir {workdir} {sets} --set distill.kd=offline"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
