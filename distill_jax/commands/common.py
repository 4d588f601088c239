"""What every training subcommand parses: --config, --workdir, --set and the
multi-process flags, and the experiment config they name."""

from __future__ import annotations

import argparse
import os

from distill_jax import api, sharding, storage
from distill_jax.experiment import ExperimentConfig


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --workdir, --set and the multi-process flags of every training command."""
    parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
    parser.add_argument(
        "--workdir",
        required=True,
        help="directory of the experiment: a local path or gs://BUCKET/PATH",
    )
    add_overrides_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = parser.add_argument_group("multi-process (TPU pods, GPU clusters)")
    group.add_argument(
        "--coordinator",
        default=os.environ.get("DISTILL_JAX_COORDINATOR"),
        help="host:port of process 0 (env DISTILL_JAX_COORDINATOR)",
    )
    group.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("DISTILL_JAX_NUM_PROCESSES"),
        help="number of processes (env DISTILL_JAX_NUM_PROCESSES)",
    )
    group.add_argument(
        "--process-id",
        type=int,
        default=_env_int("DISTILL_JAX_PROCESS_ID"),
        help="this process's id (env DISTILL_JAX_PROCESS_ID)",
    )
    group.add_argument(
        "--distributed-auto",
        action="store_true",
        help="let jax.distributed.initialize() detect the cluster (TPU pods, SLURM)",
    )


def add_overrides_argument(
    parser: argparse.ArgumentParser, help: str = "override a config field, e.g. train.steps=100"
) -> None:
    """--set FIELD=VALUE, repeatable, into ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help=help
    )


def add_trained_student_arguments(parser: argparse.ArgumentParser) -> None:
    """The common arguments plus which trained student to use (generate, export)."""
    add_common_arguments(parser)
    parser.add_argument(
        "--name", default=None, help="student run under WORKDIR/students (default: from distill.kd)"
    )
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="'best' (validation BLEU), 'latest', 'averaged' or a step number",
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def initialize_processes(args: argparse.Namespace) -> None:
    """Joins the processes of a multi-process run from the parsed flags (no-op for a single
    process; ``sharding.maybe_initialize_distributed``)."""
    sharding.maybe_initialize_distributed(
        args.coordinator,
        args.num_processes,
        args.process_id,
        auto=getattr(args, "distributed_auto", False),
    )


def workdir(args: argparse.Namespace) -> storage.epath.Path:
    """``--workdir`` as a path (local or ``gs://``); a bucket that cannot be reached, is
    missing or lacks credentials is refused here, before any work starts."""
    storage.check_access(args.workdir)
    return storage.path(args.workdir)


def load_experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The config file with the command-line overrides (and, for a baseline, the config's
    ``baseline_overrides``) applied (``api.load_config``)."""
    return api.load_config(args.config, args.overrides)
