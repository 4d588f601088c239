"""Beam search, greedy search and sampling against brute force and against each other.

Score convention (the one ``beam_search`` documents): a hypothesis is the list of
generated tokens, EOS included when produced; its score is the sum of the model's
log-probs of those tokens divided by ((5 + length) / 6) ** alpha. A hypothesis that
reaches the length bound without EOS is scored as it is. Pad and BOS are never generated.
"""

import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from distill_jax.decode import Sampling, beam_search, greedy_search, sample
from distill_jax.sharding import LOGICAL_AXIS_RULES

import tiny_models

PAD, BOS, EOS = 0, 1, 2
VOCAB = 7
MAX_LEN = 4  # decoding bound of the exhaustive tests
ALPHA = 0.6
# Sentences of different lengths (pieces + EOS), 0-padded.
SOURCES = np.array(
    [
        [4, 5, 6, 3, 2, 0, 0, 0],
        [6, 2, 0, 0, 0, 0, 0, 0],
        [3, 3, 4, 5, 6, 4, 5, 2],
    ],
    np.int32,
)  # [batch, src]


MODEL = tiny_models.tiny_transformer(VOCAB)


@pytest.fixture(scope="module")
def model_and_params():
    """Random weights with a fixed seed. The shared table is scaled up so that the
    next-token distributions are peaked (near-ties between hypotheses are unlikely), and
    the EOS row is pulled towards token 3's so that EOS competes with the pieces (a random
    model with tied embeddings mostly repeats its input token and would rarely stop)."""
    params = nn.unbox(jax.jit(MODEL.init)(jax.random.key(3), SOURCES, SOURCES[:, :4])["params"])
    table = params["shared_embedding"]["embedding"]  # [vocab, embed]
    table = table.at[EOS].set(0.2 * table[EOS] + 0.8 * table[3])
    params["shared_embedding"]["embedding"] = 2.0 * table
    return MODEL, params


def all_hypotheses(max_len: int) -> list[tuple[int, ...]]:
    """Every sequence the search can produce: pieces then EOS, or max_len pieces."""
    pieces = [t for t in range(VOCAB) if t not in (PAD, BOS, EOS)]
    hyps = []
    for length in range(1, max_len + 1):
        hyps += [p + (EOS,) for p in itertools.product(pieces, repeat=length - 1)]
    hyps += list(itertools.product(pieces, repeat=max_len))
    return hyps


@jax.jit
def _log_probs(params, src, tgt_in):
    """Full (non-incremental) forward pass -> log-probs [batch, tgt, vocab]."""
    return jax.nn.log_softmax(MODEL.apply({"params": params}, src, tgt_in), axis=-1)


def brute_force_scores(params, src_rows, hyps, alpha):
    """Scores of hypotheses hyps[i] given sources src_rows[i], from full forward passes."""
    width = MAX_LEN + 2  # one shape for every call: a single compile
    tgt_in = np.full((len(hyps), width), PAD, np.int32)  # [hyps, width]
    labels = np.full((len(hyps), width), PAD, np.int32)  # [hyps, width]
    for i, h in enumerate(hyps):
        tgt_in[i, : len(h)] = (BOS,) + h[:-1]
        labels[i, : len(h)] = h
    log_probs = np.asarray(_log_probs(params, src_rows, tgt_in), np.float64)  # [hyps, width, vocab]
    token_lp = np.take_along_axis(log_probs, labels[:, :, None], axis=2)[:, :, 0]  # [hyps, width]
    lengths = np.array([len(h) for h in hyps])  # [hyps]
    summed = np.where(np.arange(width)[None] < lengths[:, None], token_lp, 0.0).sum(1)  # [hyps]
    return summed / ((5.0 + lengths) / 6.0) ** alpha


def exhaustive_scores(params, src_row, alpha):
    """(all hypotheses of length <= MAX_LEN, their scores) for one source sentence."""
    hyps = all_hypotheses(MAX_LEN)
    return hyps, brute_force_scores(params, np.repeat(src_row[None], len(hyps), 0), hyps, alpha)


def as_tuple(row) -> tuple[int, ...]:
    """Strip the trailing pads of a decoded row."""
    return tuple(int(t) for t in row if t != PAD)


