"""Watching a training run: TensorBoard event files and ``jax.profiler`` traces.

* :class:`TensorBoardWriter` writes scalars (losses, metrics, the learning rate) and text
  (sample translations) to ``RUN_DIR/tensorboard/`` when the ``tensorboard`` extra
  (``pip install -e ".[tensorboard]"``: tensorboardX, which writes event files without
  TensorFlow) is installed; otherwise it does nothing and logs one notice. Only process 0
  writes, and only into a local run directory (a ``gs://`` one gets a notice).
  ``metrics.jsonl`` stays the run's record; the event files are a view of it.
* :class:`StepProfiler` traces the training steps of ``--profile-steps A:B``
  (:func:`parse_profile_steps`) with ``jax.profiler`` into ``RUN_DIR/profile/``, for
  TensorBoard's profile plugin, XProf or Perfetto.
* :class:`TensorBoardCallback` and :class:`ProfileCallback` hook both into
  :class:`distill_jax.runner.TrainLoop` (``callbacks=[...]``).

Steps are counted as the state's step counter is: step ``s`` is the update that takes the
state from ``s`` to ``s + 1`` (the metrics log records it as step ``s + 1``). ``A:B``
traces steps ``A`` to ``B - 1``, the updates from state step ``A`` to ``B``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distill_jax import runner, storage
from distill_jax.errors import UserError

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
INSTALL_HINT = 'pip install -e ".[tensorboard]"'
_notified: set[str] = set()  # the notices already logged by this process


def _notice_once(key: str, message: str, *args: Any) -> None:
    if key not in _notified:
        _notified.add(key)
        logger.info(message, *args)


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardWriter:
    """TensorBoard event files of one run directory (``RUN_DIR/tensorboard/``).

    ``enabled`` is whether this process writes (process 0 of the job); a writer that cannot
    write (tensorboardX missing, a ``gs://`` run directory, another process) takes every
    call and does nothing. ``resume_step``: the step a resumed run restarted from; the
    events an earlier, killed run logged after it are hidden by TensorBoard (tensorboardX's
    ``purge_step``), as ``metrics.jsonl`` drops those records.
    """

    def __init__(
        self, run_dir: storage.PathLike, *, enabled: bool = True, resume_step: int | None = None
    ) -> None:
        self.directory = storage.path(run_dir) / TENSORBOARD_DIR
        self._writer = None
        if not enabled:
            return
        if storage.is_remote(self.directory):
            _notice_once(
                "remote",
                "TensorBoard event files are written for local run directories only, not %s",
                self.directory,
            )
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            _notice_once(
                "missing",
                "tensorboardX is not installed: no TensorBoard event files (%s adds them)",
                INSTALL_HINT,
            )
            return
        storage.makedirs(self.directory)
        purge = None if not resume_step else int(resume_step) + 1
        self._writer = SummaryWriter(logdir=str(self.directory), purge_step=purge)

    @property
    def active(self) -> bool:
        """Whether event files are being written."""
        return self._writer is not None

    def scalars(self, step: int, split: str, values: Mapping[str, float]) -> None:
        """``values`` as the scalars ``SPLIT/NAME`` at ``step``."""
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", float(value), int(step))

    def text(self, step: int, tag: str, text: str) -> None:
        """A text (Markdown) at ``step``."""
        if self._writer is not None:
            self._writer.add_text(tag, text, int(step))

    def samples(
        self,
        step: int,
        sources: Sequence[str],
        hypotheses: Sequence[str],
        references: Sequence[str],
        *,
        tag: str = "valid/samples",
    ) -> None:
        """Sample translations as one Markdown table at ``step``."""
        if self._writer is not None:
            self.text(step, tag, samples_table(sources, hypotheses, references))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def samples_table(
    sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[str]
) -> str:
    """A Markdown table of (source, hypothesis, reference) rows; ``|`` is escaped."""
    if not len(sources) == len(hypotheses) == len(references):
        raise ValueError(
            f"{len(sources)} sources, {len(hypotheses)} hypotheses and "
            f"{len(references)} references: one of each per row"
        )

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| source | hypothesis | reference |", "|---|---|---|"]
    rows += [
        f"| {cell(s)} | {cell(h)} | {cell(r)} |" for s, h, r in zip(sources, hypotheses, references)
    ]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- profiling


def parse_profile_steps(text: str) -> tuple[int, int]:
    """``"A:B"`` as ``(A, B)``: integers with ``0 <= A < B``. For ``argparse``'s ``type=``
    (a bad value stops the command with exit status 2, naming the problem)."""
    first, sep, last = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start, stop = int(first), int(last)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not A:B (two integers, the first step traced and the step after "
            "the last, e.g. 10:15)"
        ) from None
    if start < 0 or stop < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: steps are counted from 0, not negative")
    if start >= stop:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the first step A must be below B (A:B traces steps A to B-1)"
        )
    return start, stop


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """``--profile-steps A:B`` on a training command's parser."""
    parser.add_argument(
        "--profile-steps",
        type=parse_profile_steps,
        default=None,
        metavar="A:B",
        help="write a jax.profiler trace of training steps A to B-1 (the updates from state "
        "step A to B) into RUN_DIR/profile/ (view it with TensorBoard's profile plugin "
        "or XProf)",
    )


class StepProfiler:
    """Traces the steps ``[start, stop)`` of a training loop with ``jax.profiler``.

    Call :meth:`before_step` before and :meth:`after_step` after each step (with the
    step's index, see the module docstring), and :meth:`close` when the loop ends: the trace
    starts before step ``start`` (or the first step of the window a resumed run reaches)
    and stops after step ``stop - 1`` or at :meth:`close`, whichever is first. Without a
    window every call does nothing. Every process traces its own steps; on a ``gs://`` run
    directory the trace is written locally, then copied there.
    """

    def __init__(self, window: tuple[int, int] | None, run_dir: storage.PathLike) -> None:
        self.window = window
        self.directory = storage.path(run_dir) / PROFILE_DIR
        self.traced: list[int] = []  # the steps inside the trace
        self._local: Path | None = None
        self._running = False
        self._done = False

    def check(self, first_step: int, total_steps: int) -> None:
        """Refuses a window that the run's steps ``[first_step, total_steps)`` never reach."""
        if self.window is None:
            return
        start, stop = self.window
        if start >= total_steps or stop <= first_step:
            raise UserError(
                f"--profile-steps {start}:{stop}: the run's steps are {first_step} to "
                f"{total_steps - 1}, so nothing would be traced"
            )

    def before_step(self, step: int) -> None:
        if self.window is None or self._running or self._done:
            return
        start, stop = self.window
        if start <= step < stop:
            import jax

            if storage.is_remote(self.directory):
                self._local = Path(tempfile.mkdtemp(prefix="distill-jax-profile-"))
                target = self._local
            else:
                storage.makedirs(self.directory)
                target = Path(str(self.directory))
            logger.info("profiling steps %d to %d into %s", step, stop - 1, self.directory)
            jax.profiler.start_trace(str(target))
            self._running = True

    def after_step(self, step: int, outputs: Any = None) -> None:
        """Ends the trace after the window's last step, once ``outputs`` (the step's
        results, if given) are computed."""
        if not self._running:
            return
        self.traced.append(int(step))
        if step >= self.window[1] - 1:
            self._stop(outputs)

    def close(self, outputs: Any = None) -> None:
        """Ends a trace still running (the loop stopped inside the window)."""
        if self._running:
            self._stop(outputs)

    def _stop(self, outputs: Any) -> None:
        import jax

        if outputs is not None:
            jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self._running, self._done = False, True
        if self._local is not None:
            for path in sorted(self._local.rglob("*")):
                if path.is_file():
                    target = self.directory / str(path.relative_to(self._local))
                    storage.makedirs(target.parent)
                    target.write_bytes(path.read_bytes())
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None
        logger.info(
            "profile of steps %d to %d written to %s",
            self.traced[0],
            self.traced[-1],
            self.directory,
        )


# ----------------------------------------------------------------------------- loop hooks


class TensorBoardCallback(runner.Callback):
    """Writes a training loop's records to a :class:`TensorBoardWriter`: each training-log
    record with ``learning_rate``, the rate the schedule gave the record's last update
    (optax counts updates from 0: update ``step`` used ``learning_rate(step - 1)``), each
    validation's values, and at each validation the rows ``samples(state, step)`` returns,
    ``(sources, hypotheses, references)`` (e.g. a few validation sources translated
    greedily). ``samples`` is called on every process (a translation is a computation of
    the whole job); only an active writer records them. The writer is closed at the end."""

    def __init__(
        self,
        writer: TensorBoardWriter,
        *,
        learning_rate: Callable[[int], Any] | None = None,
        samples: Callable[[Any, int], tuple[Sequence[str], Sequence[str], Sequence[str]]]
        | None = None,
    ) -> None:
        self.writer = writer
        self.learning_rate = learning_rate
        self.samples = samples

    def on_train_log(self, step: int, values: Mapping[str, float]) -> None:
        values = dict(values)
        if self.learning_rate is not None:
            values["learning_rate"] = float(self.learning_rate(step - 1))
        self.writer.scalars(step, "train", values)

    def on_eval(self, step: int, values: Mapping[str, float], state: Any) -> None:
        self.writer.scalars(step, "valid", values)
        if self.samples is not None:
            self.writer.samples(step, *self.samples(state, step))
        self.writer.flush()

    def on_end(self, step: int, state: Any) -> None:
        self.writer.close()


class ProfileCallback(runner.Callback):
    """Drives a :class:`StepProfiler` from a training loop (whose ``step`` is the number
    of updates done: the update about to run in ``on_step_begin(step)`` is the profiler's
    step ``step``, and ``on_step_end(step)`` ends step ``step - 1``)."""

    def __init__(self, profiler: StepProfiler) -> None:
        self.profiler = profiler

    def on_step_begin(self, step: int) -> None:
        self.profiler.before_step(step)

    def on_step_end(self, step: int, state: Any, metrics: Mapping[str, Any]) -> None:
        self.profiler.after_step(step - 1, state)

    def on_end(self, step: int, state: Any) -> None:
        self.profiler.close(state)
