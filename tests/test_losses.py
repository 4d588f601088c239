"""Losses against independent float64 NumPy references (loops over positions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses, runner

B, T, V, K = 3, 5, 11, 4
LENGTHS = (5, 3, 1)  # real target tokens per row; the rest is padding


# --------------------------------------------------------------------------- inputs


def _weights():
    w = np.zeros((B, T), np.float32)
    for b, n in enumerate(LENGTHS):
        w[b, :n] = 1.0
    return w


def _inputs(seed=0):
    """Student logits, targets, weights and a sparse + dense teacher (NumPy, float32)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    weights = _weights()
    targets[weights == 0] = 0
    dense = rng.normal(scale=3.0, size=(B, T, V)).astype(np.float32)
    indices = np.stack([[rng.permutation(V)[:K] for _ in range(T)] for _ in range(B)])
    indices = indices.astype(np.int32)  # [B, T, K], distinct per row
    sparse = rng.normal(scale=3.0, size=(B, T, K)).astype(np.float32)
    return logits, targets, weights, sparse, indices, dense


# --------------------------------------------------------------------------- references


def _np_log_softmax(x):
    """log softmax of a 1-D float64 vector, written out."""
    x = np.asarray(x, np.float64)
    m = max(x)
    lse = m + np.log(sum(np.exp(v - m) for v in x))
    return x - lse


def _ref_xe_per_token(z, y, eps):
    """(smoothed loss, nll) at one position, target dist (1-eps)*onehot + eps/V."""
    logp = _np_log_softmax(z)
    nv = len(z)
    target = np.full(nv, eps / nv)
    target[y] += 1.0 - eps
    return -sum(target[v] * logp[v] for v in range(nv)), -logp[y]


def _ref_kd_per_token(s, t_logits, idx, mode, temp):
    """One position; idx None means dense (idx = arange)."""
    if idx is None:
        idx = np.arange(len(s))
    p = np.exp(_np_log_softmax(np.asarray(t_logits, np.float64) / temp))
    if mode == "paper":
        logq = _np_log_softmax(s)
        return -sum(p[k] * logq[idx[k]] for k in range(len(idx)))
    logq = _np_log_softmax(np.asarray(s, np.float64) / temp)
    if mode == "kl":
        return temp**2 * sum(p[k] * (np.log(p[k]) - logq[idx[k]]) for k in range(len(idx)))
    assert mode == "soft_ce_t"
    return -(temp**2) * sum(p[k] * logq[idx[k]] for k in range(len(idx)))


def _ref_sum(fn, weights):
    """sum over positions of weights[b, t] * fn(b, t), skipping zero weights."""
    total = 0.0
    for b in range(weights.shape[0]):
        for t in range(weights.shape[1]):
            if weights[b, t] != 0:
                total += float(weights[b, t]) * fn(b, t)
    return total


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_numpy(eps):
    logits, targets, weights, *_ = _inputs()
    loss, nll = losses.cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), label_smoothing=eps
    )
    ref_loss = _ref_sum(
        lambda b, t: _ref_xe_per_token(logits[b, t], targets[b, t], eps)[0], weights
    )
    ref_nll = _ref_sum(lambda b, t: _ref_xe_per_token(logits[b, t], targets[b, t], eps)[1], weights)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(nll), ref_nll, rtol=1e-5)
    if eps == 0.0:
        np.testing.assert_allclose(float(loss), float(nll), rtol=1e-6)
    else:
        assert float(loss) != pytest.approx(float(nll), rel=1e-3)


def test_padding_with_garbage_does_not_change_losses():
    logits, targets, weights, sparse, indices, dense = _inputs()
    rng = np.random.default_rng(1)
    pad = weights == 0
    g_logits, g_targets = logits.copy(), targets.copy()
    g_sparse, g_dense = sparse.copy(), dense.copy()
    g_logits[pad] = rng.normal(scale=1e4, size=(pad.sum(), V))
    g_targets[pad] = V + 7  # out of range: gathers NaN
    g_sparse[pad] = np.nan
    g_dense[pad] = np.inf
    clean = [
        losses.cross_entropy(logits, targets, weights, 0.1),
        losses.distillation_loss(logits, sparse, indices, weights, mode="kl", temperature=2.0),
        losses.distillation_loss(logits, dense, None, weights),
    ]
    dirty = [
        losses.cross_entropy(g_logits, g_targets, weights, 0.1),
        losses.distillation_loss(g_logits, g_sparse, indices, weights, mode="kl", temperature=2.0),
        losses.distillation_loss(g_logits, g_dense, None, weights),
    ]
    np.testing.assert_allclose(
        np.asarray(jax.tree.leaves(dirty)), np.asarray(jax.tree.leaves(clean)), rtol=1e-6
    )

    kl = losses.StudentLossConfig(kd_mode="kl")

    def grad(z, y, tl, ti):
        return np.asarray(
            jax.grad(
                lambda z: losses.combined_loss(
                    z, y, weights, kl, teacher_logits=tl, teacher_indices=ti
                )[0]
            )(z)
        )

    for tl, g_tl, ti in [(sparse, g_sparse, indices), (dense, g_dense, None)]:
        clean_g, dirty_g = grad(logits, targets, tl, ti), grad(g_logits, g_targets, g_tl, ti)
        assert np.all(dirty_g[pad] == 0.0)
        np.testing.assert_allclose(dirty_g, clean_g, rtol=1e-5, atol=1e-7)