def test_beam_search_is_exhaustive_with_a_wide_beam(model_and_params):
    """With 320 beams no candidate is ever dropped (at most 4**3 * 5 = 320 extensions per
    step), so the finished list must be exactly the 320 best of all 341 hypotheses."""
    model, params = model_and_params
    assert len(all_hypotheses(MAX_LEN)) == 341
    seqs, scores = beam_search(
        model, params, SOURCES[:2], beam_size=320, length_penalty=ALPHA, max_len=MAX_LEN
    )
    for row in range(2):
        hyps, reference = exhaustive_scores(params, SOURCES[row], ALPHA)
        order = np.argsort(-reference, kind="stable")
        assert reference[order[0]] - reference[order[1]] > 1e-3  # no tie for the best
        np.testing.assert_allclose(scores[row], reference[order[:320]], rtol=0, atol=1e-5)
        assert as_tuple(seqs[row, 0]) == hyps[order[0]]
        found = {as_tuple(s) for s in seqs[row]}
        assert found == {hyps[i] for i in order[:320]}


def test_beam_search_with_vocab_size_beams_finds_the_best(model_and_params):
    model, params = model_and_params
    seqs, scores = beam_search(
        model, params, SOURCES, beam_size=VOCAB, length_penalty=ALPHA, max_len=MAX_LEN
    )
    assert seqs.shape == (3, VOCAB, MAX_LEN) and scores.shape == (3, VOCAB)
    for row in range(3):
        hyps, reference = exhaustive_scores(params, SOURCES[row], ALPHA)
        best = int(np.argmax(reference))
        assert as_tuple(seqs[row, 0]) == hyps[best]
        np.testing.assert_allclose(scores[row, 0], reference[best], rtol=0, atol=1e-5)
        assert np.all(np.diff(np.asarray(scores[row])) <= 0)  # best first


def reference_beam_search(params, src_row, beam, alpha, max_len):
    """Plain-Python beam search with the same rules as ``beam_search`` (2*beam candidates,
    EOS finishes only within the first beam ranks) but no early stopping; next-token
    log-probs come from full forward passes over the prefixes."""
    live = [((), 0.0)]  # (prefix, summed log-prob)
    finished = []  # (score, hypothesis)
    for step in range(max_len):
        tgt_in = np.full((beam, MAX_LEN + 2), PAD, np.int32)  # [beam, width]
        for i, (prefix, _) in enumerate(live):
            tgt_in[i, : len(prefix) + 1] = (BOS,) + prefix
        log_probs = np.asarray(_log_probs(params, np.repeat(src_row[None], beam, 0), tgt_in))
        candidates = [
            (total + log_probs[i, len(prefix), t], prefix + (t,))
            for i, (prefix, total) in enumerate(live)
            for t in range(VOCAB)
            if t not in (PAD, BOS)
        ]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam]
        live = []
        for rank, (total, hyp) in enumerate(candidates):
            if hyp[-1] == EOS or step + 1 == max_len:
                if rank < beam:
                    finished.append((total / ((5.0 + len(hyp)) / 6.0) ** alpha, hyp))
            elif len(live) < beam:
                live.append((hyp, total))
        if not live:
            break
    return sorted(finished, key=lambda f: -f[0])[:beam]


def test_early_stopping_loses_nothing(model_and_params):
    """A strong length penalty makes long hypotheses win late; stopping early must not
    change the result of searching to the length bound."""
    model, params = model_and_params
    alpha, bound = 2.0, MAX_LEN + 2
    seqs, scores = beam_search(
        model, params, SOURCES, beam_size=3, length_penalty=alpha, max_len=bound
    )
    for row in range(3):
        reference = reference_beam_search(params, SOURCES[row], 3, alpha, bound)
        np.testing.assert_allclose(scores[row], [r[0] for r in reference], rtol=0, atol=1e-5)
        assert [as_tuple(s) for s in seqs[row]] == [r[1] for r in reference]


def test_early_stopping_ends_the_loop_before_the_bound(model_and_params, monkeypatch):
    """Without a length penalty log-probs only fall, so once ``beam`` finished hypotheses
    outrank every live one the sentence is done. Here EOS is made the likeliest token for
    the two sentences that otherwise repeat token 4: the loop must stop long before the
    bound (decoder steps are counted from inside the jitted loop), with the same result as
    the reference search that runs to the bound."""
    import distill_jax.decode as decode_lib

    model, params = model_and_params
    table = params["shared_embedding"]["embedding"]
    params = {**params, "shared_embedding": {"embedding": table.at[EOS].set(1.3 * table[4])}}
    sources = SOURCES[[0, 2]]
    calls = []
    original = decode_lib._next_logits

    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return original(*args)

    monkeypatch.setattr(decode_lib, "_next_logits", counted)
    jax.clear_caches()  # trace beam_search again, with the counter
    try:
        bound = MAX_LEN + 2
        seqs, scores = beam_search(
            model, params, sources, beam_size=2, length_penalty=0.0, max_len=bound
        )
        jax.block_until_ready(seqs)
    finally:
        monkeypatch.undo()
        jax.clear_caches()  # later tests must not reuse the counting trace
    assert 1 <= len(calls) < bound - 2
    for row in range(2):
        reference = reference_beam_search(params, sources[row], 2, 0.0, bound)
        np.testing.assert_allclose(scores[row], [r[0] for r in reference], rtol=0, atol=1e-5)
        assert [as_tuple(s) for s in seqs[row]] == [r[1] for r in reference]


