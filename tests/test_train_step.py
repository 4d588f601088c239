"""The jitted train step: same result on every mesh as on one device, gradient
accumulation, optimizer schedules and the weight-decay mask."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import optim, sharding, train
from distill_jax.models.bert import BertConfig, BertModel

import tiny_models

VOCAB = 64
BATCH, SRC, TGT, K = 8, 7, 6, 4
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
RTOL = 1e-5


def student_batch(seed: int) -> dict:
    """A padded student batch with an MLM mask and offline top-K teacher logits."""
    rng = np.random.default_rng(seed)
    src = rng.integers(4, VOCAB, (BATCH, SRC)).astype(np.int32)
    tgt = rng.integers(4, VOCAB, (BATCH, TGT + 1)).astype(np.int32)
    src_len = rng.integers(2, SRC + 1, BATCH)
    tgt_len = rng.integers(2, TGT + 1, BATCH)
    for i in range(BATCH):
        src[i, src_len[i] - 1] = 2  # </s>
        src[i, src_len[i] :] = 0
        tgt[i, 0] = 1  # <s>
        tgt[i, tgt_len[i]] = 2  # </s>
        tgt[i, tgt_len[i] + 1 :] = 0
    tgt_in, tgt_out = tgt[:, :-1].copy(), tgt[:, 1:].copy()
    tgt_in[tgt_out == 0] = 0
    mlm_mask = rng.random((BATCH, TGT)) < 0.4
    mlm_mask[:, 0] = True
    return {
        "src": src,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "mlm_mask": mlm_mask.astype(np.int32),
        "kd_logits": rng.normal(size=(BATCH, TGT, K)).astype(np.float32) * 3,
        "kd_indices": rng.integers(0, VOCAB, (BATCH, TGT, K)).astype(np.int32),
    }


def tiny_bert(**fields) -> BertModel:
    """A 2-layer width-32 C-MLM BERT over VOCAB + 8 ids (its head over the VOCAB student
    ids); ``fields`` set other ``BertConfig`` fields."""
    return BertModel(
        BertConfig(
            vocab_size=VOCAB + 8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            cmlm_vocab_size=VOCAB,
            **fields,
        )
    )


def teacher_setup():
    """(model, loss_fn, params init, optimizer) of a tiny C-MLM BERT."""
    model = tiny_bert()
    teacher_ids = np.arange(VOCAB, dtype=np.int32) + 5  # ids 0..4 stay special in BERT
    loss_fn = train.cmlm_loss_fn(model, teacher_ids, cls_id=1, mask_id=2)

    def init_params():
        ids = jnp.ones((1, 4), jnp.int32)
        return model.init(jax.random.PRNGKey(0), ids, method="cmlm_logits")["params"]

    optimizer = optim.make_optimizer(
        optim.OptimizerConfig.teacher(total_steps=10, warmup_fraction=0.0, learning_rate=1e-3)
    )
    # The pipeline's batches: the mask and its positions (the output layer runs there only).
    return loss_fn, init_params, optimizer, lambda seed: cmlm_batch(seed, with_positions=True)


def student_setup():
    """(loss_fn, params init, optimizer) of a 2+2-layer Transformer with offline top-K KD."""
    return tiny_models.student_setup(VOCAB, (2, 2))


def run_steps(setup, mesh, *, steps=2, accum_steps=1, compute_dtype=jnp.float32):
    """Trains ``steps`` steps on ``mesh``; returns (losses, grad norms, params as numpy).
    ``setup`` is (loss_fn, init_params, optimizer[, batch of a seed])."""
    loss_fn, init_params, optimizer = setup[:3]
    state, state_shardings = sharding.create_sharded_state(
        lambda: train.TrainState.create(init_params(), optimizer), mesh
    )
    batch_of = setup[3] if len(setup) > 3 else student_batch
    first = batch_of(0)
    step = train.make_train_step(
        loss_fn,
        optimizer,
        mesh,
        state_shardings,
        sharding.batch_shardings(first, mesh),
        options=train.StepOptions(accum_steps=accum_steps, compute_dtype=compute_dtype),
    )
    rng = jax.random.PRNGKey(42)
    losses, grad_norms = [], []
    for i in range(steps):
        state, metrics = step(state, sharding.shard_batch(batch_of(i), mesh), rng)
        losses.append(float(metrics["loss"][0]) / float(metrics["loss"][1]))
        grad_norms.append(float(metrics["grad_norm"][0]))
    assert int(state.step) == steps
    return losses, grad_norms, jax.tree.map(np.asarray, state.params)


def one_device_mesh():
    return sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])


def assert_trees_close(actual, expected, rtol=RTOL, lr=1e-3, steps=2):
    """Relative difference of the parameter vector, and per leaf.

    Attention key biases are checked separately: their gradient is analytically zero
    (softmax is shift-invariant), so it is pure rounding noise, which Adam rescales to
    updates of up to lr per step with a mesh-dependent sign; they cannot change the loss.
    """
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    checked = []
    for (path, a), e in zip(flat_a, flat_e):
        name = jax.tree_util.keystr(path)
        if "['key']['bias']" in name:
            assert np.max(np.abs(a - e)) <= 2 * lr * steps, name
        else:
            checked.append((name, a, e))
    diff = math.sqrt(sum(float(np.sum((a - e) ** 2)) for _, a, e in checked))
    norm = math.sqrt(sum(float(np.sum(e**2)) for _, _, e in checked))
    assert diff <= rtol * norm, f"relative parameter difference {diff / norm:.3g} > {rtol}"
    for name, a, e in checked:
        np.testing.assert_allclose(a, e, rtol=10 * rtol, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def teacher_reference():
    setup = teacher_setup()
    return setup, run_steps(setup, one_device_mesh())


@pytest.fixture(scope="module")
def student_reference():
    setup = student_setup()
    return setup, run_steps(setup, one_device_mesh())


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
@pytest.mark.parametrize("shape", MESHES)
def test_teacher_step_matches_one_device(teacher_reference, shape):
    setup, (ref_losses, ref_norms, ref_params) = teacher_reference
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    losses, norms, params = run_steps(setup, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    np.testing.assert_allclose(norms, ref_norms, rtol=RTOL)
    assert ref_losses[0] > 0 and ref_losses[0] != ref_losses[1]
    assert_trees_close(params, ref_params)


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
@pytest.mark.parametrize("shape", MESHES)
def test_student_step_matches_one_device(student_reference, shape):
    setup, (ref_losses, ref_norms, ref_params) = student_reference
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    losses, norms, params = run_steps(setup, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    np.testing.assert_allclose(norms, ref_norms, rtol=RTOL)
    assert_trees_close(params, ref_params)


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
def test_student_reference_is_not_trivial(student_reference):
    """The comparison above means something: params moved and the KD term is in the loss."""
    setup, (ref_losses, _, ref_params) = student_reference
    loss_fn, init_params, _ = setup
    init = jax.tree.map(np.asarray, nn.unbox(init_params()))
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(init))
    )
    assert moved > 1e-4
    batch = {k: jnp.asarray(v) for k, v in student_batch(0).items()}
    _, with_kd = loss_fn(init, batch, None)
    assert "kd" in with_kd


def no_dropout_student_setup():
    """A student without dropout: micro-batch splitting then cannot change the masks."""
    return tiny_models.student_setup(VOCAB, (1, 1), dropout_rate=0.0, seed=1, grad_clip_norm=None)


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
def test_gradient_accumulation_equals_full_batch():
    """2 micro-batches of 4 rows == 1 batch of 8 rows (token-count normalised), on (2,2,2)."""
    setup = no_dropout_student_setup()
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    full = run_steps(setup, mesh, steps=2, accum_steps=1)
    halves = run_steps(setup, mesh, steps=2, accum_steps=2)
    np.testing.assert_allclose(halves[0], full[0], rtol=RTOL)
    np.testing.assert_allclose(halves[1], full[1], rtol=RTOL)
    assert_trees_close(halves[2], full[2])


def test_accumulation_rejects_indivisible_batch():
    setup = no_dropout_student_setup()
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 4))
    with pytest.raises(ValueError, match="accum_steps=3"):
        run_steps(setup, mesh, steps=1, accum_steps=3)


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
def test_bf16_compute_is_close_to_float32():
    """bf16 compute with float32 master weights: params stay float32, loss close."""
    setup = no_dropout_student_setup()
    mesh = sharding.make_mesh(sharding.MeshConfig(8, 1, 1))
    ref = run_steps(setup, mesh, steps=1)
    bf16 = run_steps(setup, mesh, steps=1, compute_dtype=jnp.bfloat16)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(bf16[2]))
    np.testing.assert_allclose(bf16[0], ref[0], rtol=2e-2)
    assert bf16[0] != ref[0]  # bf16 was actually used


def test_eval_step_matches_direct_loss():
    setup = no_dropout_student_setup()
    loss_fn, init_params, _ = setup
    params = init_params()
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    abstract = jax.eval_shape(init_params)
    shardings = sharding.tree_shardings(abstract, mesh)
    params = sharding.place_tree(params, shardings)
    batch = student_batch(3)
    eval_step = train.make_eval_step(
        loss_fn, mesh, shardings, sharding.batch_shardings(batch, mesh)
    )
    metrics = eval_step(params, sharding.shard_batch(batch, mesh))
    _, expected = loss_fn(
        nn.unbox(init_params()), {k: jnp.asarray(v) for k, v in batch.items()}, None
    )
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(metrics[name][0]), np.asarray(expected[name][0]), rtol=RTOL
        )
        assert float(metrics[name][1]) == float(expected[name][1])


def test_online_teacher_equals_offline_targets():
    """A teacher callable returning the batch's kd arrays gives the offline loss."""
    model = tiny_models.tiny_transformer(VOCAB, max_len=16)
    x = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), x, x)["params"])
    batch = {k: jnp.asarray(v) for k, v in student_batch(1).items()}
    offline = train.student_loss_fn(model)(params, batch, None)[0]
    online_batch = {k: batch[k] for k in ("src", "tgt_in", "tgt_out")}
    online = train.student_loss_fn(
        model,
        teacher=lambda b, teacher_params: (teacher_params["logits"], teacher_params["indices"]),
    )(params, online_batch, None, {"logits": batch["kd_logits"], "indices": batch["kd_indices"]})[0]
    plain = train.student_loss_fn(model)(params, online_batch, None)[0]
    np.testing.assert_allclose(float(online), float(offline), rtol=1e-6)
    assert abs(float(plain) - float(offline)) > 1e-3


