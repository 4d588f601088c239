"""Generation options (#32 item 3): n-best lists, nucleus sampling and streaming.

Fast tests run the library (``distill_jax.translate``) on a random student over a real
vocabulary; the slow ones run ``distill-jax generate`` on a trained tiny student, through a
pipe."""

import dataclasses
import itertools
import os
import pathlib
import queue
import select
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from distill_jax import translate
from distill_jax.cli import main
from distill_jax.data.vocab import EOS, TeacherTokenizer, Vocabulary
from distill_jax.experiment import DecodeConfig
from distill_jax.models.transformer import Transformer, TransformerConfig
from distill_jax.sharding import MeshConfig, make_mesh

import tiny_experiment

# Two widths (16 and 32 ids): few shapes to compile.
DECODE = DecodeConfig(
    beam_size=3,
    length_penalty=0.6,
    max_len_a=1.0,
    max_len_b=4,
    tokens_per_batch=128,
    bucket_step=16,
    cache_phases=1,
)


@pytest.fixture(scope="module")
def student(shared_data, minilm_dir):
    """(translate.TrainedModel, sentences): a random student whose outputs vary with
    the source (embeddings scaled up, EOS pulled towards a frequent piece, as in
    test_decode), the vocabulary of 200 Multi30k pairs and 19 val sentences of mixed
    length (repeats included)."""
    tokenizer = TeacherTokenizer.load(minilm_dir)
    lines = {
        lang: (shared_data / "multi30k" / f"train.{lang}")
        .read_text(encoding="utf-8")
        .splitlines()[:200]
        for lang in ("de", "en")
    }
    vocab = Vocabulary.build(tokenizer.tokenize_batch(lines["de"] + lines["en"]), tokenizer)
    model = Transformer(
        TransformerConfig(
            vocab_size=len(vocab),
            d_model=32,
            num_heads=4,
            mlp_dim=64,
            num_encoder_layers=1,
            num_decoder_layers=1,
            max_len=32,
        )
    )
    dummy = np.ones((1, 4), np.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), dummy, dummy)["params"])
    table = params["shared_embedding"]["embedding"]  # [vocab, embed]
    table = table.at[EOS].set(0.3 * table[EOS] + 0.7 * table[vocab.ids["."]])
    params["shared_embedding"]["embedding"] = 2.0 * table
    val = (shared_data / "multi30k" / "val.de").read_text(encoding="utf-8").splitlines()
    sentences = val[:8] + ["Ein Hund.", val[3]] + val[8:16] + ["Zwei Männer, die ein " * 4]
    return translate.TrainedModel(model, params, vocab, make_mesh(MeshConfig())), sentences


def _stream(student, decode, **options):
    trained, sentences = student
    chunks = list(translate.translate_stream(trained, iter(sentences), decode, **options))
    return list(itertools.chain.from_iterable(chunks))


@pytest.mark.parametrize(
    "method,options",
    [
        ("beam", {}),
        ("beam", {"nbest": 3}),
        pytest.param("sample", {"top_p": 0.9, "seed": 5}, marks=pytest.mark.slow),
    ],
)
def test_stream_gives_the_batch_outputs(student, method, options):
    """Lines arriving one by one, decoded in micro-batches of their own shapes, give what
    one batch run over all of them gives (n-best lists and samples included)."""
    trained, sentences = student
    decode = dataclasses.replace(DECODE, method=method)
    batch = translate.translate_texts(trained, sentences, decode, **options)
    assert len(set(map(str, batch))) > 6, batch  # the outputs vary with the source
    assert _stream(student, decode, **options) == batch
    assert _stream(student, decode, wait=1e-4, **options) == batch  # smaller micro-batches


def test_a_line_is_translated_before_the_input_ends(student):
    """translate_stream yields a line's translation while the input is still open."""
    trained, sentences = student
    lines: queue.Queue = queue.Queue()
    end = object()
    watchdog = threading.Timer(120, lines.put, (end,))  # never hang the test run
    watchdog.start()
    outputs = translate.translate_stream(trained, iter(lines.get, end), DECODE, wait=0.05)
    expected = translate.translate_texts(trained, sentences[:2], DECODE)
    try:
        lines.put(sentences[0])
        assert next(outputs) == expected[:1]  # the input has not ended
        lines.put(sentences[1])
        assert next(outputs) == expected[1:]
        lines.put(end)
        assert next(outputs, None) is None
    finally:
        watchdog.cancel()