def test_beam_of_one_is_greedy(model_and_params):
    """Without a length penalty a single beam makes the greedy choices."""
    model, params = model_and_params
    greedy_seqs, greedy_lp = greedy_search(model, params, SOURCES, max_len=MAX_LEN + 2)
    seqs, scores = beam_search(
        model, params, SOURCES, beam_size=1, length_penalty=0.0, max_len=MAX_LEN + 2
    )
    np.testing.assert_array_equal(seqs[:, 0], greedy_seqs)
    np.testing.assert_allclose(scores[:, 0], greedy_lp, rtol=0, atol=1e-5)
    # Greedy's summed log-probs are those of a full forward pass over its output.
    reference = brute_force_scores(params, SOURCES, [as_tuple(r) for r in greedy_seqs], 0.0)
    np.testing.assert_allclose(greedy_lp, reference, rtol=0, atol=1e-5)


def test_output_does_not_depend_on_batch_composition(model_and_params):
    model, params = model_and_params
    bound = (1.0, 1)  # source-relative: floor(src_len + 1) tokens
    alone_src = SOURCES[:1, :5]  # sentence 0 without padding
    alone_seqs, alone_scores = beam_search(model, params, alone_src, beam_size=3, max_len=bound)
    batch_seqs, batch_scores = beam_search(model, params, SOURCES, beam_size=3, max_len=bound)
    width = alone_seqs.shape[-1]
    assert width == 6 and batch_seqs.shape[-1] == 8  # floor(5 + 1), capped floor(8 + 1)
    np.testing.assert_array_equal(batch_seqs[0, :, :width], alone_seqs[0])
    assert np.all(np.asarray(batch_seqs[0, :, width:]) == PAD)
    np.testing.assert_allclose(batch_scores[0], alone_scores[0], rtol=0, atol=1e-5)


