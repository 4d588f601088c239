"""Every shipped config loads, validates and is consistent with itself."""

import pathlib

import pytest

from distill_jax import configlib

CONFIGS = sorted((pathlib.Path(__file__).resolve().parent.parent / "configs").glob("*.py"))


def test_there_are_configs():
    assert {
        "demo_multi30k.py",
        "multi30k_de_en.py",
        "multi30k_cpu.py",
        "gigaword_cpu.py",
        "tiny.py",
    } <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_is_consistent(path):
    config = configlib.load_config_file(str(path))
    config.check()
    assert config.name
    # Offline distillation reads K entries from a cache that kept teacher.top_k.
    assert config.distill.top_k <= config.teacher.top_k
    assert config.data.valid_split not in config.data.test_splits
    assert config.train.eval_every <= config.train.steps
    assert config.teacher.eval_every <= config.teacher.steps
    assert config.student.max_len >= max(config.data.max_src_len, config.data.max_tgt_len)


def test_training_lengths_must_fit_the_student(tmp_path):
    """data.max_src_len / max_tgt_len beyond student.max_len are refused once all
    overrides are in (so both can be raised together, in either order), naming the fields."""
    import argparse

    from distill_jax.commands import common
    from distill_jax.errors import UserError

    def load(*overrides):
        return common.load_experiment(
            argparse.Namespace(config="configs/tiny.py", overrides=list(overrides))
        )

    with pytest.raises(UserError, match="data.max_tgt_len 65 is longer than student.max_len 64"):
        load("data.max_tgt_len=65")
    for order in (
        ("data.max_src_len=100", "student.max_len=128"),
        ("student.max_len=128", "data.max_src_len=100"),
    ):
        config = load(*order)
        assert (config.data.max_src_len, config.student.max_len) == (100, 128)


def test_decoding_phases_must_be_positive():
    import argparse

    from distill_jax.commands import common
    from distill_jax.errors import UserError

    config = common.load_experiment(
        argparse.Namespace(config="configs/tiny.py", overrides=["decode.cache_phases=1"])
    )
    assert config.decode.cache_phases == 1
    with pytest.raises(UserError, match="decode.cache_phases must be >= 1, got 0"):
        common.load_experiment(
            argparse.Namespace(config="configs/tiny.py", overrides=["decode.cache_phases=0"])
        )


def test_small_student_is_the_cpu_configs_student():
    """experiment.small_student(): default_student() with the sizes given (4 heads, dropout
    0.1); its defaults are the 3+3-layer, d 256 student of multi30k_cpu and the configs built
    on it, and tiny's is the same recipe at 2+2 layers, d 32."""
    import dataclasses

    from distill_jax import experiment

    configs = CONFIGS[0].parent
    sizes = ("d_model", "num_heads", "mlp_dim", "num_encoder_layers", "num_decoder_layers")
    changed = (*sizes, "dropout_rate", "max_len")
    student, default = experiment.small_student(), experiment.default_student()
    assert tuple(getattr(student, f) for f in changed) == (256, 4, 1024, 3, 3, 0.1, 128)
    # every other field is default_student()'s
    assert dataclasses.replace(student, **{f: getattr(default, f) for f in changed}) == default
    for name in ("multi30k_cpu.py", "gigaword_cpu.py", "multi30k_full.py", "demo_multi30k.py"):
        assert configlib.load_config_file(str(configs / name)).student == (
            experiment.small_student()
        ), name
    tiny = configlib.load_config_file(str(configs / "tiny.py")).student
    assert tiny == experiment.small_student(d_model=32, mlp_dim=64, layers=2, max_len=64)
    assert (tiny.num_encoder_layers, tiny.num_decoder_layers, tiny.d_model) == (2, 2, 32)