def test_bf16_logits_are_reduced_in_float32():
    logits, targets, weights, sparse, indices, _ = _inputs()
    low = jnp.asarray(logits, jnp.bfloat16)
    loss, _ = losses.cross_entropy(low, targets, weights, 0.1)
    kd = losses.distillation_loss(low, jnp.asarray(sparse, jnp.bfloat16), indices, weights)
    assert loss.dtype == jnp.float32 and kd.dtype == jnp.float32
    rounded = np.asarray(low.astype(jnp.float32))  # the bf16 values, exactly
    ref = _ref_sum(lambda b, t: _ref_xe_per_token(rounded[b, t], targets[b, t], 0.1)[0], weights)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


# --------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("mode", ["paper", "kl", "soft_ce_t"])
@pytest.mark.parametrize("sparse_teacher", [True, False])
def test_distillation_matches_numpy(mode, sparse_teacher):
    logits, _, weights, sparse, indices, dense = _inputs()
    temp = 3.0
    if sparse_teacher:
        kd = losses.distillation_loss(logits, sparse, indices, weights, mode=mode, temperature=temp)
        ref = _ref_sum(
            lambda b, t: _ref_kd_per_token(logits[b, t], sparse[b, t], indices[b, t], mode, temp),
            weights,
        )
    else:
        kd = losses.distillation_loss(logits, dense, None, weights, mode=mode, temperature=temp)
        ref = _ref_sum(
            lambda b, t: _ref_kd_per_token(logits[b, t], dense[b, t], None, mode, temp), weights
        )
    np.testing.assert_allclose(float(kd), ref, rtol=1e-5)


def test_dense_equals_sparse_with_all_indices():
    logits, _, weights, _, _, dense = _inputs()
    perm = np.random.default_rng(2).permutation(V)
    idx = np.broadcast_to(perm, (B, T, V)).astype(np.int32)
    for mode in losses.KD_MODES:
        a = losses.distillation_loss(logits, dense, None, weights, mode=mode, temperature=2.0)
        b = losses.distillation_loss(
            logits, dense[..., perm], idx, weights, mode=mode, temperature=2.0
        )
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_kl_is_nonnegative_and_zero_at_the_teacher():
    logits, _, weights, sparse, indices, dense = _inputs()
    for temp in (1.0, 4.0):
        assert (
            float(
                losses.distillation_loss(logits, dense, None, weights, mode="kl", temperature=temp)
            )
            > 0.0
        )
        assert (
            float(
                losses.distillation_loss(
                    logits, sparse, indices, weights, mode="kl", temperature=temp
                )
            )
            > 0.0
        )
        same = losses.distillation_loss(dense, dense, None, weights, mode="kl", temperature=temp)
        assert abs(float(same)) < 1e-4
    # soft_ce_t differs from kl by T^2 times the teacher entropy, which is > 0
    kl = losses.distillation_loss(logits, dense, None, weights, mode="kl", temperature=2.0)
    ce = losses.distillation_loss(logits, dense, None, weights, mode="soft_ce_t", temperature=2.0)
    assert float(ce) > float(kl)


def test_kl_has_the_t_squared_factor():
    logits, _, weights, _, _, dense = _inputs()
    temp = 5.0
    kd = losses.distillation_loss(logits, dense, None, weights, mode="kl", temperature=temp)
    without = (
        _ref_sum(
            lambda b, t: _ref_kd_per_token(logits[b, t], dense[b, t], None, "kl", temp), weights
        )
        / temp**2
    )
    np.testing.assert_allclose(float(kd) / without, temp**2, rtol=1e-5)