def test_sharded_batch_gives_the_same_result(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 8, size=8)
    src = np.zeros((8, 8), np.int32)  # [batch, src]
    for i, n in enumerate(lengths):
        src[i, :n] = rng.integers(3, VOCAB, size=n)
        src[i, n] = EOS
    single_seqs, single_scores = beam_search(model, params, src, beam_size=3, max_len=6)
    single_greedy, _ = greedy_search(model, params, src, max_len=6)

    mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
    sharded_src = jax.device_put(src, NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        seqs, scores = beam_search(model, params, sharded_src, beam_size=3, max_len=6)
        greedy, _ = greedy_search(model, params, sharded_src, max_len=6)
    assert seqs.sharding.shard_shape(seqs.shape)[0] == 1  # still one sentence per device
    np.testing.assert_array_equal(seqs, single_seqs)
    np.testing.assert_allclose(scores, single_scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(greedy, single_greedy)


def sample_sources(model, params, sampling: Sampling):
    """``sample`` of SOURCES with key 7 and ``sampling``, bounded at MAX_LEN + 2."""
    return sample(model, params, SOURCES, jax.random.key(7), sampling=sampling, max_len=MAX_LEN + 2)


def assert_samples_greedy(model, params, sampling: Sampling) -> np.ndarray:
    """``sample_sources`` gives greedy search's outputs and log-probs; returns those outputs."""
    greedy_seqs, greedy_lp = greedy_search(model, params, SOURCES, max_len=MAX_LEN + 2)
    seqs, lp = sample_sources(model, params, sampling)
    np.testing.assert_array_equal(seqs, greedy_seqs)
    np.testing.assert_allclose(lp, greedy_lp, rtol=0, atol=1e-6)
    return np.asarray(greedy_seqs)


def test_sampling_with_top_1_is_greedy(model_and_params):
    model, params = model_and_params
    greedy_seqs = assert_samples_greedy(model, params, Sampling(top_k=1, temperature=0.7))
    # Unrestricted sampling at a high temperature does leave the greedy path.
    hot, _ = sample_sources(model, params, Sampling(temperature=5.0))
    assert not np.array_equal(hot, greedy_seqs)


def test_length_bounds_are_respected(model_and_params):
    model, params = model_and_params
    bound = (0.5, 1)
    src_len = np.sum((SOURCES != PAD) & (SOURCES != EOS), axis=1)  # [batch]
    limits = np.floor(0.5 * src_len + 1).astype(int)  # [batch]: 3, 1, 4
    outputs = [
        beam_search(model, params, SOURCES, beam_size=2, max_len=bound)[0][:, 0],
        greedy_search(model, params, SOURCES, max_len=bound)[0],
        sample(model, params, SOURCES, jax.random.key(0), max_len=bound)[0],
    ]
    hit_bound_without_eos = False
    for seqs in outputs:
        assert seqs.shape == (3, 5)  # floor(0.5 * 8 + 1)
        for row, limit in zip(np.asarray(seqs), limits):
            hyp = as_tuple(row)
            assert 1 <= len(hyp) <= limit
            assert EOS not in hyp[:-1]
            hit_bound_without_eos |= len(hyp) == limit and hyp[-1] != EOS
    assert hit_bound_without_eos  # the bound was actually what stopped some hypothesis
    with pytest.raises(ValueError, match="max_len"):
        greedy_search(model, params, SOURCES, max_len=9)


def test_log_softmax_equals_jax_log_softmax():
    """decode.log_softmax (kept out of the logits matmul's fusion on CPUs) gives
    jax.nn.log_softmax's values, large logits and bf16 (to its rounding) included, inside a jitted matmul."""
    import jax.numpy as jnp

    from distill_jax.decode import log_softmax

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(40, 16)) * 30.0, jnp.float32)  # logits up to ~1e3
    ours = jax.jit(lambda h, t: log_softmax(h @ t.T))(h, table)
    want = jax.nn.log_softmax(h @ table.T, axis=-1)
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(ours)))
    x = jnp.asarray(rng.normal(size=(3, 7)), jnp.bfloat16)
    np.testing.assert_allclose(
        np.asarray(log_softmax(x), np.float32),  # bf16 rounding
        np.asarray(jax.nn.log_softmax(x, axis=-1), np.float32),
        rtol=2**-7,
        atol=2**-6,
    )


def test_sources_longer_than_max_len_are_truncated_for_generation(model_and_params, capsys):
    """translate_ids cuts a source past the model's max_len (8 here) to 7 ids + EOS, pads
    batches to at most max_len (not to the next bucket_step multiple), and says so."""
    from distill_jax import translate
    from distill_jax.experiment import DecodeConfig
    from distill_jax.sharding import MeshConfig, make_mesh

    model, params = model_and_params
    long_source = np.array([4, 5, 6, 3, 4, 5, 6, 3, 4, 5, 2], np.int32)  # 11 ids
    cut = np.append(long_source[:7], EOS).astype(np.int32)
    config = DecodeConfig(beam_size=2, max_len_a=0.0, max_len_b=4)
    mesh = make_mesh(MeshConfig())
    trained = translate.TrainedModel(model, params, None, mesh)
    got = translate.translate_ids(trained, [long_source, SOURCES[1][:2]], config)
    want = translate.translate_ids(trained, [cut, SOURCES[1][:2]], config)
    assert "1 of 2 sources are longer than the model's max_len 8" in capsys.readouterr().err
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # Batches of 7-id sources with bucket_step 4 pad to 7 under max_len=7, not to 8.
    config = DecodeConfig(bucket_step=4)
    ((_, src),) = translate.decode_batches([cut[1:]] * 3, config, shards=1, max_len=7)
    assert src.shape[1] == 7
    with pytest.raises(ValueError, match="longer than max_len 7"):
        translate.decode_batches([cut], config, shards=1, max_len=7)


def test_phase_ends():
    from distill_jax.decode import phase_ends

    assert phase_ends(32, 4) == [8, 16, 24, 32]
    assert phase_ends(100, 4) == [25, 50, 75, 100]
    assert phase_ends(20, 4) == [10, 20]  # no phase under MIN_PHASE_STEPS = 8 steps
    assert phase_ends(9, 4) == [9]
    assert phase_ends(3, 4) == [3]
    assert phase_ends(32, 1) == [32]
    with pytest.raises(ValueError, match="cache_phases"):
        phase_ends(32, 0)