# --------------------------------------------------------------------------- optimizers


def test_linear_schedule_closed_form():
    sched = optim.linear_warmup_decay(2e-4, warmup_steps=10, total_steps=110)
    for count, expected in [(0, 0.0), (5, 1e-4), (10, 2e-4), (60, 1e-4), (110, 0.0), (200, 0.0)]:
        assert float(sched(count)) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_teacher_config_warmup_fraction():
    cfg = optim.OptimizerConfig.teacher(total_steps=1000)
    assert cfg.resolved_warmup_steps() == 50
    sched = optim.make_schedule(cfg)
    assert float(sched(25)) == pytest.approx(2.5e-5)
    assert float(sched(50)) == pytest.approx(5e-5)
    assert float(sched(525)) == pytest.approx(2.5e-5)


def test_inverse_sqrt_closed_form():
    sched = optim.inverse_sqrt(1e-3, warmup_steps=400)
    for count in [0, 1, 100, 399, 400, 401, 1600, 10000]:
        expected = 1e-3 * min(count / 400, math.sqrt(400 / max(count, 1)))
        assert float(sched(count)) == pytest.approx(expected, rel=1e-6)
    assert float(sched(1600)) == pytest.approx(5e-4)


def test_schedule_errors():
    with pytest.raises(ValueError, match="warmup_steps=20, total_steps=10"):
        optim.linear_warmup_decay(1e-3, 20, 10)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        optim.make_schedule(optim.OptimizerConfig(schedule="cosine", total_steps=10))
    with pytest.raises(ValueError, match="warmup_steps > 0"):
        optim.inverse_sqrt(1e-3, 0)


