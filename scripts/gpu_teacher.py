"""Teacher -> soft targets (-> students, if time is left) on a lent GPU, inside a wall-clock
budget, leaving the soft-target caches and a results record in OUT as at most 8 files of
at most 16 MiB each. Started by scripts/gpu_teacher.sh (docs/gpu.md); run from the
repository root of the device machine's copy, with the folder of scripts/gpu_pack.py
(``--pack``, default ``.device``) carried along.

Stages, each a ``distill-jax`` command in its own process (this one never starts JAX, so
the GPU is free for them):

1. set-up: the carried wheels into a private folder (when the packages are missing), the
   teacher's weights decompressed and checked against the pack's manifest, the device
   named (a short JAX process);
2. ``train-teacher`` with ``teacher.checkpoint=PACK/teacher-fp16``, ``--steps`` and
   ``--tokens`` (``teacher.steps`` / ``teacher.tokens_per_batch``), ``train.compute_dtype``
   bfloat16 on a GPU; stopped when only ``--reserve-s`` of the budget is left. A run
   stopped so is extracted from its last saved checkpoint (``--teacher-step``);
3. ``soft-targets`` for train, then val;
4. ``scripts/teacher_quality.py`` on val (stride top-1 / top-K / p(ref));
5. the ``--students`` (train-student), each only when ``--student-min-s`` is left;
6. the finished caches as one ``soft_targets.tar.gz`` split into parts of ``--part-mib``
   MiB, with ``record.json`` (rewritten after every stage, so a stopped run still leaves
   one) and ``gpu_teacher.log``.

``record.json`` names the parts with their sizes and SHA-256, the teacher's steps (planned,
reached, the checkpoint used), its validation and quality figures, its training speed, the
wall time of every stage, the device, the commit, and ``student_sets``: the ``--set``
overrides under which a CPU run computes the same cache identity (scripts/gpu_unpack.py
uses them). Exit status: 0 when the train and val caches were packed, 1 otherwise (the
record says why), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from provenance import add_set_argument, git_commit, sha256_file  # noqa: E402

FILE_LIMIT = 16 << 20  # a file that comes back from OUT
TOTAL_LIMIT = 64 << 20  # all of them together
MAX_FILES = 8
ARCHIVE = "soft_targets.tar.gz"
RECORD = "record.json"
LOG = "gpu_teacher.log"
CRASH_ENV = "DISTILL_JAX_CRASH_AT"  # (tests) reaches train-teacher only
# The baseline and the setting chosen on val on all 29,000 pairs (docs/results.md: T 2 on the
# 6,400-step teacher), so a GPU run's students compare with the CPU's best.
DEFAULT_STUDENTS = (
    "baseline:distill.kd=none "
    "t2:distill.kd=offline,distill.alpha=0.5,distill.temperature=2,distill.top_k=8"
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="teacher -> soft targets (-> students) on a GPU, within a time budget"
    )
    parser.add_argument("--out", required=True, help="the folder whose files come back")
    parser.add_argument("--pack", default=".device", help="scripts/gpu_pack.py's folder")
    parser.add_argument("--config", default="configs/multi30k_strong.py")
    parser.add_argument("--workdir", default="/tmp/gpu-teacher-work")
    parser.add_argument("--steps", type=int, default=2500, help="teacher.steps")
    parser.add_argument("--tokens", type=int, default=16384, help="teacher.tokens_per_batch")
    parser.add_argument("--every", type=int, default=250, help="teacher eval_every/save_every")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="train.compute_dtype (auto: bfloat16 on a GPU, float32 elsewhere)",
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget")
    parser.add_argument(
        "--reserve-s",
        type=float,
        default=180.0,
        help="budget kept for extraction, scoring and packing once the teacher stops",
    )
    parser.add_argument("--pack-reserve-s", type=float, default=30.0, help="kept for packing")
    parser.add_argument(
        "--students", default=DEFAULT_STUDENTS, help='"NAME:F=V,F=V ..." ("" for none)'
    )
    parser.add_argument("--student-min-s", type=float, default=120.0)
    parser.add_argument("--part-mib", type=float, default=15.0, help="archive part size")
    add_set_argument(
        parser, help="an override for every command (and for the CPU students: student_sets)"
    )
    args = parser.parse_args(argv)
    for name in ("steps", "tokens", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not 0 < args.part_mib <= FILE_LIMIT / 2**20:
        parser.error(f"--part-mib must be in (0, {FILE_LIMIT >> 20}]")
    if args.budget_s <= 0 or args.reserve_s < 0 or args.pack_reserve_s < 0:
        parser.error("--budget-s must be > 0, --reserve-s and --pack-reserve-s >= 0")
    for value in args.sets:
        if "=" not in value:
            parser.error(f"--set {value!r}: expected FIELD=VALUE")
    try:
        args.student_list = [
            (name, [kv for kv in fields.split(",") if kv])
            for name, fields in (item.split(":", 1) for item in args.students.split())
        ]
    except ValueError:
        parser.error(f"--students {args.students!r}: expected NAME:FIELD=VALUE,... items")
    return args


class Run:
    """The stages' shared state: the clock, the log, the record."""

    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.out = pathlib.Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.decompressed: pathlib.Path | None = None  # the teacher's weights, made here
        self.log = open(self.out / LOG, "a", encoding="utf-8", errors="replace")
        self.record: dict = {
            "format": "distill-jax-gpu-record/1",
            "status": "running",
            "notes": [],
            "config": args.config,
            "budget_s": args.budget_s,
            "wall_s": {},
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[gpu_teacher {time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def note(self, text: str) -> None:
        self.say(text)
        self.record["notes"].append(text)

    def save(self) -> None:
        self.record["wall_s"]["total"] = round(time.monotonic() - self.start, 1)
        path = self.out / RECORD
        tmp = path.with_name(RECORD + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        os.replace(tmp, path)

    def run(self, name: str, argv: list[str], until: float, env: dict) -> tuple[int, bool]:
        """Runs ``argv``, its output copied to stdout and the log, stopped (SIGTERM, then
        SIGKILL) at the monotonic time ``until``; returns (exit status, stopped)."""
        self.say(f"{name}: {' '.join(argv)}")
        begun = time.monotonic()
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            text=True,
            errors="replace",
        )

        def copy():
            for line in process.stdout:
                sys.stdout.write(line)
                self.log.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        stopped = False
        try:
            process.wait(timeout=max(until - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            stopped = True
            self.say(f"{name}: out of time, stopping it")
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        reader.join(timeout=10)
        self.log.flush()
        seconds = round(time.monotonic() - begun, 1)
        self.record["wall_s"][name] = seconds
        self.say(f"{name}: exit {process.returncode} after {seconds} s")
        return process.returncode, stopped


# ----------------------------------------------------------------------------- set-up


def child_env(run: Run, site: pathlib.Path | None) -> dict:
    env = dict(os.environ)
    paths = [str(REPO), *([str(site)] if site else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    cache = pathlib.Path(run.args.workdir).resolve() / "jax_cache"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def install_wheels(run: Run, pack: pathlib.Path) -> pathlib.Path | None:
    """The carried wheels into a private folder, when this Python lacks the packages."""
    probe = "import tensorflow_datasets, grain, array_record, rouge_score, sacremoses"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        return None
    wheels = sorted((pack / "wheels").glob("*.whl"))
    if not wheels:
        run.note(f"the data packages are missing and {pack / 'wheels'} holds no wheels")
        return None
    site = pathlib.Path(run.args.workdir).resolve() / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        + ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
        check=True,
    )
    run.say(f"installed {len(wheels)} wheels into {site}")
    return site


def unpack_teacher(run: Run, pack: pathlib.Path) -> pathlib.Path | None:
    """PACK/teacher-fp16/model.safetensors from its .xz, checked against the manifest;
    returns it when it was made here (removed at the end, so that the pack stays the size
    that travels)."""
    manifest = json.loads((pack / "manifest.json").read_text())
    info = manifest["teacher"]
    folder = pack / info["dir"]
    weights = folder / info["safetensors"]
    if weights.is_file() and sha256_file(weights) == info["safetensors_sha256"]:
        return None
    tmp = weights.with_name(weights.name + ".tmp")
    with lzma.open(folder / info["compressed"], "rb") as src, open(tmp, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    if sha256_file(tmp) != info["safetensors_sha256"]:
        tmp.unlink()
        raise SystemExit(
            f"gpu_teacher: {folder / info['compressed']} does not decompress to "
            "the teacher the manifest names"
        )
    os.replace(tmp, weights)
    run.say(f"decompressed {weights}")
    return weights


def describe_device(run: Run, env: dict) -> dict:
    code = (
        "import json, jax; d = jax.devices()[0]; print(json.dumps({'backend': "
        "jax.default_backend(), 'device': d.device_kind, 'devices': jax.device_count(), "
        "'jax': jax.__version__}))"
    )
    probe_env = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=probe_env
    )
    try:
        device = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        device = {"backend": "unknown", "error": result.stderr[-2000:]}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if smi.returncode == 0:
            device["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return device


def commit(pack: pathlib.Path) -> dict:
    """The commit the pack was made at (its manifest) and the checkout's here
    (``provenance.git_commit``: ``unknown`` where the tree came without git)."""
    found = {"checkout": git_commit(str(REPO))}
    try:
        found["pack"] = json.loads((pack / "manifest.json").read_text()).get("commit")
    except (OSError, ValueError):
        pass
    return found


# ----------------------------------------------------------------------------- stages


def saved_steps(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def teacher_figures(workdir: pathlib.Path, tokens: int) -> dict:
    """The teacher run's training speed and its last validation record."""
    path = workdir / "teacher" / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    figures: dict = {}
    rates = sorted(r["target_tokens_per_s"] for r in train[1:] if "target_tokens_per_s" in r)
    if rates:
        figures["target_tokens_per_s_median"] = rates[len(rates) // 2]
    if len(train) >= 2:
        steps = train[-1]["step"] - train[0]["step"]
        seconds = train[-1]["time"] - train[0]["time"]
        if seconds > 0:
            figures["steps_per_s"] = steps / seconds
            figures["batch_tokens_per_s"] = steps * tokens / seconds
    if valid:
        figures["validation"] = valid
    return figures


def cache_header(workdir: pathlib.Path, split: str) -> dict | None:
    path = workdir / "soft_targets" / split / "header.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pack_caches(run: Run, workdir: pathlib.Path, splits: list[str]) -> bool:
    """The finished caches as ARCHIVE split into parts in OUT; False when they would not
    come back (too many or too large files)."""
    archive = pathlib.Path(run.args.workdir) / ARCHIVE
    begun = time.monotonic()
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        for split in splits:
            tar.add(workdir / "soft_targets" / split, arcname=f"soft_targets/{split}")
    size = archive.stat().st_size
    part_bytes = int(run.args.part_mib * 2**20)
    count = -(-size // part_bytes)
    log_room = 2 << 20  # the log is cut to its last 2 MiB when the parts need the room
    if count > MAX_FILES - 2 or size + log_room + (1 << 20) > TOTAL_LIMIT:
        run.note(f"the archive of {size / 2**20:.1f} MiB does not fit in what comes back")
        archive.unlink()
        return False
    for old in run.out.glob(ARCHIVE + ".part*"):
        old.unlink()
    parts = []
    with open(archive, "rb") as src:
        for number in range(count):
            name = f"{ARCHIVE}.part{number:02d}"
            data = src.read(part_bytes)
            (run.out / name).write_bytes(data)
            parts.append(
                {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
    run.record["archive"] = {"name": ARCHIVE, "bytes": size, "sha256": sha256_file(archive)}
    run.record["parts"] = parts
    archive.unlink()
    run.record["wall_s"]["pack"] = round(time.monotonic() - begun, 1)
    run.say(f"packed {splits} into {len(parts)} part(s), {size / 2**20:.2f} MiB")
    return True


def trim_log(run: Run) -> None:
    run.log.close()
    path = run.out / LOG
    used = sum(p.stat().st_size for p in run.out.iterdir() if p.is_file() and p.name != LOG)
    room = min(FILE_LIMIT, TOTAL_LIMIT - used) - 4096
    if path.stat().st_size > room:
        data = path.read_bytes()[-max(room, 0) :]
        path.write_bytes(b"(cut to its end)\n" + data)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)
    pack = pathlib.Path(args.pack)
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return stages(run, pack, workdir)
    except SystemExit as err:
        run.record["status"] = "failed"
        run.note(str(err))
        return 1
    except BaseException as err:
        run.record["status"] = "failed"
        run.note(f"stopped by {type(err).__name__}: {err}")
        raise
    finally:
        if run.decompressed is not None:
            run.decompressed.unlink(missing_ok=True)
        run.save()
        trim_log(run)


def stages(run: Run, pack: pathlib.Path, workdir: pathlib.Path) -> int:
    args = run.args
    begun = time.monotonic()
    if not (pack / "manifest.json").is_file():
        run.record["status"] = "failed"
        run.note(f"{pack}/manifest.json is missing: run scripts/gpu_pack.py and carry {pack}")
        return 1
    site = install_wheels(run, pack)
    run.decompressed = unpack_teacher(run, pack)
    env = child_env(run, site)
    device = describe_device(run, env)
    run.record["device"] = device
    run.record["commit"] = commit(pack)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.get("backend") == "gpu" else "float32"
    teacher = f"{args.pack}/teacher-fp16"
    student_sets = [f"teacher.checkpoint={teacher}", f"teacher.steps={args.steps}", *args.sets]
    sets = [
        f"data.prepared={pack / 'data'}",
        f"teacher.tokens_per_batch={args.tokens}",
        f"teacher.eval_every={args.every}",
        f"teacher.save_every={args.every}",
        f"train.compute_dtype={dtype}",
        *student_sets,
    ]
    run.record.update(sets=sets, student_sets=student_sets, data=str(pack / "data"))
    run.record["teacher"] = {
        "checkpoint": teacher,
        "steps_planned": args.steps,
        "tokens_per_batch": args.tokens,
        "compute_dtype": dtype,
    }
    run.record["wall_s"]["setup"] = round(time.monotonic() - begun, 1)
    run.say(f"device {device}; {run.left():.0f} s of the budget left")
    run.save()

    cli = [sys.executable, "-m", "distill_jax.cli"]
    common = ["--config", args.config, "--workdir", str(workdir), "--no-progress"]
    common += [arg for s in sets for arg in ("--set", s)]
    quiet_env = {k: v for k, v in env.items() if k != CRASH_ENV}

    # the teacher, stopped when only the reserve is left
    status, stopped = run.run(
        "train_teacher",
        [*cli, "train-teacher", *common],
        run.deadline - args.reserve_s,
        env,
    )
    steps = saved_steps(workdir / "teacher" / "checkpoints")
    info = run.record["teacher"]
    info.update(teacher_figures(workdir, args.tokens))
    info["steps_reached"] = steps[-1] if steps else 0
    info["finished"] = bool(steps) and steps[-1] >= args.steps and status == 0
    run.save()
    if not steps:
        run.record["status"] = "failed"
        run.note(f"train-teacher saved no checkpoint (exit {status})")
        return 1
    extra = []
    if not info["finished"]:
        why = "out of time" if stopped else f"exit {status}"
        run.note(
            f"teacher stopped before step {args.steps} ({why}): the soft targets come from its "
            f"last saved checkpoint, step {steps[-1]}"
        )
        extra = ["--teacher-step", str(steps[-1])]

    # the soft targets: train (what students learn from), then val (the quality figures)
    done = []
    for split in ("train", "val"):
        status, _ = run.run(
            f"soft_targets_{split}",
            [*cli, "soft-targets", *common, "--split", split, *extra],
            run.deadline - args.pack_reserve_s,
            quiet_env,
        )
        header = cache_header(workdir, split)
        if status == 0 and header is not None:
            done.append(split)
            run.record.setdefault("caches", {})[split] = header
        else:
            run.note(f"soft-targets --split {split} did not finish (exit {status})")
            break
        run.save()
    if done:
        info["checkpoint_step"] = run.record["caches"]["train"].get("teacher_step")
        info["checkpoint_digest"] = run.record["caches"]["train"].get("teacher_digest")

    if "val" in done and run.left() > args.pack_reserve_s:
        quality = workdir / "quality_val.json"
        status, _ = run.run(
            "teacher_quality",
            [sys.executable, str(REPO / "scripts" / "teacher_quality.py"), "--config", args.config]
            + ["--workdir", str(workdir), "--split", "val", "--json", str(quality)]
            + [arg for s in sets for arg in ("--set", s)],
            run.deadline - args.pack_reserve_s,
            quiet_env,
        )
        if status == 0 and quality.is_file():
            run.record["quality_val"] = json.loads(quality.read_text())
        run.save()

    if "train" in done:
        for name, fields in args.student_list:
            if run.left() - args.pack_reserve_s < args.student_min_s:
                run.note(f"no time left for the student {name}")
                continue
            student_sets_here = [arg for s in fields for arg in ("--set", s)]
            status, stopped = run.run(
                f"student_{name}",
                [*cli, "train-student", *common, "--name", name, *student_sets_here, *extra],
                run.deadline - args.pack_reserve_s,
                quiet_env,
            )
            results = workdir / "students" / name / "results.json"
            entry = {"sets": fields, "exit": status, "stopped": stopped}
            if results.is_file():
                entry["results"] = json.loads(results.read_text())
            run.record.setdefault("students", {})[name] = entry
            run.save()

    packed = bool(done) and pack_caches(run, workdir, done)
    complete = packed and done == ["train", "val"]
    run.record["status"] = (
        "ok" if complete and info["finished"] else ("partial" if complete else "failed")
    )
    run.say(f"status {run.record['status']}; {run.left():.0f} s of the budget left")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
