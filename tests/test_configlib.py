"""Config files and command-line overrides."""

import dataclasses

import pytest

from distill_jax import configlib, runner
from distill_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Inner:
    steps: int = 10  # number of steps
    rate: float = 0.5  # a rate in [0, 1]
    name: str | None = None  # optional name
    shape: tuple[int, ...] = (1, 2)  # a shape

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    flag: bool = False


def test_overrides_parse_by_annotation():
    cfg = configlib.override(
        Outer(),
        ["inner.steps=7", "inner.rate=0.25", "flag=true", "inner.name=abc", "inner.shape=(4,1,2)"],
    )
    assert cfg == Outer(Inner(7, 0.25, "abc", (4, 1, 2)), True)
    assert configlib.override(cfg, ["inner.name=none"]).inner.name is None


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("inner.stpes=3", "Inner has no field 'stpes'"),
        ("inner.steps=three", "override inner.steps=three: invalid literal"),
        ("inner.rate=2", "rate must be in \\[0, 1\\], got 2.0"),
        ("flag=maybe", "expected a boolean"),
        ("flag", "not of the form"),
    ],
)
def test_bad_overrides_name_the_field(assignment, message):
    with pytest.raises(UserError, match=message):
        configlib.override(Outer(), [assignment])


def test_config_file_round_trip_and_diff(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(
        "import dataclasses\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Inner:\n    steps: int = 10\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Outer:\n    inner: Inner = Inner()\n"
        "def get_config():\n    return Outer()\n"
    )
    cfg = configlib.load_config_file(str(path))
    runner.check_or_save_config(cfg, tmp_path / "c.json", what="test")
    changed = configlib.override(cfg, ["inner.steps=11"])
    import json

    saved = json.loads((tmp_path / "c.json").read_text())
    assert configlib.diff(saved, configlib.to_dict(changed)) == ["inner.steps: 10 -> 11"]
    with pytest.raises(UserError, match="does not exist"):
        configlib.load_config_file(str(tmp_path / "missing.py"))


def test_fields_added_after_a_run_was_saved_keep_it_resumable():
    """A saved config from an older version lacks fields added since; they count as
    unchanged while they hold their declared default, and as changed otherwise."""
    saved = configlib.to_dict(Outer())
    del saved["flag"], saved["inner"]["name"]
    defaults = configlib.declared_defaults(Outer())
    assert defaults == {
        "inner": {"steps": 10, "rate": 0.5, "name": None, "shape": [1, 2]},
        "flag": False,
    }
    assert configlib.diff(saved, configlib.to_dict(Outer()), defaults=defaults) == []
    # without the defaults an added field with a non-None value reads as a change
    assert configlib.diff(saved, configlib.to_dict(Outer())) == ["flag: None -> False"]
    changed = configlib.override(Outer(), ["flag=true", "inner.name=x"])
    assert configlib.diff(saved, configlib.to_dict(changed), defaults=defaults) == [
        "flag: None -> True",
        "inner.name: None -> 'x'",
    ]


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("teacher.inference_attention=flash", "teacher.inference_attention must be one of"),
        ("student.attention_impl=cudnn", "forward-only"),
    ],
)
def test_attention_kernel_settings_are_checked(assignment, message):
    """The experiment config names the attention kernels a user may pick, and refuses
    the fused cudnn kernel for the (trained) student."""
    from distill_jax.experiment import ExperimentConfig

    config = configlib.load_config_file("configs/tiny.py")
    assert isinstance(config, ExperimentConfig)
    with pytest.raises(UserError, match=message):
        configlib.override(config, [assignment])
    cudnn_teacher = configlib.override(config, ["teacher.inference_attention=cudnn"])
    assert cudnn_teacher.teacher.inference_attention == "cudnn"


def test_resuming_a_run_saved_before_a_field_was_added(tmp_path):
    """runner.check_or_save_config resumes a run whose saved config predates a new field
    (left at its default) and names the field when the new run sets it."""
    import json

    path = tmp_path / "run" / "config.json"
    runner.check_or_save_config(Outer(), path, what="test")
    saved = json.loads(path.read_text())
    del saved["flag"]
    path.write_text(json.dumps(saved))
    runner.check_or_save_config(Outer(), path, what="test")  # no error
    assert json.loads(path.read_text())["flag"] is False  # the value it resumes with, recorded
    (path.parent / "checkpoints" / "1").mkdir(parents=True)  # a step was saved
    with pytest.raises(UserError, match=r"changed fields: flag: False -> True\."):
        runner.check_or_save_config(Outer(flag=True), path, what="test")


def test_fields_that_may_change_on_resume_are_recorded_and_the_others_still_refused(tmp_path):
    """``may_change`` (the student's train.steps and train.patience, #35): a resumed run
    takes their new values into config.json; any other change is refused as before."""
    import json

    path = tmp_path / "run" / "config.json"
    runner.check_or_save_config(Outer(), path, what="test")
    (path.parent / "checkpoints" / "4").mkdir(parents=True)  # a step was saved
    longer = configlib.override(Outer(), ["inner.steps=30"])
    with pytest.raises(UserError, match="inner.steps: 10 -> 30"):
        runner.check_or_save_config(longer, path, what="test")
    runner.check_or_save_config(longer, path, what="test", may_change=("inner.steps",))
    assert json.loads(path.read_text())["inner"]["steps"] == 30
    both = configlib.override(Outer(), ["inner.steps=40", "flag=true"])
    with pytest.raises(UserError, match=r"changed fields: flag: False -> True\.") as err:
        runner.check_or_save_config(both, path, what="test", may_change=("inner.steps",))
    assert "inner.steps" not in str(err.value)
    assert json.loads(path.read_text())["inner"]["steps"] == 30  # nothing saved by a refusal