def test_nbest_lists(student):
    """n-best: up to N hypotheses per source, best first, scores as beam search's, the
    first the 1-best output; greedy gives one hypothesis with its summed log-prob."""
    trained, sentences = student
    best = translate.translate_texts(trained, sentences, DECODE)
    lists = translate.translate_texts(trained, sentences, DECODE, nbest=3)
    for text, hyps in zip(best, lists):
        assert len(hyps) == 3 and hyps[0].text == text
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert all(h.score < 0 for h in hyps)
    assert sum(len({h.text for h in hyps}) > 1 for hyps in lists) > len(lists) // 2
    greedy = dataclasses.replace(DECODE, method="greedy")
    one = translate.translate_texts(trained, sentences[:3], greedy, nbest=1)
    assert [len(h) for h in one] == [1, 1, 1]
    assert [h[0].text for h in one] == translate.translate_texts(trained, sentences[:3], greedy)


def test_options_outside_their_ranges_are_refused():
    beam, sample = DECODE, dataclasses.replace(DECODE, method="sample")
    for config, nbest, top_p, message in [
        (beam, 4, 1.0, "larger than the beam"),
        (beam, 0, 1.0, "nbest must be >= 1"),
        (sample, 2, 1.0, "needs beam search"),
        (sample, None, 0.0, r"top_p must be in \(0, 1\]"),
        (sample, None, 1.5, "top_p must be in"),
        (beam, None, 0.5, "applies to sampling"),
    ]:
        with pytest.raises(ValueError, match=message):
            translate.check_options(config, nbest, top_p)
    translate.check_options(beam, 3, 1.0)
    translate.check_options(sample, 1, 0.3)


