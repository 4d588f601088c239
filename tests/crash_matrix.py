"""The kill -9 matrix (issue #34): on configs/tiny.py, kill `train-teacher`, `soft-targets`
and `train-student` with SIGKILL during a write (a checkpoint save, a cache chunk) and
between writes, rerun the same command, and compare every artefact the stage leaves with
an uninterrupted run's, byte for byte.

    python tests/crash_matrix.py [--root DIR] [--only teacher,soft-targets,student]

(run from the repository root; tests/test_crash_matrix.py runs it as a slow test). The
kills are exact: ``DISTILL_JAX_CRASH_AT`` makes the command SIGKILL itself at a named
point (``runner.crash_point``): ``save:N`` right after the asynchronous checkpoint save of
step N started (its files are being written), ``step:N`` after update N of a step that is
not saved, once the earlier saves have finished, ``chunk:N`` right after the soft-target
write of the run's N-th chunk started, ``chunk-start:N`` once the earlier chunks are
stored, before the N-th is computed.

One uninterrupted reference run is made first; each killed case starts from a copy of the
reference work directory without the stage's own output (so the stages before it are the
reference's). What is compared: every file under the stage's directory, byte for byte,
except these wall-clock fields, which are compared with the field removed:

* ``metrics.jsonl``: ``time`` and ``target_tokens_per_s`` of each record;
* Orbax's ``_CHECKPOINT_METADATA`` of each checkpoint step: ``init_timestamp_nsecs`` and
  ``commit_timestamp_nsecs``;

* Orbax's ``commit_success.txt`` markers: they hold the checkpoint's absolute path, which
  is compared with the work directory replaced by ``WORKDIR``;

and the lock file's holder record (``.lock``, empty once its run has ended) is left out.
The arrays of a checkpoint's ``state`` are stored by Orbax in an OCDBT key-value store
whose files (``manifest.ocdbt``, ``d/*``, ``ocdbt.process_*/``) have random names and
write-order-dependent layouts even for identical arrays; they are compared by content
instead: every array (its path in the tree, dtype, shape and bytes) read back from the
store. Anything else that differs is a failure, printed with its path.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import tiny_experiment  # noqa: E402

CONFIG = "configs/tiny.py"
WALL_CLOCK_FIELDS = {
    "metrics.jsonl": ("time", "target_tokens_per_s"),
    "_CHECKPOINT_METADATA": ("init_timestamp_nsecs", "commit_timestamp_nsecs"),
}
SKIPPED = (".lock",)  # holder records of the run-directory locks
CHUNK_ROWS = "512"  # several soft-target chunks on the tiny corpus

# stage -> (command, extra arguments, directories it writes (relative to the work dir))
STAGES = {
    "teacher": ("train-teacher", [], ["teacher"]),
    "soft-targets": ("soft-targets", ["--chunk-rows", CHUNK_ROWS], ["soft_targets"]),
    "student": ("train-student", [], ["students"]),
}
# stage -> [(crash point, what it is)]; tiny.py: the teacher saves at 3 and 6, the
# student at 2, 4, 6, 8 (validation at 4 and 8), training logs at the last step only
CASES = {
    "teacher": [
        ("save:3", "during the checkpoint save of step 3"),
        ("step:5", "between saves, after step 5"),
    ],
    "soft-targets": [
        ("chunk:2", "during the write of the third chunk"),
        ("chunk-start:3", "between chunk writes (the first three stored)"),
    ],
    "student": [
        ("save:4", "during the checkpoint save of step 4"),
        ("step:5", "between saves, after step 5"),
    ],
}


def _env(root: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "xla-cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # as tests/conftest.py
    env.pop("DISTILL_JAX_CRASH_AT", None)
    return env


def cli(root, workdir, teacher, stage, crash_at=None) -> subprocess.CompletedProcess:
    command, extra, _ = STAGES[stage]
    env = _env(root)
    if crash_at:
        env["DISTILL_JAX_CRASH_AT"] = crash_at
    return tiny_experiment.run_cli(
        workdir,
        teacher,
        command,
        *extra,
        config=CONFIG,
        check=False,
        cwd=REPO,
        env=env,
        timeout=1800,
    )


def _normalised(path: pathlib.Path) -> bytes:
    """The file's bytes, or for a file with wall-clock fields its JSON without them."""
    fields = WALL_CLOCK_FIELDS.get(path.name)
    data = path.read_bytes()
    if fields is None:
        return data
    if path.name.endswith(".jsonl"):
        records = [json.loads(line) for line in data.decode().splitlines()]
        return "\n".join(
            json.dumps({k: v for k, v in r.items() if k not in fields}) for r in records
        ).encode()
    record = json.loads(data)
    return json.dumps({k: v for k, v in record.items() if k not in fields}).encode()


