"""Every numeric field of the experiment config has a valid range, checked before any work
(issue #34 item 5): out-of-range values stop a command with exit 2 naming the field."""

import copy
import math

import pytest

from distill_jax import cli, configlib
from distill_jax.experiment import RANGES, ExperimentConfig, check_ranges, numeric_fields

import tiny_experiment

CONFIG = "configs/tiny.py"


def test_every_numeric_field_has_a_range():
    fields = numeric_fields(configlib.load_config_file(CONFIG))
    assert sorted(set(fields) - set(RANGES)) == [], "numeric fields without a range"
    assert sorted(set(RANGES) - set(fields)) == [], "ranges of fields that do not exist"


def _bad_values(name):
    """Values just outside the range of ``name`` (and the non-finite ones)."""
    allowed = RANGES[name]
    integer = isinstance(numeric_fields(ExperimentConfig())[name], int) and not name.endswith(
        "grad_clip_norm"
    )
    out = []
    if allowed.low is not None:
        out.append(allowed.low if allowed.low_open else allowed.low - (1 if integer else 1e-3))
    if allowed.high is not None:
        out.append(allowed.high if allowed.high_open else allowed.high + (1 if integer else 1e-3))
    if not integer:
        out += [math.nan, math.inf]
    return [int(v) if integer else float(v) for v in out if v not in allowed.also]


CASES = [(name, value) for name in sorted(RANGES) for value in _bad_values(name)]


@pytest.mark.parametrize("name,value", CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_out_of_range_value_is_refused_naming_the_field(name, value):
    config = copy.deepcopy(configlib.load_config_file(CONFIG))  # (defaults are shared)
    section, field = name.split(".")
    # dataclasses.replace would run the sections' own __post_init__ checks; set the field
    # directly to test the range table alone.
    object.__setattr__(getattr(config, section), field, value)
    with pytest.raises(ValueError) as info:
        check_ranges(config)
    assert str(info.value).startswith(f"{name} must be "), info.value
    assert str(info.value).endswith(f"got {value!r}")


def test_values_in_range_pass():
    for name in ("configs/tiny.py", "configs/multi30k_full.py", "configs/iwslt14_de_en.py"):
        configlib.load_config_file(name).check()
    # the edges of the ranges are valid
    config = configlib.override(
        configlib.load_config_file(CONFIG),
        [
            "distill.alpha=0",
            "distill.alpha=1",
            "train.steps=1",
            "data.train_examples=0",
            "train.grad_clip_norm=None",
            "mesh.data=-1",
            "train.label_smoothing=0",
        ],
    )
    config.check()


# The cases, through the command line: exit 2, the field named, nothing written.
CLI_CASES = [
    ("train-student", "train.steps=-5", "train.steps must be ≥ 1, got -5"),
    ("train-student", "train.steps=0", "train.steps must be ≥ 1, got 0"),
    ("train-student", "train.learning_rate=-1", "train.learning_rate must be > 0, got -1.0"),
    ("train-student", "train.eval_every=0", "train.eval_every must be ≥ 1, got 0"),
    ("train-teacher", "teacher.steps=-1", "teacher.steps must be ≥ 1, got -1"),
    ("train-student", "distill.temperature=0", "distill.temperature must be > 0, got 0.0"),
    ("train-student", "distill.alpha=1.5", "distill.alpha must be in [0, 1], got 1.5"),
    ("soft-targets", "teacher.top_k=0", "teacher.top_k must be ≥ 1, got 0"),
    ("train-student", "student.dropout_rate=1", "student.dropout_rate must be in [0, 1), got 1.0"),
    ("train-student", "data.tokens_per_batch=0", "data.tokens_per_batch must be ≥ 1, got 0"),
    ("train-student", "distill.top_k=9", "distill.top_k 9 is larger than teacher.top_k 4"),
]


@pytest.mark.parametrize("command,assignment,message", CLI_CASES, ids=[c[1] for c in CLI_CASES])
def test_command_line_refuses_before_any_work(tmp_path, capsys, command, assignment, message):
    workdir = tmp_path / "work"
    args = tiny_experiment.run_args(workdir, None, command, "--set", assignment, config=CONFIG)
    status = cli.main(args)
    assert status == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not workdir.exists(), "a refused command wrote into the work directory"
