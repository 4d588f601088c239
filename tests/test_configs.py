"""Every shipped config loads, validates and is consistent with itself."""

import pathlib

import pytest

from distill_jax import configlib

CONFIGS = sorted((pathlib.Path(__file__).resolve().parent.parent / "configs").glob("*.py"))


def test_there_are_configs():
    assert {"demo_multi30k.py", "multi30k_de_en.py", "multi30k_cpu.py", "gigaword_cpu.py",
            "tiny.py"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_is_consistent(path):
    config = configlib.load_config_file(str(path))
    assert config.name
    # Offline distillation reads K entries from a cache that kept teacher.top_k.
    assert config.distill.top_k <= config.teacher.top_k
    assert config.data.valid_split not in config.data.test_splits
    assert config.train.eval_every <= config.train.steps
    assert config.teacher.eval_every <= config.teacher.steps
    assert config.student.max_len >= max(config.data.max_src_len, config.data.max_tgt_len)