def _ocdbt(relative: pathlib.Path) -> bool:
    """Whether a file is part of an Orbax OCDBT array store (compared by content)."""
    parts = relative.parts
    return "state" in parts and (
        relative.name == "manifest.ocdbt"
        or "d" in parts
        or any(p.startswith("ocdbt.process_") for p in parts)
    )


# Views of a run that carry wall-clock times and the host name by design (TensorBoard event
# files, profiler traces); metrics.jsonl is the record they view, and it is compared.
VIEWS = ("tensorboard", "profile")


def files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    return {
        str(p.relative_to(directory)): p
        for p in sorted(directory.rglob("*"))
        if p.is_file()
        and p.name not in SKIPPED
        and not _ocdbt(p.relative_to(directory))
        and not _is_view(p.relative_to(directory))
    }


def _is_view(relative: pathlib.Path) -> bool:
    return any(part in VIEWS for part in relative.parts)


def array_stores(directory: pathlib.Path) -> list[str]:
    """The Orbax ``state`` items (OCDBT array stores) under ``directory``."""
    return sorted(
        str(p.parent.relative_to(directory))
        for p in directory.rglob("manifest.ocdbt")
        if p.parent.name == "state"
    )


def read_arrays(item: pathlib.Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every array of an Orbax ``state`` item: tree path -> (dtype, shape, bytes)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(item)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))
    return {
        jax.tree_util.keystr(path): (str(np.asarray(x).dtype), np.shape(x), np.asarray(x).tobytes())
        for path, x in jax.tree_util.tree_leaves_with_path(restored)
    }


def compare(reference: pathlib.Path, candidate: pathlib.Path) -> list[str]:
    """Differences between two directories: files only in one, files whose (normalised)
    bytes differ, checkpoint arrays that differ."""
    ref, got = files(reference), files(candidate)
    problems = [f"only in the uninterrupted run: {name}" for name in sorted(set(ref) - set(got))]
    problems += [f"only in the killed run: {name}" for name in sorted(set(got) - set(ref))]
    for name in sorted(set(ref) & set(got)):
        a, b = _normalised(ref[name]), _normalised(got[name])
        if ref[name].name == "commit_success.txt":
            a = a.replace(os.fsencode(reference.parent), b"WORKDIR")
            b = b.replace(os.fsencode(candidate.parent), b"WORKDIR")
        if a != b:
            problems.append(f"differs: {name}")
    stores_ref, stores_got = array_stores(reference), array_stores(candidate)
    problems += [
        f"checkpoint arrays only in one run: {name}"
        for name in sorted(set(stores_ref) ^ set(stores_got))
    ]
    for name in sorted(set(stores_ref) & set(stores_got)):
        arrays_ref = read_arrays(reference / name)
        arrays_got = read_arrays(candidate / name)
        if arrays_ref.keys() != arrays_got.keys():
            problems.append(f"checkpoint arrays differ in their tree: {name}")
            continue
        problems += [
            f"checkpoint array differs: {name} {key}"
            for key in sorted(arrays_ref)
            if arrays_ref[key] != arrays_got[key]
        ]
    return problems


def build(root: pathlib.Path, minilm: pathlib.Path, shared_data: pathlib.Path):
    """The tiny teacher and a work directory ``root/reference`` holding the prepared corpus
    (its ``data`` folder)."""
    teacher = tiny_experiment.save_tiny_teacher(root / "bert", minilm)
    specs = tiny_experiment.write_corpus(shared_data, root / "corpus")
    reference = root / "reference"
    tiny_experiment.prepare(teacher, root / "corpus", specs, reference / "data")
    return reference, teacher


def reference_run(root: pathlib.Path, workdir: pathlib.Path, teacher) -> list[str]:
    """The uninterrupted run: every stage in ``workdir`` (which holds the prepared corpus
    in ``data``); returns the failures (empty: it finished). tests/conftest.py's
    ``tiny_run`` is this run, made once per test session."""
    for stage in STAGES:
        result = cli(root, workdir, teacher, stage)
        if result.returncode != 0:
            return [f"the uninterrupted {stage} run failed:\n{result.stderr[-3000:]}"]
    return []


