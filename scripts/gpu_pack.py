"""Packs everything a lent GPU run of scripts/gpu_teacher.sh needs that git does not track
into one ignored folder (default ``.device/``), run HERE, on the CPU machine, before the
GPU session; then checks that the folder and the working tree travel together (64 MiB).
docs/gpu.md has the whole round trip.

  python scripts/gpu_pack.py [--out .device] [--teacher DIR] [--data DIR] [--no-wheels]

What it writes into OUT:

* ``data/``: the prepared Multi30k de-en (``scripts/prepare_multi30k.sh OUT TEACHER``, the
  same command and teacher path as scripts/kd_experiment.sh, so the dataset fingerprint is
  the one a CPU work directory prepared here has), or a copy of ``--data DIR``.
* ``teacher-fp16/``: the teacher (default: scripts/fetch_minilm.sh's all-MiniLM-L6-v2) as
  float16 safetensors, compressed (``model.safetensors.xz``; scripts/gpu_teacher.sh
  decompresses it), with its config and tokenizer files. The word-embedding rows of BERT
  pieces that the student vocabulary never maps to are zeroed: the C-MLM teacher never
  reads them (its inputs are ``teacher_ids`` of student ids and the special tokens), so
  training and extraction compute the same values, and the zeros compress away. Weights
  that no loader reads (pooler, BERT's own MLM output) are left out. Before compressing,
  ``distill_jax.hf.load_bert`` reads the file back and every parameter is checked to equal
  the original's float32 value rounded to float16 (zero on the zeroed rows).
* ``wheels/``: wheels for the GPU machine's Python 3.12 (x86-64) of the packages it lacks
  (the data pipeline's tensorflow-datasets, grain, array_record and what they import, and
  the scoring's rouge-score and sacremoses), the versions installed here.
* ``manifest.json``: the commit, the teacher's source and checks, the dataset's identity,
  the wheels and every file's size.

Exit status: 0 packed and fits, 1 packed but over the 64 MiB that may travel, 2 bad
arguments or input (a message names it).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from provenance import git_commit, sha256_file  # noqa: E402

TRAVEL_LIMIT = 64 << 20  # what may travel to the device machine: working tree + carried paths
TEACHER_DIR = "teacher-fp16"
COMPRESSED = "model.safetensors.xz"
TEACHER_FILES = (
    "config.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Keys of a BERT checkpoint that distill_jax.hf.load_bert never reads (hf.IGNORED_KEYS).
UNREAD_KEYS = re.compile(
    r"(bert\.)?(pooler\..*|embeddings\.position_ids|embeddings\.token_type_ids|"
    r"cls\.predictions\.decoder\..*|cls\.predictions\.bias|cls\.seq_relationship\..*)"
)
WORD_EMBEDDINGS = re.compile(r"(bert\.)?embeddings\.word_embeddings\.weight")
# Packages the GPU machine's image lacks (docs/gpu.md): compiled ones come as manylinux
# wheels for CPython 3.12; pure-Python ones as any wheel (built here from an sdist when PyPI
# has no wheel, e.g. promise and rouge-score).
BINARY_WHEELS = ("grain", "array_record", "dm-tree")
PURE_WHEELS = (
    "tensorflow-datasets",
    "tensorflow-metadata",
    "promise",
    "toml",
    "immutabledict",
    "portpicker",
    "rouge-score",
    "nltk",
    "sacremoses",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


class PackError(Exception):
    """Bad input: reported with exit status 2."""


def tree_bytes(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def working_tree_bytes() -> int:
    """What the device tool sends besides carried paths: tracked files and untracked files
    that git does not ignore."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    total = 0
    for name in filter(None, listing.split(b"\0")):
        path = REPO / os.fsdecode(name)
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def replace_dir(staging: pathlib.Path, dest: pathlib.Path) -> None:
    """Puts the finished ``staging`` folder at ``dest`` (an older ``dest`` is removed)."""
    if dest.exists():
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        shutil.rmtree(old)
    os.replace(staging, dest)


# ----------------------------------------------------------------------------- data


def pack_data(out: pathlib.Path, teacher: pathlib.Path, data: pathlib.Path | None) -> dict:
    dest = out / "data"
    if data is not None:
        if not (data / "dataset.json").is_file():
            raise PackError(f"--data {data}: not a prepared dataset (no dataset.json)")
        if not ((dest / "dataset.json").is_file() and same_tree(data, dest)):
            staging = pathlib.Path(tempfile.mkdtemp(dir=out, prefix=".data-"))
            shutil.rmtree(staging)
            shutil.copytree(data, staging)
            replace_dir(staging, dest)
    else:
        subprocess.run(
            ["bash", str(REPO / "scripts" / "prepare_multi30k.sh"), str(out), str(teacher)],
            check=True,
            env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
        )
    meta = json.loads((dest / "dataset.json").read_text(encoding="utf-8"))
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return {
        "dir": "data",
        "dataset": f"{meta['tfds_name']}@{fingerprint[:16]}",
        "vocabulary": meta["vocab"]["sha256"],
        "prepared_with_teacher": meta["vocab"].get("teacher"),
        "splits": sorted(meta["splits"]),
    }


