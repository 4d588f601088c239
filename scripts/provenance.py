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
    """The CPU's ``model name`` from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