def _left_behind(workdir: pathlib.Path, stage: str) -> str:
    """What a killed stage left: its checkpoint step folders (finished or not) or its
    stored soft-target chunks."""
    if stage == "soft-targets":
        cache = workdir / "soft_targets" / "train"
        chunks = (
            [
                p
                for p in (cache / "logits").rglob("*")
                if p.is_file() and p.relative_to(cache / "logits").parts[0] == "c"
            ]
            if cache.exists()
            else []
        )
        return (
            f"{len(chunks)} stored chunk objects, "
            f"{'a' if (cache / 'header.json').exists() else 'no'} header.json"
        )
    where = workdir / STAGES[stage][2][0]
    steps = sorted(
        p.name for p in where.rglob("*") if p.is_dir() and p.parent.name == "checkpoints"
    )
    return "checkpoint folders " + (", ".join(steps) or "none")


def run_matrix(
    root: pathlib.Path,
    reference: pathlib.Path,
    teacher: pathlib.Path,
    stages=tuple(STAGES),
    log=print,
) -> list[str]:
    """Runs the matrix under ``root`` against ``reference``, the finished uninterrupted
    run (``reference_run``) made with ``teacher``, which is only read; returns the
    failures (empty: every case matched)."""
    started = time.time()
    failures = []
    order = list(STAGES)
    for stage in stages:
        for point, what in CASES[stage]:
            case = f"{stage}, killed {what} ({point})"
            workdir = root / f"{stage}-{point.replace(':', '-')}"
            shutil.copytree(reference, workdir)
            for later in order[order.index(stage) :]:
                for name in STAGES[later][2]:
                    shutil.rmtree(workdir / name, ignore_errors=True)
            killed = cli(root, workdir, teacher, stage, crash_at=point)
            if killed.returncode != -9:
                failures.append(
                    f"{case}: expected the kill (-9), got exit "
                    f"{killed.returncode}:\n{killed.stderr[-2000:]}"
                )
                continue
            left = _left_behind(workdir, stage)
            rerun = cli(root, workdir, teacher, stage)
            if rerun.returncode != 0:
                failures.append(
                    f"{case}: the rerun exited {rerun.returncode}:\n{rerun.stderr[-3000:]}"
                )
                continue
            problems = [
                p for name in STAGES[stage][2] for p in compare(reference / name, workdir / name)
            ]
            failures += [f"{case}: {p}" for p in problems]
            log(
                f"{case}: the kill left {left}; after the rerun "
                f"{'identical' if not problems else f'{len(problems)} differences'}"
                f" ({time.time() - started:.0f} s)"
            )
            if not problems:
                shutil.rmtree(workdir)
    return failures


def main(argv=None) -> int:
    import logging

    logging.getLogger().setLevel(logging.CRITICAL)  # Orbax's notes on reading arrays to numpy
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=pathlib.Path,
        default=None,
        help="working folder (default: a temporary one, removed at the end)",
    )
    parser.add_argument(
        "--only", default=",".join(STAGES), help=f"comma-separated stages of {list(STAGES)}"
    )
    parser.add_argument(
        "--minilm",
        type=pathlib.Path,
        default=pathlib.Path(
            os.environ.get(
                "DISTILL_JAX_MINILM", REPO / ".cache" / "distill-jax" / "all-MiniLM-L6-v2"
            )
        ),
    )
    parser.add_argument(
        "--shared-data",
        type=pathlib.Path,
        default=pathlib.Path(
            os.environ.get("DISTILL_JAX_SHARED_DATA", REPO.parent / "shared" / "data")
        ),
    )
    args = parser.parse_args(argv)
    stages = [s for s in args.only.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}")
    root = args.root or pathlib.Path(tempfile.mkdtemp(prefix="distill-jax-crash-matrix-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        reference, teacher = build(root, args.minilm, args.shared_data)
        started = time.time()
        failures = reference_run(root, reference, teacher)
        print(f"reference run: {time.time() - started:.0f} s")
        if not failures:
            failures = run_matrix(root, reference, teacher, stages)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    for failure in failures:
        print("FAIL", failure)
    print(
        "crash matrix: "
        + (
            "every killed run ended identical to the uninterrupted one"
            if not failures
            else f"{len(failures)} failures"
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
