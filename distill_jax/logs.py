"""Status messages through :mod:`logging`: the ``distill_jax`` logger hierarchy.

Every module logs to ``logging.getLogger(__name__)`` (a child of ``distill_jax``);
:func:`configured`, which the ``distill-jax`` command runs in (``--verbosity``), gives the
hierarchy one handler on standard error with the time and the level::

    2026-12-05 02:30:00 INFO distill_jax.data.iwslt14: ...

Standard output keeps what a command produces (tables, scores, generated text), so that it
can be piped; status lines never go there.

In a multi-process JAX job (``jax.distributed``) only process 0 logs below WARNING: the
other processes would repeat the same status lines. Their warnings and errors are logged
with ``[process N]`` before the message. Before ``jax.distributed`` is initialized a
process counts as process 0.

A program that uses the library without the command configures logging as it likes; until
then Python's default applies (warnings and errors only, on standard error).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

ROOT = "distill_jax"
VERBOSITIES: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def process_index() -> int:
    """This process's index in a multi-process JAX job; 0 when JAX is not imported or
    ``jax.distributed`` is not initialized (asking JAX then would start its backend)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 0
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is None or not is_initialized():
        return 0
    return int(jax.process_index())


class _StandardError(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted (so
    that a redirection made after :func:`configured`, e.g. pytest's capture, sees it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class ChiefOnly(logging.Filter):
    """Drops records below WARNING on every process but process 0."""

    def __init__(self, index: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.index = index or process_index

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self.index() == 0


class Formatter(logging.Formatter):
    """:data:`FORMAT`, with ``[process N]`` before the message of a process other than 0."""

    def __init__(self, index: Callable[[], int] | None = None) -> None:
        super().__init__(FORMAT, DATE_FORMAT)
        self.index = index or process_index

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        text = super().formatMessage(record)
        index = self.index()
        if index:
            head, sep, message = text.partition(f"{record.name}: ")
            text = f"{head}{sep}[process {index}] {message}"
        return text


def parse_verbosity(value: str) -> int:
    """The logging level of a ``--verbosity`` value (case-insensitive); ``ValueError``
    naming the choices otherwise."""
    try:
        return VERBOSITIES[value.lower()]
    except KeyError:
        raise ValueError(
            f"unknown verbosity {value!r}; choose one of {', '.join(VERBOSITIES)}"
        ) from None


@contextlib.contextmanager
def configured(verbosity: str = "info") -> Iterator[logging.Logger]:
    """Within the block, the ``distill_jax`` logger has ``verbosity``'s level and one
    handler on standard error (:data:`FORMAT`), and its records do not propagate to the
    root logger (whose handlers, installed by some dependencies, would repeat them);
    afterwards it is as it was, so that a program or test that calls the command in
    process keeps its own logging set-up."""
    logger = logging.getLogger(ROOT)
    level = parse_verbosity(verbosity)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    handler = _StandardError()
    handler.setFormatter(Formatter())
    handler.addFilter(ChiefOnly())
    logger.setLevel(level)
    logger.handlers = [handler]
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]