LONG_MODEL = tiny_models.tiny_transformer(VOCAB, layers=(1, 2), max_len=32)


@pytest.fixture(scope="module")
def long_model_and_params():
    """A model with room for 32 target positions (its hypotheses run to their length
    bounds, which is what the tests of decoding phases need)."""
    params = nn.unbox(
        jax.jit(LONG_MODEL.init)(jax.random.key(5), SOURCES, SOURCES[:, :4])["params"]
    )
    table = params["shared_embedding"]["embedding"]  # [vocab, embed]
    params["shared_embedding"]["embedding"] = 2.0 * table
    return LONG_MODEL, params


@pytest.mark.parametrize(
    "rows, bound, last_phase, all_searches",
    [
        (slice(None), 24, True, False),  # sentences end in the first phase and in the last
        (slice(None), (2.0, 8), True, True),  # the same with per-sentence bounds
        (slice(1, 2), (2.0, 8), False, False),  # the whole batch is done within the first phase
    ],
)
@pytest.mark.slow  # among the longest tests: kept out of the fast tier
def test_growing_caches_decode_like_one_full_size_cache(
    long_model_and_params, rows, bound, last_phase, all_searches
):
    """cache_phases=4 (the default: the loop runs in phases over caches that grow between
    them) gives the sequences and scores of cache_phases=1 (one loop over a cache sized
    for the whole bound), for beam search and (in one case, to keep compiling down)
    greedy search and sampling."""
    from distill_jax.decode import length_limits, phase_ends

    model, params = long_model_and_params
    src = SOURCES[rows]
    steps, _ = length_limits(model, src, bound)
    assert phase_ends(steps, 4) == [8, 16, 24]
    one_seqs, one_scores = beam_search(
        model, params, src, beam_size=3, max_len=bound, cache_phases=1
    )
    seqs, scores = beam_search(model, params, src, beam_size=3, max_len=bound)
    np.testing.assert_array_equal(seqs, one_seqs)
    np.testing.assert_allclose(scores, one_scores, rtol=0, atol=1e-5)
    lengths = [len(as_tuple(h)) for h in np.asarray(seqs).reshape(-1, steps)]
    assert min(lengths) <= 8 and (max(lengths) > 16) == last_phase, lengths
    if not all_searches:
        return
    for search in (
        lambda **kw: greedy_search(model, params, src, max_len=bound, **kw),
        lambda **kw: sample(
            model,
            params,
            src,
            jax.random.key(1),
            sampling=Sampling(temperature=1.5),
            max_len=bound,
            **kw,
        ),
    ):
        one_seqs, one_lp = search(cache_phases=1)
        seqs, lp = search()
        np.testing.assert_array_equal(seqs, one_seqs)
        np.testing.assert_allclose(lp, one_lp, rtol=0, atol=1e-5)