def test_weight_decay_mask_excludes_bias_and_layernorm():
    init_params = teacher_setup()[1]
    params = init_params()
    mask = optim.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, m in flat.items() if m}
    assert any("kernel" in k for k in decayed) and any("embedding" in k for k in decayed)
    for key, m in flat.items():
        no_decay = "bias" in key or "LayerNorm" in key
        assert m == (not no_decay), key


def test_weight_decay_applied_only_where_masked():
    """One AdamW step with zero gradients: only decayed params shrink, by lr * wd * p."""
    params = {
        "dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
        "LayerNorm": {"scale": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)},
    }
    cfg = optim.OptimizerConfig(
        learning_rate=0.1, schedule="constant", weight_decay=0.5, grad_clip_norm=1.0
    )
    tx = optim.make_optimizer(cfg)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    for leaf in (
        updates["dense"]["bias"],
        updates["LayerNorm"]["scale"],
        updates["LayerNorm"]["bias"],
    ):
        np.testing.assert_allclose(leaf, 0.0)


def test_grad_clipping():
    """Clip 1.0: a gradient of norm 10 becomes a unit gradient before Adam (SGD-like
    first Adam step is sign-like, so check through the clip transform's output norm)."""
    cfg = optim.OptimizerConfig(
        learning_rate=1.0,
        schedule="constant",
        weight_decay=0.0,
        grad_clip_norm=1.0,
        b1=0.0,
        b2=0.0,
        eps=1e3,
    )
    tx = optim.make_optimizer(cfg)
    params = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.array([5.0, 5.0, 5.0, 5.0])}  # norm 10
    updates, _ = tx.update(grads, tx.init(params), params)
    # b1 = b2 = 0: update = -g / (|g| + eps) with g the clipped gradient 0.5 per entry
    np.testing.assert_allclose(updates["w"], -0.5 / (0.5 + 1e3), rtol=1e-5)