def same_tree(a: pathlib.Path, b: pathlib.Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(
        (a / f).stat().st_size == (b / f).stat().st_size
        and sha256_file(a / f) == sha256_file(b / f)
        for f in files_a
    )


# ----------------------------------------------------------------------------- teacher


def used_teacher_ids(data: pathlib.Path) -> np.ndarray:
    """The BERT ids the C-MLM teacher can read: the teacher ids of every student id and
    the special tokens ([CLS], [SEP], [PAD], [UNK], [MASK])."""
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))
    ids = set(int(i) for i in vocab["teacher_ids"])
    ids.update(int(i) for i in vocab["teacher_special_ids"].values())
    return np.array(sorted(ids), np.int64)


def convert_teacher(source: pathlib.Path, staging: pathlib.Path, keep: np.ndarray) -> dict:
    """Writes ``staging/model.safetensors`` (float16, unread rows zeroed, unread keys
    dropped) and the config and tokenizer files; returns what was done."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    weights = source / "model.safetensors"
    if not weights.is_file():
        raise PackError(f"--teacher {source}: no model.safetensors (a single-file checkpoint)")
    tensors, dropped, zeroed, largest = {}, [], 0, 0.0
    with safe_open(weights, "np") as f:
        for key in f.keys():
            if UNREAD_KEYS.fullmatch(key):
                dropped.append(key)
                continue
            array = f.get_tensor(key)
            if array.dtype.kind != "f":
                tensors[key] = array
                continue
            largest = max(largest, float(np.abs(array).max(initial=0.0)))
            array = array.astype(np.float16)
            if WORD_EMBEDDINGS.fullmatch(key):
                mask = np.zeros(array.shape[0], bool)
                mask[keep[keep < array.shape[0]]] = True
                zeroed = int((~mask).sum())
                array[~mask] = 0
            tensors[key] = array
    if largest >= float(np.finfo(np.float16).max):
        raise PackError(f"{weights}: a weight of magnitude {largest:g} overflows float16")
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    for name in TEACHER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, staging / name)
    if not (staging / "config.json").is_file():
        raise PackError(f"--teacher {source}: no config.json")
    return {"dropped_keys": dropped, "zeroed_embedding_rows": zeroed, "kept_rows": len(keep)}


def check_teacher(source: pathlib.Path, packed: pathlib.Path, keep: np.ndarray) -> float:
    """Loads both checkpoints with distill_jax.hf.load_bert and checks that every packed
    parameter is the original's float32 value rounded to float16 (zero on the zeroed
    embedding rows); returns the largest difference from the original."""
    import jax

    from distill_jax.hf import load_bert

    _, original, _ = load_bert(str(source))
    _, loaded, _ = load_bert(str(packed))
    flat_original = dict(jax.tree_util.tree_flatten_with_path(original)[0])
    flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    if flat_original.keys() != flat_loaded.keys():
        raise PackError(f"{packed}: load_bert reads other parameters than from {source}")
    largest = 0.0
    for path, value in flat_original.items():
        value = np.asarray(value, np.float32)
        want = value.astype(np.float16).astype(np.float32)
        name = jax.tree_util.keystr(path)
        if "word_embeddings" in name:
            mask = np.zeros(want.shape[0], bool)
            mask[keep[keep < want.shape[0]]] = True
            want[~mask] = 0
            largest = max(largest, float(np.abs(want[mask] - value[mask]).max(initial=0.0)))
        else:
            largest = max(largest, float(np.abs(want - value).max(initial=0.0)))
        got = np.asarray(flat_loaded[path], np.float32)
        if got.dtype != np.float32 or not np.array_equal(got, want):
            raise PackError(f"{packed}: {name} does not read back as the float16-rounded value")
    return largest


def pack_teacher(out: pathlib.Path, source: pathlib.Path, data: pathlib.Path) -> dict:
    keep = used_teacher_ids(data)
    staging = pathlib.Path(tempfile.mkdtemp(dir=out, prefix=".teacher-"))
    try:
        done = convert_teacher(source, staging, keep)
        largest = check_teacher(source, staging, keep)
        raw = staging / "model.safetensors"
        digest, size = sha256_file(raw), raw.stat().st_size
        with open(raw, "rb") as src, lzma.open(staging / COMPRESSED, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        raw.unlink()
        replace_dir(staging, out / TEACHER_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "dir": TEACHER_DIR,
        "source": str(source),
        "dtype": "float16",
        "safetensors": "model.safetensors",
        "safetensors_bytes": size,
        "safetensors_sha256": digest,
        "compressed": COMPRESSED,
        "compressed_bytes": (out / TEACHER_DIR / COMPRESSED).stat().st_size,
        "max_abs_difference_from_float32": largest,
        **done,
    }


# ----------------------------------------------------------------------------- wheels


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise PackError(
            f"{name} is not installed here, so its version is unknown (pip install -e .)"
        ) from None


def pack_wheels(out: pathlib.Path) -> list[dict]:
    dest = out / "wheels"
    dest.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    wanted = {}
    for name in BINARY_WHEELS + PURE_WHEELS:
        wanted[name] = installed_version(name)
    for name in BINARY_WHEELS:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run(
            [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version"]
            + ["3.12", "--implementation", "cp", *platforms, "-d", str(dest)]
            + [f"{name}=={wanted[name]}"],
            check=True,
        )
    for name in PURE_WHEELS:
        subprocess.run(
            [*pip, "wheel", "-q", "--no-deps", "-w", str(dest), f"{name}=={wanted[name]}"],
            check=True,
        )
    normal = {re.sub(r"[-_.]+", "_", n).lower(): v for n, v in wanted.items()}
    wheels = []
    for wheel in sorted(dest.glob("*.whl")):
        project, version = wheel.name.split("-")[:2]
        if normal.get(project.lower()) != version:
            wheel.unlink()  # another version from an earlier pack: two stop the install
            continue
        wheels.append({"file": wheel.name, "bytes": wheel.stat().st_size})
    missing = set(normal) - {w["file"].split("-")[0].lower() for w in wheels}
    if missing:
        raise PackError(f"no wheel was made for {sorted(missing)} in {dest}")
    return wheels


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Pack what a lent GPU run of scripts/gpu_teacher.sh needs (docs/gpu.md)."
    )
    parser.add_argument("--out", default=".device", help="the folder to fill (default .device)")
    parser.add_argument(
        "--teacher", help="a BERT folder (default: scripts/fetch_minilm.sh's all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--data", help="a prepared dataset to copy (default: prepare Multi30k de-en into OUT/data)"
    )
    parser.add_argument(
        "--no-wheels", action="store_true", help="no wheels (a run where the packages are there)"
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.teacher:
            teacher = pathlib.Path(args.teacher)
        else:
            fetched = subprocess.run(
                ["bash", str(REPO / "scripts" / "fetch_minilm.sh")],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
            )
            teacher = pathlib.Path(fetched.stdout.strip().splitlines()[-1])
        if not (teacher / "config.json").is_file():
            raise PackError(f"--teacher {teacher}: not a BERT folder (no config.json)")
        data_info = pack_data(out, teacher, pathlib.Path(args.data) if args.data else None)
        print(f"data: {out / 'data'} ({data_info['dataset']})", flush=True)
        teacher_info = pack_teacher(out, teacher, out / "data")
        print(
            f"teacher: {out / TEACHER_DIR} (float16, {teacher_info['zeroed_embedding_rows']} "
            f"unread embedding rows zeroed, largest rounding {teacher_info['max_abs_difference_from_float32']:.2e}, "
            f"{teacher_info['compressed_bytes'] / 2**20:.1f} MiB compressed)",
            flush=True,
        )
        if args.no_wheels:
            shutil.rmtree(out / "wheels", ignore_errors=True)
            wheels = []
        else:
            wheels = pack_wheels(out)
            print(f"wheels: {len(wheels)} in {out / 'wheels'}", flush=True)
    except PackError as err:
        print(f"gpu_pack: error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(
            f"gpu_pack: error: {' '.join(map(str, err.cmd))} failed ({err.returncode})",
            file=sys.stderr,
        )
        return 2
    sizes = {
        name: tree_bytes(out / name)
        for name in ("data", TEACHER_DIR, "wheels")
        if (out / name).exists()
    }
    tree = working_tree_bytes()
    manifest = {
        "format": "distill-jax-gpu-pack/1",
        "commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": data_info,
        "teacher": teacher_info,
        "wheels": wheels,
        "bytes": {**sizes, "working_tree": tree},
    }
    text = json.dumps(manifest, indent=1) + "\n"
    total = tree + sum(sizes.values()) + len(text.encode())
    manifest["bytes"]["travel_total"] = total
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, size in [*sizes.items(), ("working tree (tracked + untracked)", tree)]:
        print(f"  {size / 2**20:7.2f} MiB  {name}")
    verdict = "fits" if total <= TRAVEL_LIMIT else "does NOT fit"
    print(
        f"travel total {total / 2**20:.2f} MiB of {TRAVEL_LIMIT >> 20} MiB: {verdict} "
        f"(carry {out} with the working tree)"
    )
    return 0 if total <= TRAVEL_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