def test_grow_decode_cache_pads_the_position_axis_only(long_model_and_params):
    import jax.numpy as jnp

    from distill_jax.models.transformer import Transformer, grow_decode_cache, init_decode_cache

    model, params = long_model_and_params
    encoded = model.apply({"params": params}, SOURCES, method=Transformer.encode)
    small = init_decode_cache(model, params, encoded, SOURCES, 8, 3)
    small = jax.tree_util.tree_map(lambda x: x + jnp.ones_like(x), small)  # nonzero contents
    grown = grow_decode_cache(model, params, encoded, SOURCES, small, 16, 3)
    full = init_decode_cache(model, params, encoded, SOURCES, 16, 3)
    assert jax.tree_util.tree_structure(grown) == jax.tree_util.tree_structure(full)
    padded = 0
    for (path, old), new, want in zip(
        jax.tree_util.tree_leaves_with_path(small),
        jax.tree_util.tree_leaves(grown),
        jax.tree_util.tree_leaves(full),
    ):
        assert new.shape == want.shape, path
        if old.shape == new.shape:
            np.testing.assert_array_equal(new, old)  # cross-attention, counters: kept
            continue
        padded += 1
        name = jax.tree_util.keystr(path)
        axis = [i for i, (o, n) in enumerate(zip(old.shape, new.shape)) if o != n]
        assert len(axis) == 1 and new.shape[axis[0]] == 2 * old.shape[axis[0]], name
        front = tuple(slice(0, o) for o in old.shape)
        np.testing.assert_array_equal(np.asarray(new)[front], old)
        assert not np.asarray(new)[
            tuple(slice(o, None) if i == axis[0] else slice(None) for i, o in enumerate(old.shape))
        ].any()
    # per decoder layer: the self-attention keys and values; and the ancestry table
    assert padded == 2 * model.config.num_decoder_layers + 1
    with pytest.raises(ValueError, match="cannot grow"):
        grow_decode_cache(model, params, encoded, SOURCES, full, 8, 3)


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
def test_growing_caches_on_a_sharded_batch(long_model_and_params):
    """Decoding phases on a batch sharded over 8 devices: the grown caches stay
    batch-sharded and the result is the single-device one."""
    model, params = long_model_and_params
    src = np.concatenate([SOURCES, SOURCES[::-1], SOURCES[:2]])  # [8, src]
    single_seqs, single_scores = beam_search(model, params, src, beam_size=2, max_len=24)
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
    sharded_src = jax.device_put(src, NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        seqs, scores = beam_search(model, params, sharded_src, beam_size=2, max_len=24)
    assert seqs.sharding.shard_shape(seqs.shape)[0] == 1
    np.testing.assert_array_equal(seqs, single_seqs)
    np.testing.assert_allclose(scores, single_scores, rtol=0, atol=1e-5)


def _plain_top_log_probs(logits, k, banned=()):
    """What ``top_log_probs`` computes, the plain way: top_k over masked log-softmax rows."""
    import jax.numpy as jnp

    mask = np.isin(np.arange(logits.shape[1]), banned)[None, :]
    return jax.lax.top_k(jnp.where(mask, -jnp.inf, jax.nn.log_softmax(logits, axis=-1)), k)


@pytest.mark.parametrize(
    "vocab, width",
    [
        (2000, 125),  # blocks of a divisor of the vocabulary
        (4099, 128),  # a prime: a shorter last block
        (300, 150),  # fewer blocks than searched: the plain path
    ],
)
def test_top_log_probs_is_top_k_of_the_masked_log_softmax(vocab, width):
    """Same tokens, in the same order (ties to the lower id), and the same values as
    top_k of the masked log-softmax: with many tied logits, with banned tokens holding a
    row's largest logits (they lift their block), and with the best tokens in as many
    different blocks as are kept."""
    from distill_jax.decode import _block_width, top_log_probs

    assert _block_width(vocab) == width
    rng = np.random.default_rng(0)
    k, banned = 10, (0, 1)
    logits = np.round(rng.normal(size=(6, vocab)) * 2).astype(np.float32)  # many ties
    logits[1, list(banned)] = 50.0  # the banned tokens are the row's best
    logits[2, :] = 0.0
    logits[2, (np.arange(k + 2) * width + 1) % vocab] = 10.0 + np.arange(k + 2) % 3  # one per block
    logits[3, -3:] = 20.0  # the best ones in the last block
    logits[4, :] = 1.0  # all tied
    values, tokens = jax.jit(top_log_probs, static_argnums=(1, 2))(logits, k, banned)
    want_values, want_tokens = _plain_top_log_probs(logits, k, banned)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(values, want_values, rtol=0, atol=1e-5)
    assert not np.isin(np.asarray(tokens), banned).any()


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
def test_beam_search_over_a_large_vocabulary_is_the_plain_one(monkeypatch):
    """Beam search with a vocabulary large enough for ``top_log_probs`` to search blocks
    (2000 tokens: 16 blocks, 8 searched) gives what it gives with the plain per-row top_k."""
    import distill_jax.decode as decode_lib

    model = tiny_models.tiny_transformer(2000)
    src = SOURCES.copy()
    src[src > 2] += 1500
    params = nn.unbox(jax.jit(model.init)(jax.random.key(7), src, src[:, :4])["params"])
    params["shared_embedding"]["embedding"] = 3.0 * params["shared_embedding"]["embedding"]
    seqs, scores = beam_search(model, params, src, beam_size=3, max_len=6)
    monkeypatch.setattr(decode_lib, "top_log_probs", _plain_top_log_probs)
    jax.clear_caches()
    try:
        plain_seqs, plain_scores = beam_search(model, params, src, beam_size=3, max_len=6)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    np.testing.assert_array_equal(seqs, plain_seqs)
    np.testing.assert_allclose(scores, plain_scores, rtol=0, atol=1e-5)
    assert len({as_tuple(h) for h in np.asarray(seqs).reshape(-1, 6)}) > 3  # not degenerate


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
def test_a_step_may_feed_only_the_first_hypotheses(model_and_params):
    """The decoder step that feeds one hypothesis per sentence (beam search's first)
    writes its slot; once the other hypotheses descend from it (the search's reorder),
    later steps give the logits of full forward passes. More hypotheses per sentence than
    the cache holds are refused."""
    import jax.numpy as jnp

    from distill_jax.decode import _next_logits, _start_decoding
    from distill_jax.models import beam_cache

    model, params = model_and_params
    beams = 3
    encoded, cache = _start_decoding(model, params, SOURCES, beams, MAX_LEN)
    bos = jnp.full((len(SOURCES),), BOS, jnp.int32)
    first, cache = _next_logits(model, params, cache, encoded, SOURCES, bos)  # [batch, vocab]
    cache = beam_cache.reorder(cache, jnp.zeros((len(SOURCES), beams), jnp.int32))
    nxt = np.array([[3, 4, 5]] * len(SOURCES), np.int32)  # [batch, beams]
    second, _ = _next_logits(model, params, cache, encoded, SOURCES, jnp.asarray(nxt.reshape(-1)))
    tgt_in = np.stack([np.full(len(SOURCES), BOS), np.zeros(len(SOURCES), np.int32)], 1)
    for j in range(beams):
        tgt_in[:, 1] = nxt[:, j]
        full = model.apply({"params": params}, SOURCES, tgt_in)  # [batch, 2, vocab]
        np.testing.assert_allclose(first, full[:, 0], rtol=0, atol=1e-4)
        np.testing.assert_allclose(
            np.asarray(second).reshape(len(SOURCES), beams, VOCAB)[:, j],
            full[:, 1],
            rtol=0,
            atol=1e-4,
        )
    with pytest.raises(ValueError, match="hypotheses"):
        _next_logits(model, params, cache, encoded, SOURCES, jnp.full((4 * len(SOURCES),), BOS))


def test_nucleus_mask_keeps_the_fewest_tokens_reaching_p():
    import jax.numpy as jnp

    from distill_jax.decode import nucleus_mask

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 40)) * 2.0  # [rows, vocab]
    logits[0, 5] = -np.inf  # a banned token stays banned
    for p in (1e-6, 0.3, 0.75, 0.999999, 1.0):
        got = np.asarray(nucleus_mask(jnp.asarray(logits, jnp.float32), p))
        for row, out in zip(logits, got):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")
            mass = np.cumsum(probs[order])
            count = (
                int(np.searchsorted(mass, p - 1e-6)) + 1 if p < 1 else int(np.isfinite(row).sum())
            )
            kept = np.sort(order[:count])
            assert np.array_equal(np.flatnonzero(np.isfinite(out)), kept), (p, row)
            np.testing.assert_allclose(out[kept], row[kept], rtol=1e-6)