def test_paper_mode_tempers_only_the_teacher_and_has_no_t_squared():
    logits, _, weights, sparse, indices, _ = _inputs()
    temp = 10.0
    kd = losses.distillation_loss(logits, sparse, indices, weights, temperature=temp)  # default
    # the same as handing the teacher logits already divided by T, at T = 1
    pre = losses.distillation_loss(
        logits, sparse / temp, indices, weights, mode="paper", temperature=1.0
    )
    np.testing.assert_allclose(float(kd), float(pre), rtol=1e-5)

    def ref(b, t):  # student at T = 1 over the full vocabulary, no factor
        p = np.exp(_np_log_softmax(sparse[b, t] / temp))
        logq = _np_log_softmax(logits[b, t])
        return -sum(p[k] * logq[indices[b, t, k]] for k in range(K))

    np.testing.assert_allclose(float(kd), _ref_sum(ref, weights), rtol=1e-5)
    # a tempered student would give something else
    tempered = _ref_sum(
        lambda b, t: _ref_kd_per_token(
            logits[b, t], sparse[b, t], indices[b, t], "soft_ce_t", temp
        ),
        weights,
    )
    assert float(kd) != pytest.approx(tempered, rel=1e-2)
    assert float(kd) != pytest.approx(tempered / temp**2, rel=1e-2)


def test_zero_probability_teacher_entries_are_ignored():
    logits, _, weights, sparse, indices, _ = _inputs()
    masked = sparse.copy()
    masked[..., -1] = -np.inf  # entry K-1 gets p = 0
    for mode in losses.KD_MODES:
        got = losses.distillation_loss(logits, masked, indices, weights, mode=mode, temperature=2.0)
        want = losses.distillation_loss(
            logits, sparse[..., :-1], indices[..., :-1], weights, mode=mode, temperature=2.0
        )
        assert np.isfinite(float(got))
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        g = jax.grad(
            lambda z, mode=mode: losses.distillation_loss(
                z, masked, indices, weights, mode=mode, temperature=2.0
            )
        )(jnp.asarray(logits))
        assert np.all(np.isfinite(np.asarray(g)))
    # but a broken (NaN) teacher at a real token is not hidden
    broken = sparse.copy()
    broken[0, 0, 0] = np.nan
    assert np.isnan(float(losses.distillation_loss(logits, broken, indices, weights)))


def test_teacher_receives_no_gradient():
    logits, _, weights, sparse, indices, _ = _inputs()
    g = jax.grad(
        lambda t: losses.distillation_loss(logits, t, indices, weights, mode="kl", temperature=2.0)
    )(jnp.asarray(sparse))
    assert np.all(np.asarray(g) == 0.0)


# --------------------------------------------------------------------------- gradient


def test_paper_gradient_matches_finite_differences_and_closed_form():
    rng = np.random.default_rng(3)
    b, t, v, k, temp = 2, 2, 6, 3, 2.0
    weights = np.array([[1.0, 1.0], [1.0, 0.0]])
    with jax.enable_x64(True):
        logits = rng.normal(size=(b, t, v))
        teacher = rng.normal(scale=2.0, size=(b, t, k))
        idx = np.stack([[rng.permutation(v)[:k] for _ in range(t)] for _ in range(b)])

        def f(z):
            return losses.distillation_loss(
                z,
                jnp.asarray(teacher),
                jnp.asarray(idx),
                jnp.asarray(weights),
                mode="paper",
                temperature=temp,
            )

        grad = np.asarray(jax.grad(f)(jnp.asarray(logits)))
        assert grad.dtype == np.float64
        h = 1e-6
        fd = np.zeros_like(logits)
        for pos in np.ndindex(*logits.shape):
            up, down = logits.copy(), logits.copy()
            up[pos] += h
            down[pos] -= h
            fd[pos] = (float(f(up)) - float(f(down))) / (2 * h)
    np.testing.assert_allclose(grad, fd, atol=1e-8)
    # closed form: weights * (q - scatter(p)), p summing to 1 over the K entries
    closed = np.zeros_like(logits)
    for i in range(b):
        for j in range(t):
            q = np.exp(_np_log_softmax(logits[i, j]))
            p = np.exp(_np_log_softmax(teacher[i, j] / temp))
            target = np.zeros(v)
            for kk in range(k):
                target[idx[i, j, kk]] += p[kk]
            closed[i, j] = weights[i, j] * (q - target)
    np.testing.assert_allclose(grad, closed, atol=1e-12)
    assert np.all(grad[1, 1] == 0.0)  # the padded position


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_log_softmax_at_values_and_gradient_match_the_dense_log_softmax(temp):
    """The fused primitive against jax.nn.log_softmax + take_along_axis + mean, with
    duplicate ids in a row (their cotangents must add up) and a zero-cotangent row."""
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(2, 3, 9)), jnp.float32)
    idx = rng.integers(0, 9, size=(2, 3, 4)).astype(np.int32)
    idx[0, 0] = [5, 5, 2, 5]  # duplicates
    idx = jnp.asarray(idx)
    g_at = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32).at[1, 2].set(0.0)
    g_mean = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32).at[1, 2].set(0.0)

    def reference(z):
        log_p = jax.nn.log_softmax(z / temp, axis=-1)
        return jnp.take_along_axis(log_p, idx, axis=-1), jnp.mean(log_p, axis=-1)

    def fused(z):
        return losses.log_softmax_at(z, idx, temp)

    for got, want in zip(fused(logits), reference(logits)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    def project(fn):
        return lambda z: sum(jnp.sum(a * g) for a, g in zip(fn(z), (g_at, g_mean)))

    got = np.asarray(jax.jit(jax.grad(project(fused)))(logits))
    want = np.asarray(jax.grad(project(reference))(logits))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[1, 2] == 0.0)