def test_decode_batches_keep_one_width_per_batch():
    """Every source is decoded in a batch of its own batch_shape, whatever else is there:
    what makes streamed micro-batches equal to the batch run."""
    config = DecodeConfig(tokens_per_batch=64, bucket_step=8)
    rng = np.random.default_rng(0)
    sources = [np.arange(1, n + 1, dtype=np.int32) for n in rng.integers(1, 29, 100)]
    seen = []
    for index, src in translate.decode_batches(sources, config, shards=4, max_len=28):
        for row, i in enumerate(index):
            if i >= 0:
                assert src.shape == translate.batch_shape(len(sources[i]), config, 4, 28)
                np.testing.assert_array_equal(src[row, : len(sources[i])], sources[i])
                seen.append(int(i))
    assert sorted(seen) == list(range(100))
    assert translate.batch_shape(3, config, 4, 28) == (8, 8)
    assert translate.batch_shape(9, config, 4, 28) == (4, 16)
    assert translate.batch_shape(27, config, 4, 28) == (4, 28)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--nbest", "3"], "--nbest 3 is larger than the beam (decode.beam_size 2)"),
        (["--nbest", "0"], "--nbest must be >= 1"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "1.01"], "--top-p must be in (0, 1]"),
        (["--top-p", "0.9", "--nbest", "2"], "--nbest 2 needs beam search (--top-p samples"),
        (["--stream-wait", "0"], "--stream-wait must be > 0"),
    ],
)
def test_generate_refuses_bad_options(tmp_path, capsys, flags, message):
    """Exit status 2 and a message naming the flag, before any student is loaded."""
    workdir = tmp_path / "work"
    assert (
        main(
            [
                "generate",
                "--config",
                "configs/tiny.py",
                "--workdir",
                str(workdir),
                "--output",
                str(tmp_path / "out.txt"),
                *flags,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists() and not workdir.exists()


# ----------------------------------------------------------------------------- end to end


TRAIN = tiny_experiment.sets(
    "distill.kd=none",
    "train.steps=150",
    "train.learning_rate=5e-3",
    "train.warmup_steps=20",
    "train.eval_every=100000",
    "train.save_every=150",
    "train.label_smoothing=0.0",
    "student.dropout_rate=0.0",
    "decode.cache_phases=1",
    "decode.bucket_step=16",
    "decode.beam_size=3",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_dir, shared_data):
    """(command prefix for `distill-jax generate`, val sentences) of a tiny student trained
    briefly on 64 Multi30k pairs."""
    root = tmp_path_factory.mktemp("generate")
    teacher = tiny_experiment.save_tiny_teacher(root / "teacher", minilm_dir)
    specs = tiny_experiment.write_corpus(
        shared_data,
        root / "corpus",
        sizes=(("train", "train", 64), ("val", "val", 16), ("test2016", "test_2016_flickr", 16)),
    )
    workdir = root / "work"
    tiny_experiment.prepare(teacher, root / "corpus", specs, workdir / "data")
    common = [
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(workdir),
        "--set",
        f"teacher.checkpoint={teacher}",
        "--no-progress",
        *TRAIN,
    ]
    subprocess.run(
        [sys.executable, "-m", "distill_jax.cli", "train-student", "--name", "b", *common],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    sentences = (root / "corpus" / "val.de").read_text(encoding="utf-8").splitlines()
    return (
        [
            sys.executable,
            "-m",
            "distill_jax.cli",
            "generate",
            "--name",
            "b",
            "--checkpoint",
            "latest",
            *common,
        ],
        sentences,
    )


def _readline(pipe, seconds: float) -> str:
    """One line from ``pipe`` within ``seconds`` (else the test fails, not hangs)."""
    ready, _, _ = select.select([pipe], [], [], seconds)
    assert ready, f"no output line within {seconds} s"
    return pipe.readline()


@pytest.mark.slow
def test_generate_streams_through_a_pipe(trained, tmp_path):
    """A line written to generate's stdin comes back translated before stdin is closed, and
    the streamed outputs (1-best and n-best) equal a file run's."""
    command, sentences = trained
    (tmp_path / "in.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    for extra in ([], ["--nbest", "2"]):
        subprocess.run(
            [
                *command,
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "batch.txt"),
                *extra,
            ],
            check=True,
            timeout=600,
        )
        batch = (tmp_path / "batch.txt").read_text(encoding="utf-8")
        streamed = subprocess.run(
            [*command, *extra],
            input="".join(s + "\n" for s in sentences),
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout
        assert streamed == batch
    lines = batch.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(i // 2) for i in range(len(lines))]
    assert all(float(line.split("\t")[1]) < 0 for line in lines)
    expected = (tmp_path / "in.txt").read_text().splitlines()
    first = subprocess.run(
        [*command, "--input", str(tmp_path / "in.txt")],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout.splitlines()
    assert len(set(first)) > 3, first  # a student whose outputs vary
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        started = time.monotonic()
        process.stdin.write(expected[0] + "\n")
        process.stdin.flush()
        assert _readline(process.stdout, 300).rstrip("\n") == first[0]
        process.stdin.write(expected[1] + "\n")
        process.stdin.flush()
        assert _readline(process.stdout, 120).rstrip("\n") == first[1]
        process.stdin.close()
        assert process.wait(timeout=120) == 0, process.stderr.read()
        assert process.stdout.read() == ""
        print(f"two interactive lines in {time.monotonic() - started:.1f} s")
    finally:
        process.kill()


@pytest.mark.slow
def test_generate_needs_neither_the_teacher_folder_nor_transformers(trained, tmp_path):
    """A trained student's work directory translates on its own: the prepared data keeps
    the teacher's text pipeline, so `generate` reads no teacher folder and does not import
    `transformers` (nor, through it, PyTorch), and translates as it did with the teacher."""
    command, sentences = trained
    source = tmp_path / "in.txt"
    source.write_text("".join(s + "\n" for s in sentences[:6]), encoding="utf-8")
    teacher = pathlib.Path(
        next(a for a in command if a.startswith("teacher.checkpoint=")).split("=", 1)[1]
    )
    run = [*command[:1], "-X", "importtime", *command[1:], "--input", str(source)]
    with_teacher = subprocess.run(run, check=True, capture_output=True, text=True, timeout=600)
    hidden = teacher.with_name(teacher.name + ".hidden")
    teacher.rename(hidden)
    try:
        alone = subprocess.run(run, capture_output=True, text=True, timeout=600)
    finally:
        hidden.rename(teacher)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert alone.stdout == with_teacher.stdout and len(alone.stdout.splitlines()) == 6
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in alone.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "distill_jax.translate" in imported  # the import log is there
    assert "transformers" not in imported and "torch" not in imported
