"""The paper's reference training recipe: the noam schedule, the per-task configs with the
baseline's own schedule (baseline_overrides), and reporting the final checkpoint."""

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import optim, sharding, student, train, trainer
from distill_jax.commands import common
from distill_jax.errors import UserError
from distill_jax.experiment import ExperimentConfig, TrainConfig


def opennmt_noam(step, factor, warmup, size):
    """OpenNMT-py's noam_decay(step, warmup, size) * learning_rate, step counted from 1."""
    return factor * size ** (-0.5) * min(step ** (-0.5), step * warmup ** (-1.5))


def test_noam_schedule_matches_the_formula():
    sched = optim.noam(2.0, warmup_steps=8000, model_size=512)
    for count in (0, 1, 999, 7999, 8000, 20000, 99999):
        assert float(sched(count)) == pytest.approx(
            opennmt_noam(count + 1, 2.0, 8000, 512), rel=1e-6
        )
    # the peak, on update 8000 (count 7999): factor / sqrt(d_model * warmup)
    assert float(sched(7999)) == pytest.approx(2.0 / math.sqrt(512 * 8000), rel=1e-6)
    assert float(sched(7999)) > float(sched(7998)) and float(sched(7999)) > float(sched(8000))
    cfg = optim.OptimizerConfig.student(
        schedule="noam", learning_rate=1.0, warmup_steps=4000, model_size=256
    )
    assert float(optim.make_schedule(cfg)(3999)) == pytest.approx(
        opennmt_noam(4000, 1.0, 4000, 256), rel=1e-6
    )
    with pytest.raises(ValueError, match="model_size > 0"):
        optim.noam(1.0, 4000, 0)


def test_student_optimizer_follows_train_schedule():
    """student.make_optimizer builds noam from train.learning_rate (the factor), warm-up and
    student.d_model: the first Adam update of a unit gradient moves a parameter by the
    schedule's first value."""
    config = ExperimentConfig(
        train=TrainConfig(schedule="noam", learning_rate=2.0, warmup_steps=10)
    )
    tx = student.make_optimizer(config)
    params = {"w": jnp.zeros((3,))}
    updates, _ = tx.update({"w": jnp.ones((3,))}, tx.init(params), params)
    expected = opennmt_noam(1, 2.0, 10, config.student.d_model)
    np.testing.assert_allclose(np.asarray(updates["w"]), -expected, rtol=1e-4)
    with pytest.raises(ValueError, match="train.schedule must be one of"):
        TrainConfig(schedule="linear")


@pytest.mark.parametrize("eps", [1e-8, 1e-9])
def test_student_optimizer_uses_train_adam_eps(eps):
    """train.adam_eps is Adam's denominator epsilon: a first update of gradient g moves a
    parameter by lr * g / (|g| + eps), which at g = 1e-8 tells 1e-8 (0.5 lr) from 1e-9."""
    config = ExperimentConfig(
        train=TrainConfig(schedule="constant", learning_rate=1.0, adam_eps=eps)
    )
    tx = student.make_optimizer(config)
    params = {"w": jnp.zeros((2,))}
    updates, _ = tx.update({"w": jnp.full((2,), 1e-8)}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-8 / (1e-8 + eps), rtol=1e-3)


def _load(config, *overrides):
    return common.load_experiment(argparse.Namespace(config=config, overrides=list(overrides)))


