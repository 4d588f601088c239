"""Where a result record came from: the machine's CPU and the checkout's commit.

Shared by the scripts that write records into ``results/`` (``report.py``,
``teacher_quality.py``, ``teacher_curve.py``) and by the benchmarks
(``scripts/bench/benchlib.py``), so that every record names the hardware and the code
that produced it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    """The CPU's ``model name`` from /proc/cpuinfo, with its family, model and widest vector
    extension, e.g. ``AMD EPYC (family 25 model 1, AVX2)``: virtual machines often report
    only the vendor's product line, and two CPUs of one line can differ in speed and in
    floating-point results (XLA compiles for the host's vector width).
    ``platform.processor()`` where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return describe_cpu(f.read())
    except OSError:
        return platform.processor() or "unknown"


def describe_cpu(cpuinfo: str) -> str:
    """``cpu_model()``'s text from the contents of /proc/cpuinfo (its first processor)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    vector = next(
        (
            label
            for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
            if flag in flags
        ),
        None,
    )
    detail = []
    if "cpu family" in fields and "model" in fields:
        detail.append(f"family {fields['cpu family']} model {fields['model']}")
    if vector:
        detail.append(vector)
    return f"{name} ({', '.join(detail)})" if detail else name


def _git(root: str, *args: str) -> str:
    """The stripped output of ``git -C root ARGS`` (raises OSError or CalledProcessError)."""
    return subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def git_commit(root: str = REPO) -> str:
    """The checkout's commit (with ``+dirty`` when tracked files differ from it), so that a
    record names the code that produced it; ``unknown`` outside a git checkout."""
    try:
        head = _git(root, "rev-parse", "--short=12", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def sha256_file(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def add_set_argument(parser, help: str) -> None:
    """--set FIELD=VALUE, repeatable, into ``args.sets`` (scripts that must not import
    distill_jax; the commands use ``distill_jax.commands.common.add_overrides_argument``)."""
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE", help=help
    )
