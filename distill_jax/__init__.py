"""distill-jax: distil knowledge learned by a C-MLM fine-tuned BERT into a Transformer
sequence-to-sequence student (Chen et al., ACL 2020), in JAX/Flax.

The Python API (``distill_jax.api``, docs/api.md) is available from the package itself::

    import distill_jax as dj
    config = dj.load_config("configs/multi30k_de_en.py", ["train.steps=100"])
    dj.train_student(config, "runs/m30k")

Its names are imported on first use, so that ``import distill_jax`` (and the
``distill-jax`` command's start) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = (
    "load_config",
    "train_teacher",
    "extract_soft_targets",
    "train_student",
    "score",
    "Student",
    "TeacherRun",
    "StudentRun",
    "SoftTargets",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("distill_jax.api"), name)
    raise AttributeError(f"module 'distill_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