def cmlm_batch(seed: int, *, with_positions: bool) -> dict:
    """``student_batch`` with its mask as the pipeline gives it, optionally with
    ``mlm_positions`` at a capacity above the largest masked count of a row."""
    from distill_jax.data.cmlm import masked_positions

    batch = {k: v for k, v in student_batch(seed).items() if k in ("src", "tgt_out", "mlm_mask")}
    if with_positions:
        mask = batch["mlm_mask"].astype(bool) & (batch["tgt_out"] != 0)
        batch["mlm_positions"] = masked_positions(mask, int(mask.sum(axis=1).max()) + 1)
    return batch


@pytest.mark.parametrize("with_positions", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_cmlm_masked_head_equals_all_positions(with_positions, training):
    """The last layer and the output layer on the masked positions only: the same loss,
    metrics and gradients as running them on every position and slicing the target (the
    reference form), in evaluation and in training mode (dropout rates 0: the two forms
    draw different dropout masks in the last layer), with the pipeline's
    ``mlm_positions`` and without them."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher_ids = np.arange(VOCAB, dtype=np.int32) + 5
    params = nn.unbox(
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), method="cmlm_logits")[
            "params"
        ]
    )
    batch = {k: jnp.asarray(v) for k, v in cmlm_batch(3, with_positions=with_positions).items()}
    rng = jax.random.PRNGKey(7) if training else None
    results = {}
    for head in train.CMLM_HEAD_POSITIONS:
        loss_fn = train.cmlm_loss_fn(model, teacher_ids, cls_id=1, mask_id=2, head_positions=head)
        results[head] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, rng)
    (loss, metrics), grads = results["masked"]
    (ref_loss, ref_metrics), ref_grads = results["all"]
    assert float(ref_loss) > 0
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert sorted(metrics) == sorted(ref_metrics)
    for name in ref_metrics:
        np.testing.assert_allclose(
            np.asarray(metrics[name]), np.asarray(ref_metrics[name]), rtol=1e-6, err_msg=name
        )
    masked = int(
        np.sum(np.asarray(batch["mlm_mask"]).astype(bool) & (np.asarray(batch["tgt_out"]) != 0))
    )
    assert float(metrics["loss"][1]) == masked
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_cmlm_head_positions_is_checked():
    with pytest.raises(ValueError, match="head_positions"):
        train.cmlm_loss_fn(None, np.arange(4), cls_id=1, mask_id=2, head_positions="target")
