"""The teacher's stride-masked top-K soft targets (docs/method.md §2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import teacher as teacher_lib
from distill_jax.data.cmlm import build_cmlm_inputs
from distill_jax.data.prepared import open_prepared
from distill_jax.experiment import ExperimentConfig, TeacherConfig

import tiny_experiment


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_dir, shared_data):
    root = tmp_path_factory.mktemp("topk")
    teacher_dir = tiny_experiment.save_tiny_teacher(root / "teacher", minilm_dir)
    specs = tiny_experiment.write_corpus(
        shared_data, root / "corpus", sizes=(("train", "train", 40), ("val", "val", 8))
    )
    tiny_experiment.prepare(teacher_dir, root / "corpus", specs, root / "data")
    dataset = open_prepared(root / "data")
    config = ExperimentConfig(teacher=TeacherConfig(checkpoint=str(teacher_dir)))
    teacher = teacher_lib.build_teacher(config, dataset.vocab, jnp.float32, jax.random.PRNGKey(0))
    return dataset, teacher


def _student_batch(dataset, count):
    records = dataset.source("train").__getitems__(list(range(count)))
    src_len = max(len(r["src"]) for r in records)
    tgt_len = max(len(r["tgt"]) for r in records) + 1
    src = np.zeros((count, src_len), np.int32)
    tgt_out = np.zeros((count, tgt_len), np.int32)
    for i, r in enumerate(records):
        src[i, : len(r["src"])] = r["src"]
        tgt_out[i, : len(r["tgt"])] = r["tgt"]
        tgt_out[i, len(r["tgt"])] = 2  # </s>
    return src, tgt_out


def test_row_t_is_the_prediction_for_target_position_t(setup):
    """Reference: for each position t separately, mask exactly the positions of t's stride
    copy, run the teacher without jit and take the logits of position t."""
    dataset, teacher = setup
    stride, top_k = 3, 4
    src, tgt_out = _student_batch(dataset, 3)
    params = teacher.pretrained_params
    logits, ids = jax.jit(
        lambda s, t: teacher_lib.stride_topk(teacher, params, s, t, stride=stride, top_k=top_k)
    )(src, tgt_out)
    logits, ids = np.asarray(logits), np.asarray(ids)
    for row in range(len(src)):
        length = int((tgt_out[row] != 0).sum())
        for t in range(length):
            masked = np.zeros_like(tgt_out, dtype=bool)
            positions = np.arange(tgt_out.shape[1])
            masked[row] = (positions % stride == t % stride) & (tgt_out[row] != 0)
            inputs = build_cmlm_inputs(
                src,
                tgt_out,
                teacher.teacher_ids,
                masked,
                cls_id=teacher.cls_id,
                mask_id=teacher.mask_id,
            )
            assert inputs["input_ids"][row, 1 + src.shape[1] + t] == teacher.mask_id
            full = teacher.model.apply(
                {"params": params},
                inputs["input_ids"],
                inputs["token_type_ids"],
                inputs["attention_mask"],
                inputs["position_ids"],
                method=teacher.model.cmlm_logits,
            )
            reference = np.asarray(full)[row, 1 + src.shape[1] + t]  # [V]
            order = np.argsort(-reference)[:top_k]
            np.testing.assert_array_equal(ids[row, t], order)
            np.testing.assert_allclose(logits[row, t], reference[order], rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(logits[row, :length], axis=-1) <= 0)


def test_tokenizer_of_another_teacher_is_refused(setup, tmp_path):
    dataset, _ = setup
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    (other / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "BertTokenizer", "do_lower_case": true}'
    )
    config = ExperimentConfig(teacher=TeacherConfig(checkpoint=str(other)))
    from distill_jax.errors import UserError

    with pytest.raises(UserError, match="has another WordPiece vocabulary"):
        teacher_lib.check_tokenizer(config, dataset.vocab)