def test_nucleus_sampling_with_a_tiny_p_is_greedy(model_and_params):
    model, params = model_and_params
    assert_samples_greedy(model, params, Sampling(temperature=3.0, top_k=4, top_p=1e-4))
    with pytest.raises(ValueError, match="top_p"):
        sample_sources(model, params, Sampling(top_p=0.0))


def test_per_sentence_keys_make_samples_independent_of_the_batch(model_and_params):
    """With one key per sentence, a sentence's sample does not depend on its row or on the
    other rows (translate's streamed and batch outputs rely on it)."""
    model, params = model_and_params
    keys = jax.random.split(jax.random.key(11), 3)  # [3] typed keys
    hot = Sampling(temperature=2.0)
    seqs, lp = sample(model, params, SOURCES, keys, sampling=hot, max_len=MAX_LEN + 2)
    order = np.array([2, 0, 1])
    again, again_lp = sample(
        model, params, SOURCES[order], keys[order], sampling=hot, max_len=MAX_LEN + 2
    )
    np.testing.assert_array_equal(np.asarray(again), np.asarray(seqs)[order])
    np.testing.assert_allclose(again_lp, np.asarray(lp)[order], rtol=0, atol=1e-6)
    assert len({tuple(np.asarray(s)) for s in seqs}) > 1