@pytest.mark.parametrize(
    "path,alpha,temperature",
    [
        ("configs/iwslt14_de_en.py", 0.5, 10.0),
        ("configs/wmt14_en_de.py", 0.1, 5.0),
        ("configs/iwslt15_en_vi.py", 0.1, 5.0),
    ],
)
def test_reference_configs(path, alpha, temperature):
    config = _load(path)
    assert (config.distill.kd, config.distill.alpha, config.distill.temperature) == (
        "offline",
        alpha,
        temperature,
    )
    s = config.student
    assert (s.num_encoder_layers, s.num_decoder_layers, s.d_model, s.mlp_dim, s.num_heads) == (
        6,
        6,
        512,
        2048,
        8,
    )
    assert s.pre_layer_norm and s.layer_norm_eps == 1e-6
    assert s.dropout_rate == s.attention_dropout_rate == s.activation_dropout_rate
    t = config.train
    assert (t.schedule, t.learning_rate, t.warmup_steps, t.steps, t.final_checkpoint) == (
        "noam",
        2.0,
        8000,
        100000,
        "last",
    )
    assert config.data.tokens_per_batch == 6144 and t.label_smoothing == 0.1
    assert t.adam_eps == 1e-9  # OpenNMT-py's Adam epsilon
    assert config.teacher.checkpoint == "bert-base-multilingual-cased"
    # The baseline gets the reference's baseline schedule; an explicit --set still wins,
    # and the distilled student is untouched by baseline_overrides.
    baseline = _load(path, "distill.kd=none")
    assert (baseline.train.learning_rate, baseline.train.warmup_steps, baseline.train.steps) == (
        1.0,
        4000,
        50000,
    )
    assert _load(path, "train.steps=7", "distill.kd=none").train.steps == 7
    assert _load(path, "train.steps=7").train.steps == 7


def test_gigaword_uses_the_papers_alpha():
    config = _load("configs/gigaword_cpu.py")
    assert (config.distill.alpha, config.distill.temperature) == (0.1, 10.0)


def test_bad_baseline_override_is_named():
    with pytest.raises(UserError, match="has no field 'nope'"):
        _load("configs/tiny.py", "baseline_overrides=train.nope=1", "distill.kd=none")
    with pytest.raises(UserError, match="train.final_checkpoint must be one of"):
        _load("configs/tiny.py", "train.final_checkpoint=middle")


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(
            4,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
        )(x)


@pytest.mark.parametrize("which", ["best", "last"])
def test_final_checkpoint_best_or_last(tmp_path, which):
    """final_parameters reports the best validation checkpoint, or with
    train.final_checkpoint=last the final state, as the reference does."""
    config = ExperimentConfig(train=TrainConfig(save_every=1, keep_last=2, final_checkpoint=which))
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = optim.make_optimizer(optim.OptimizerConfig.student())
    state, shardings = sharding.create_sharded_state(
        lambda: train.TrainState.create(
            _Tiny().init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"], tx
        ),
        mesh,
    )
    states = {}
    manager = trainer.checkpointer(tmp_path / "checkpoints", student.checkpoint_policy(config))
    for step, bleu in ((1, 30.0), (2, 10.0)):
        state = state.replace(
            step=jnp.asarray(step, jnp.int32), params=jax.tree.map(lambda p: p + 1.0, state.params)
        )
        states[step] = jax.tree.map(np.asarray, state.params)
        manager.save(step, state, metrics={"bleu": bleu})
    manager.wait()
    params, description = student.final_parameters(config, manager, state, shardings)
    chosen = 1 if which == "best" else 2
    assert description == ("best validation BLEU, step 1" if which == "best" else "last step 2")
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(states[chosen])):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_glorot_embedding_init():
    """student.embedding_init="glorot" draws the shared embedding from Glorot-uniform over
    [vocab, embed] (OpenNMT's -param_init_glorot); the default stays fairseq's normal."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from distill_jax.models.transformer import Transformer, TransformerConfig

    def embedding(init):
        config = TransformerConfig(
            vocab_size=512,
            d_model=64,
            num_heads=4,
            mlp_dim=128,
            num_encoder_layers=1,
            num_decoder_layers=1,
            embedding_init=init,
        )
        dummy = jnp.zeros((1, 4), jnp.int32)
        params = Transformer(config).init(jax.random.PRNGKey(0), dummy, dummy)["params"]
        return np.asarray(jax.tree_util.tree_leaves(params["shared_embedding"])[0])

    glorot, normal = embedding("glorot"), embedding("normal")
    limit = np.sqrt(6.0 / (512 + 64))
    assert np.abs(glorot).max() <= limit and np.abs(glorot).max() > 0.95 * limit
    assert abs(glorot.std() - limit / np.sqrt(3)) < 0.05 * limit  # uniform(-l, l)
    assert abs(normal.std() - 64**-0.5) < 0.05 * 64**-0.5
    with pytest.raises(ValueError, match="embedding_init"):
        TransformerConfig(vocab_size=512, embedding_init="xavier")
