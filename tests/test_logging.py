"""Status messages through `logging` (distill_jax/logs.py) and the `--verbosity` flag."""

import logging
import re

import pytest

from distill_jax import logs
from distill_jax.cli import main

from tiny_experiment import local_corpus_args

INFO_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO distill_jax\.commands\.prepare: read local "
    r"\(src-tgt\): train 3 pairs$",
    re.M,
)


def _prepare(tmp_path, minilm_dir, name, *verbosity_before, after=()):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "train.src").write_text("ein hund läuft .\nzwei katzen\nder mann\n")
    (data / "train.tgt").write_text("a dog runs .\ntwo cats\nthe man\n")
    args = local_corpus_args(
        data, minilm_dir, ["train=train.src,train.tgt"], "--out", str(tmp_path / name), *after
    )
    return main([*verbosity_before, "prepare", *args])


def test_verbosity_selects_the_status_messages(tmp_path, minilm_dir, capsys):
    assert _prepare(tmp_path, minilm_dir, "default") == 0
    default = capsys.readouterr()
    assert INFO_LINE.search(default.err), default.err  # time, level, logger, message
    assert "INFO distill_jax.data.builders: encoding train: 3 pairs" in default.err
    assert "INFO" not in default.out  # results only on standard output
    assert re.search(r"^train\s+3\s+3\s+0\s+0$", default.out, re.M)

    assert _prepare(tmp_path, minilm_dir, "quiet", "--verbosity", "warning") == 0
    quiet = capsys.readouterr()
    assert "INFO" not in quiet.err, quiet.err
    table = default.out[default.out.index(f"prepared {tmp_path}") :]  # (TFDS prints its own lines)
    assert table.replace(str(tmp_path / "default"), str(tmp_path / "quiet")) in quiet.out

    # After the subcommand too, in any case.
    assert _prepare(tmp_path, minilm_dir, "after", after=("--verbosity", "ERROR")) == 0
    assert "INFO" not in capsys.readouterr().err
    assert _prepare(tmp_path, minilm_dir, "debug", after=("--verbosity", "debug")) == 0
    assert INFO_LINE.search(capsys.readouterr().err)


def test_an_unknown_verbosity_is_refused_with_the_choices(tmp_path, capsys):
    for argv in (
        ["--verbosity", "loud", "evaluate", "--hyp", "h", "--ref", "r"],
        ["evaluate", "--hyp", "h", "--ref", "r", "--verbosity", "loud"],
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "argument --verbosity: invalid choice: 'loud'" in err
        assert "'debug', 'info', 'warning', 'error'" in err


def test_only_process_0_logs_below_warning(capsys):
    logger = logging.getLogger("distill_jax.test")
    with logs.configured("info") as root:
        for index in (0, 3):
            root.handlers[0].filters[0].index = lambda index=index: index
            root.handlers[0].formatter.index = lambda index=index: index
            logger.info("status %d", index)
            logger.warning("look at %d", index)
    err = capsys.readouterr().err
    assert "INFO distill_jax.test: status 0" in err
    assert "WARNING distill_jax.test: look at 0" in err
    assert "status 3" not in err
    assert "WARNING distill_jax.test: [process 3] look at 3" in err


def test_the_logging_set_up_is_restored_after_a_command():
    """A program (or test) that runs the command in process keeps its own set-up: records
    propagate again and the level is back."""
    logger = logging.getLogger("distill_jax")
    before = (logger.level, logger.propagate, list(logger.handlers))
    with logs.configured("debug"):
        assert logger.level == logging.DEBUG and not logger.propagate
        assert len(logger.handlers) == 1
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    with pytest.raises(ValueError, match="unknown verbosity 'loud'; choose one of debug"):
        logs.parse_verbosity("loud")


def test_the_process_index_does_not_start_jax():
    """Before jax.distributed is initialized a process counts as process 0 (asking JAX's
    backend would fix it before the job is joined)."""
    assert logs.process_index() == 0
