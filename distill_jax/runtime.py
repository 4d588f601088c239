"""Process-wide settings that make JAX's CPU backend fast, and applying an experiment's
``runtime`` section (``apply``): call ``configure_host()`` before the first JAX computation
(``distill-jax`` does it before every subcommand, with the default mode; a run's
``runtime.host_memory`` then takes over while no computation has run yet).

XLA's CPU runtime allocates each execution's temporary buffer (activations, gradients:
about 1 GB for the reference student's train step, 80 MB for a teacher forward pass) as
one block, and frees it when the execution ends. glibc serves blocks that large with
``mmap`` and gives them back with ``munmap``, so every step the kernel maps and zeroes
the whole block again, one 4 KiB page fault at a time: 250,000 faults and 0.6-0.8 s of
system time per student step on the development machine, about a tenth of the step.

``configure_host`` makes glibc serve every allocation from its heap and never return
freed memory to the kernel (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD,
max)``), so a freed block is reused by the next execution without a fault, the way
PyTorch's and TensorFlow's caching allocators keep device memory. Large blocks can live
only in glibc's main heap, which the main thread uses; so it also turns off the CPU
client's asynchronous dispatch (``jax_cpu_enable_async_dispatch``), which would run (and
allocate for) each computation on a worker thread. Nothing waits longer because of that:
the training loop reads every step's metrics anyway.

The heap still grows (and faults) when a block does not fit in the freed space, e.g. in
the first steps while other allocations settle around the big blocks; after that a
training loop runs without faults (``tests/test_runtime.py``). The cost: the process
keeps its peak heap size until it exits. Opt out with ``runtime.host_memory=system`` (an
experiment config field, whose default is ``DISTILL_JAX_HOST_MEMORY``, else ``keep``). On other C libraries (macOS, musl) only the dispatch
setting applies. Accelerator backends are unaffected (their memory is the device's).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

ENV_VAR = "DISTILL_JAX_HOST_MEMORY"  # the default of runtime.host_memory
HOST_MEMORY_MODES = ("keep", "system")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_MAX_INT = 2**31 - 1

_state: dict[str, bool] = {}
_mode: list[str] = []  # the mode configure_host applied


def default_host_memory() -> str:
    """``DISTILL_JAX_HOST_MEMORY`` (``keep`` when unset): the default of an experiment's
    ``runtime.host_memory``. Raises ValueError naming the variable for another value."""
    mode = os.environ.get(ENV_VAR, "keep").strip().lower()
    if mode not in HOST_MEMORY_MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected 'keep' or 'system'")
    return mode


def _glibc():
    """The process's glibc, or None (other C libraries have no ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Serves all allocations from glibc's heap and never trims it; True when applied."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _MAX_INT) == 1 and ok
    return ok


def _backends_initialized() -> bool:
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def configure_host(mode: str | None = None) -> dict[str, bool]:
    """Applies the settings of the module docstring for ``mode`` ("keep", or "system":
    none; default :func:`default_host_memory`). Once per process: a later call with the
    same mode returns the first call's result; with another mode, before any JAX
    computation, it undoes the first and applies its own (after one, it warns and keeps
    the first). Returns ``{"keep_freed_memory": ..., "sync_cpu_dispatch": ...}``, what is
    applied."""
    mode = default_host_memory() if mode is None else mode
    if mode not in HOST_MEMORY_MODES:
        raise ValueError(f"host memory mode {mode!r}: expected 'keep' or 'system'")
    if _state:
        if _mode[0] == mode:
            return dict(_state)
        if _backends_initialized():
            logger.warning(
                "host memory mode %r requested after JAX's backends were initialized; keeping %r",
                mode,
                _mode[0],
            )
            return dict(_state)
        _undo()
    _mode[:] = [mode]
    _state["keep_freed_memory"] = False
    _state["sync_cpu_dispatch"] = False
    if mode == "system":
        return dict(_state)
    import jax

    if _backends_initialized():
        # Too late for the dispatch setting: the CPU client exists. Keeping freed memory
        # would then only affect what the main thread allocates.
        logger.warning(
            "configure_host() called after JAX's backends were initialized; "
            "host memory settings not applied"
        )
        return dict(_state)
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _state["sync_cpu_dispatch"] = True
    _state["keep_freed_memory"] = keep_freed_memory()
    return dict(_state)


# glibc's defaults of the two parameters (mallopt(3)); M_MMAP_MAX's is 65536
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024


def _undo() -> None:
    """Restores what ``configure_host`` changed: asynchronous dispatch, and glibc's
    documented default values of the two parameters (its dynamic mmap threshold stays off
    once they were set)."""
    if _state.get("sync_cpu_dispatch"):
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", True)
    if _state.get("keep_freed_memory"):
        libc = _glibc()
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    _state.clear()


def applied_host_memory() -> str | None:
    """The mode :func:`configure_host` applied (None before it ran)."""
    return _mode[0] if _mode else None


def apply(settings) -> None:
    """Applies an experiment's ``runtime`` section (``experiment.RuntimeConfig``) to this
    process, before its first computation: the host-memory mode and the models' fast-path
    switches (the train step's compiler option is passed where the step is made,
    ``trainer.TrainerOptions``). Logs what it applied."""
    from distill_jax.models import fast_paths

    applied = configure_host(settings.host_memory)
    fast_paths.configure(settings.fast_paths, settings.mask_by_bias)
    logger.info(
        "runtime: host_memory=%s %s, fast_paths=%s, mask_by_bias=%s, cpu_copy_region_analysis=%s",
        applied_host_memory(),
        applied,
        settings.fast_paths,
        settings.mask_by_bias,
        settings.cpu_copy_region_analysis,
    )