def test_combined_loss_gradient_matches_the_unfused_terms():
    """combined_loss (paper mode) shares one log-sum-exp between its two terms: its
    gradient equals that of (1 - alpha) * cross_entropy + alpha * distillation_loss, each
    of which runs the primitive on its own; and that of a float64 finite difference."""
    logits, targets, weights, sparse, indices, _ = _inputs(seed=4)
    indices[0, 0, 0] = targets[0, 0]  # target among the K ids
    alpha, eps, temp = 0.4, 0.1, 10.0
    settings = losses.StudentLossConfig(alpha=alpha, label_smoothing=eps, temperature=temp)

    def combined(z):
        return losses.combined_loss(
            z, targets, weights, settings, teacher_logits=sparse, teacher_indices=indices
        )[0]

    def separate(z):
        return (1 - alpha) * losses.cross_entropy(z, targets, weights, eps)[
            0
        ] + alpha * losses.distillation_loss(z, sparse, indices, weights, temperature=temp)

    z = jnp.asarray(logits)
    np.testing.assert_allclose(float(combined(z)), float(separate(z)), rtol=1e-6)
    g = np.asarray(jax.grad(combined)(z))
    np.testing.assert_allclose(g, np.asarray(jax.grad(separate)(z)), rtol=1e-5, atol=1e-6)
    assert np.all(g[weights == 0] == 0.0)
    # closed form: weights * (softmax - target distribution), the target distribution
    # (1-alpha)((1-eps) onehot(y) + eps/V) + alpha * scatter(p) summing to 1
    closed = np.zeros_like(logits, dtype=np.float64)
    for b in range(B):
        for t in range(T):
            q = np.exp(_np_log_softmax(logits[b, t]))
            p = np.exp(_np_log_softmax(np.asarray(sparse[b, t], np.float64) / temp))
            target = np.full(V, (1 - alpha) * eps / V)
            target[targets[b, t]] += (1 - alpha) * (1 - eps)
            for k in range(K):
                target[indices[b, t, k]] += alpha * p[k]
            closed[b, t] = weights[b, t] * (q - target)
    np.testing.assert_allclose(g, closed, atol=2e-6)


# --------------------------------------------------------------------------- combined + metrics


def _ref_combined_per_token(logits, targets, sparse, indices, b, t, alpha, eps, temp):
    xe = _ref_xe_per_token(logits[b, t], targets[b, t], eps)[0]
    kd = _ref_kd_per_token(logits[b, t], sparse[b, t], indices[b, t], "paper", temp)
    return (1 - alpha) * xe + alpha * kd


def test_combined_loss_matches_numpy_and_normalises_per_token():
    logits, targets, weights, sparse, indices, _ = _inputs()
    targets[:, ::2] = np.argmax(logits[:, ::2], axis=-1)  # some right, some wrong
    alpha, eps, temp = 0.3, 0.1, 10.0
    settings = losses.StudentLossConfig(alpha=alpha, label_smoothing=eps, temperature=temp)
    total, m = losses.combined_loss(
        logits, targets, weights, settings, teacher_logits=sparse, teacher_indices=indices
    )
    per_token = [
        _ref_combined_per_token(logits, targets, sparse, indices, b, t, alpha, eps, temp)
        for b in range(B)
        for t in range(LENGTHS[b])
    ]
    np.testing.assert_allclose(float(total), sum(per_token), rtol=1e-5)
    np.testing.assert_allclose(float(total) / float(weights.sum()), np.mean(per_token), rtol=1e-5)
    xe, _ = losses.cross_entropy(logits, targets, weights, eps)
    kd = losses.distillation_loss(logits, sparse, indices, weights, temperature=temp)
    np.testing.assert_allclose(float(total), (1 - alpha) * float(xe) + alpha * float(kd), rtol=1e-6)
    assert set(m) == {"loss", "xe", "nll", "kd", "accuracy"}
    for name, (_s, c) in m.items():
        assert float(c) == sum(LENGTHS), name
    np.testing.assert_allclose(float(m["loss"][0]), float(total), rtol=1e-6)
    np.testing.assert_allclose(float(m["kd"][0]), float(kd), rtol=1e-6)
    correct = sum(
        int(np.argmax(logits[b, t]) == targets[b, t]) for b in range(B) for t in range(LENGTHS[b])
    )
    assert 0 < correct < sum(LENGTHS)
    assert float(m["accuracy"][0]) == correct


