"""#34 item 7: inputs that used to end in a traceback exit with status 2 and a message
naming the file or path. (A truncated soft-target chunk: tests/test_soft_target_cache.py;
the same through the commands: tests/test_provenance.py.)"""

import os
import re

import jax.numpy as jnp
import pytest

from distill_jax import checkpoint, hf
from distill_jax.cli import main
from distill_jax.errors import UserError

from tiny_experiment import local_corpus_args

SPLITS = ["train=train.de,train.en", "val=val.de,val.en"]  # (files in --data-dir)


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("def get_config(:\n", r"bad\.py, line 1: syntax error"),
        ("import no_such_module_here\n", r"bad\.py, line 1: ModuleNotFoundError: .*no_such_module"),
        (
            "X = 1\n\ndef get_config():\n    return undefined_name\n",
            r"bad\.py, line 4: NameError: .*undefined_name",
        ),
    ],
)
def test_config_file_that_does_not_run(tmp_path, capsys, text, pattern):
    config = tmp_path / "bad.py"
    config.write_text(text)
    assert (
        main(["train-teacher", "--config", str(config), "--workdir", str(tmp_path / "work")]) == 2
    )
    err = capsys.readouterr().err
    assert re.search(rf"error: config file {re.escape(str(tmp_path))}/{pattern}", err), err
    assert not (tmp_path / "work").exists()


def test_evaluate_empty_files(tmp_path, capsys):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("")
    ref.write_text("")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    assert f"{hyp} and {ref} are empty" in err and "Traceback" not in err


@pytest.mark.parametrize("lines", [[], ["", "  "]], ids=["empty-files", "only-blank-lines"])
def test_prepare_refuses_a_split_with_no_pairs(tmp_path, capsys, minilm_dir, lines):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.de").write_text("ein hund .\n")
    (data / "train.en").write_text("a dog .\n")
    for side in ("de", "en"):
        (data / f"val.{side}").write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    assert main(["prepare", *local_corpus_args(data, minilm_dir, SPLITS, "--out", str(out))]) == 2
    err = capsys.readouterr().err
    assert f"split 'val' ({data / 'val.de'} and {data / 'val.en'}) has no sentence pair" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    "teacher", ["/no/such/dir/teacher", "./no-such-teacher", "no-such-runs/teacher"]
)
def test_prepare_names_a_missing_teacher_path(tmp_path, capsys, teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "train.de").write_text("ein hund .\n")
    (tmp_path / "train.en").write_text("a dog .\n")
    out = str(tmp_path / "out")
    assert main(["prepare", *local_corpus_args(tmp_path, teacher, SPLITS[:1], "--out", out)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(teacher)}\W.*does not exist", err), err
    assert "Repo id must be" not in err


def test_load_bert_names_a_missing_path(tmp_path):
    with pytest.raises(hf.CheckpointNotFound, match="the path does not exist"):
        hf.load_bert(tmp_path / "nothing-here")
    with pytest.raises(UserError):
        hf.load_bert(tmp_path / "nothing-here")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_safetensors_are_named(tmp_path, minilm_dir, damage):
    import shutil

    folder = tmp_path / "teacher"
    folder.mkdir()
    shutil.copy(minilm_dir / "config.json", folder / "config.json")
    weights = folder / "model.safetensors"
    data = {
        "truncated": (minilm_dir / "model.safetensors").read_bytes()[:100_000],
        "random": os.urandom(4096),
        "empty": b"",
    }[damage]
    weights.write_bytes(data)
    with pytest.raises(
        UserError,
        match=rf"{re.escape(str(weights))} is not a readable "
        r"safetensors file",
    ):
        hf.load_bert(folder)


@pytest.mark.parametrize("name", ["state/_METADATA", "extra/metadata"])
def test_emptied_checkpoint_metadata_is_named(tmp_path, name):
    config = checkpoint.CheckpointConfig(str(tmp_path / "ckpt"), save_every=1, async_save=False)
    state = {"w": jnp.arange(4.0)}
    with checkpoint.Checkpointer(config) as manager:
        manager.save(1, state, extra={"data": 1})
    (tmp_path / "ckpt" / "1" / name).write_text("")
    with checkpoint.Checkpointer(config) as manager:
        with pytest.raises(
            UserError,
            match=rf"checkpoint .*ckpt/1 is damaged: .*ckpt/1/{name} "
            r"is not valid JSON",
        ):
            manager.restore(1, state)