def test_ancestry_reorder_keeps_the_cache_contents_of_the_gather_reorder(model_and_params):
    """Driven step by step with the same tokens and survivor origins (beam search's first
    step feeding one hypothesis, a cache grown between phases), the fast reorder (only
    the ancestry moves) and the reference one (keys/values gathered into each survivor's
    slot) show every hypothesis the same keys/values at every decoded position and give
    the same logits; the reference keeps the ancestry the identity, the fast form keeps
    every written key/value where it was written."""
    import jax.numpy as jnp

    from distill_jax.decode import _next_logits, _start_decoding
    from distill_jax.models import beam_cache
    from distill_jax.models.transformer import grow_decode_cache

    model, params = model_and_params
    batch, beams, steps, first_phase = len(SOURCES), 3, 6, 3
    rng = np.random.default_rng(0)
    encoded, fast = _start_decoding(model, params, SOURCES, beams, first_phase)
    reference = fast
    moved = False
    for step in range(steps):
        if step == first_phase:  # the next phase: both caches grow the same way
            fast, reference = (
                grow_decode_cache(model, params, encoded, SOURCES, c, steps, beams)
                for c in (fast, reference)
            )
        fed = 1 if step == 0 else beams
        tokens = jnp.asarray(rng.integers(3, VOCAB, size=batch * fed), jnp.int32)
        fast_logits, fast = _next_logits(model, params, fast, encoded, SOURCES, tokens)
        ref_logits, reference = _next_logits(model, params, reference, encoded, SOURCES, tokens)
        np.testing.assert_allclose(fast_logits, ref_logits, rtol=0, atol=1e-5)
        origin = rng.integers(0, fed, size=(batch, beams)).astype(np.int32)  # [batch, beams]
        written = {
            jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_leaves_with_path(fast)
            if "cached" in jax.tree_util.keystr(p)
        }
        fast = beam_cache.reorder(fast, jnp.asarray(origin))
        reference = beam_cache.reorder_by_gather(reference, jnp.asarray(origin))
        for path, x in jax.tree_util.tree_leaves_with_path(fast):  # keys/values stay put
            if jax.tree_util.keystr(path) in written:
                np.testing.assert_array_equal(x, written[jax.tree_util.keystr(path)])
        ancestry = np.asarray(reference["decoder"]["beam_ancestry"])[:, :, : step + 1]
        np.testing.assert_array_equal(
            ancestry, np.broadcast_to(np.arange(beams)[None, :, None], ancestry.shape)
        )
        fast_views = beam_cache.hypothesis_keys_values(fast)
        ref_views = beam_cache.hypothesis_keys_values(reference)
        assert len(fast_views) == model.config.num_decoder_layers
        for layer, (key, value) in fast_views.items():
            assert key.shape == (
                batch,
                beams,
                model.config.num_heads,
                model.config.head_dim,
                step + 1,
            )
            np.testing.assert_allclose(key, ref_views[layer][0], rtol=0, atol=1e-6)
            np.testing.assert_allclose(value, ref_views[layer][1], rtol=0, atol=1e-6)
        raw = np.asarray(fast["decoder"]["layer_0"]["self_attention"]["cached_value"])
        slot_contents = raw.reshape(batch, -1, raw.shape[2] // beams, beams, raw.shape[3])
        view = np.asarray(fast_views["['decoder']['layer_0']['self_attention']"][1])
        moved |= not np.allclose(
            view.transpose(0, 2, 3, 1, 4)[:, :, : step + 1], slot_contents[:, :, : step + 1]
        )
    assert moved  # the survivors' histories did leave their own slots (the test can fail)


@pytest.mark.parametrize(
    "fixture, bound",
    [
        ("model_and_params", MAX_LEN + 2),  # one phase
        ("long_model_and_params", 16),  # two phases: the cache grows once
    ],
)
def test_beam_search_with_the_gather_reorder_is_the_same(fixture, bound, request, monkeypatch):
    """Beam search with ``beam_cache.reorder`` (only the ancestry moves) finds the
    sequences and scores it finds with the reference ``reorder_by_gather``."""
    from distill_jax.models import beam_cache

    model, params = request.getfixturevalue(fixture)
    seqs, scores = beam_search(model, params, SOURCES, beam_size=3, max_len=bound)
    monkeypatch.setattr(beam_cache, "reorder", beam_cache.reorder_by_gather)
    jax.clear_caches()  # trace beam_search again, with the reference reorder
    try:
        gather_seqs, gather_scores = beam_search(model, params, SOURCES, beam_size=3, max_len=bound)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    np.testing.assert_array_equal(seqs, gather_seqs)
    np.testing.assert_allclose(scores, gather_scores, rtol=0, atol=1e-5)
    assert len({as_tuple(h) for h in np.asarray(seqs).reshape(-1, seqs.shape[-1])}) > 3