def test_combined_loss_without_teacher_is_cross_entropy():
    logits, targets, weights, *_ = _inputs()
    settings = losses.StudentLossConfig(alpha=0.9, label_smoothing=0.1)
    total, m = losses.combined_loss(logits, targets, weights, settings)
    xe, nll = losses.cross_entropy(logits, targets, weights, 0.1)
    assert float(total) == pytest.approx(float(xe), rel=1e-6)
    assert "kd" not in m
    assert float(m["nll"][0]) == pytest.approx(float(nll), rel=1e-6)


def test_metrics_accumulate_over_split_batches():
    logits, targets, weights, sparse, indices, _ = _inputs()
    step = jax.jit(
        lambda z, y, w, tl, ti: losses.combined_loss(
            z, y, w, losses.StudentLossConfig(), teacher_logits=tl, teacher_indices=ti
        )
    )
    total, full = step(logits, targets, weights, sparse, indices)
    _, first = step(logits[:1], targets[:1], weights[:1], sparse[:1], indices[:1])
    _, second = step(logits[1:], targets[1:], weights[1:], sparse[1:], indices[1:])
    merged = runner.add_metrics(runner.add_metrics(None, first), second)
    assert set(merged) == set(full)
    for name in full:
        np.testing.assert_allclose(float(merged[name][0]), float(full[name][0]), rtol=1e-5)
        assert float(merged[name][1]) == float(full[name][1])
    norm = losses.normalize_metrics(merged)
    assert norm["loss"] == pytest.approx(float(total) / sum(LENGTHS), rel=1e-5)
    # a half with a different token count weighs accordingly (not a mean of means)
    halves = (
        losses.normalize_metrics(first)["loss"] + losses.normalize_metrics(second)["loss"]
    ) / 2
    assert norm["loss"] != pytest.approx(halves, rel=1e-4)


def test_normalize_metrics_guards_zero_count():
    out = losses.normalize_metrics({"a": (jnp.float32(6.0), jnp.float32(3.0)), "b": (0.0, 0.0)})
    assert out == {"a": 2.0, "b": 0.0}
    assert all(isinstance(v, float) for v in out.values())


# --------------------------------------------------------------------------- bad arguments


def test_invalid_arguments_raise():
    logits, targets, weights, sparse, indices, dense = _inputs()
    with pytest.raises(ValueError, match="mode"):
        losses.distillation_loss(logits, sparse, indices, weights, mode="mse")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            losses.distillation_loss(logits, sparse, indices, weights, temperature=bad)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            losses.combined_loss(logits, targets, weights, losses.StudentLossConfig(alpha=bad))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            losses.cross_entropy(logits, targets, weights, label_smoothing=bad)
    with pytest.raises(ValueError, match="targets"):
        losses.cross_entropy(logits, targets[:, :-1], weights)
    with pytest.raises(ValueError, match="weights"):
        losses.cross_entropy(logits, targets, weights[:-1])
    with pytest.raises(ValueError, match="logits"):
        losses.cross_entropy(logits[0], targets, weights)
    with pytest.raises(ValueError, match="teacher_indices"):
        losses.distillation_loss(logits, sparse, indices[..., :-1], weights)
    with pytest.raises(ValueError, match="teacher_indices"):
        losses.distillation_loss(logits, sparse, indices.astype(np.float32), weights)
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.distillation_loss(logits, dense[..., :-1], None, weights)
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.distillation_loss(logits, sparse[:, :-1], indices[:, :-1], weights)
    with pytest.raises(ValueError, match="teacher_indices"):
        losses.combined_loss(logits, targets, weights, teacher_indices=indices)
    with pytest.raises(ValueError, match="mode"):
        losses.combined_loss(
            logits, targets, weights, losses.StudentLossConfig(kd_mode="KL"), teacher_logits=dense
        )
