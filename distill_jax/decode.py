"""Jitted decoding for the student: beam search, greedy search and sampling.

Each search is a pure function with one ``lax.while_loop`` over target positions; the
decoder runs incrementally through its ``cache`` collection (see
``distill_jax.models.transformer``). The functions are ``jax.jit``-compiled with the model
and the length settings static.

Conventions shared by all searches:
  * ``params`` is the model's ``"params"`` collection (e.g. ``TrainState.params``).
  * Output sequences exclude BOS; they hold the generated tokens, the EOS included when it
    was produced, and ``pad_id`` after it. ``pad_id`` and ``bos_id`` are never generated
    (their log-probabilities are set to -inf without renormalising).
  * Length of a hypothesis = number of generated tokens, EOS included.
  * Length bound: ``max_len=None`` uses ``config.max_len``; an int is a fixed bound; a pair
    ``(a, b)`` bounds each sentence by ``floor(a * src_len + b)`` tokens, where ``src_len``
    counts the source tokens that are neither pad nor EOS, capped by ``config.max_len``. A
    hypothesis that reaches its bound without EOS ends there and is scored as it is.

Growing caches (``cache_phases``): every step attends over all the key/value slots its
cache has, masked down to the decoded ones, so a cache sized for the whole length bound
makes early steps read mostly empty slots (beam search on a CPU spent a fifth of its time
in that attention, with a cost per step that grows faster than the slots). The searches
therefore run their loop in up to ``cache_phases`` phases (``phase_ends``), each a
``lax.while_loop`` over a cache sized for the phase's last step, and grow the cache
between phases (``grow_decode_cache``); a search whose sentences are all done early
skips the later phases' loops. The results are those of one loop over a full-size cache
(the extra slots are masked either way), up to the order of float summation. Each phase
compiles its own copy of the decoder step; ``cache_phases=1`` keeps one loop.

The cache itself (its layout, how a step writes it, the ancestry mask, how beam search
reorders it after each step with ``beam_cache.reorder``, growth and phases) is described
in ``distill_jax.models.beam_cache``, which also keeps the plain gather-reorder form
(``beam_cache.reorder_by_gather``) that the tests compare the searches against.

Sharding: the functions take globally sharded arrays. Put ``src`` on a mesh with its batch
axis sharded (e.g. ``NamedSharding(mesh, P(("data", "fsdp")))``) and call the function;
everything, the beam bookkeeping included, stays batch-sharded and runs without host
synchronisation (beams are gathered within each sentence, never across the batch). To also
apply the models' logical activation constraints, call inside ``jax.set_mesh(mesh)`` and
``nn.logical_axis_rules(LOGICAL_AXIS_RULES)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distill_jax.models import beam_cache
from distill_jax.models.beam_cache import DEFAULT_CACHE_PHASES, gather_beams, phase_ends
from distill_jax.models.transformer import Transformer, grow_decode_cache, init_decode_cache

MaxLen = int | tuple[float, float] | None

NEG_INF = -jnp.inf


def gnmt_length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al., 2016)."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def length_limits(model: Transformer, src: jax.Array, max_len: MaxLen) -> tuple[int, jax.Array]:
    """(static number of decoding steps, per-sentence bound [batch] int32); see the module doc."""
    cfg = model.config
    batch, src_width = src.shape
    if max_len is None:
        steps = cfg.max_len
        limits = jnp.full((batch,), steps, jnp.int32)  # [batch]
    elif isinstance(max_len, int):
        if not 1 <= max_len <= cfg.max_len:
            raise ValueError(f"max_len must be in [1, config.max_len={cfg.max_len}], got {max_len}")
        steps = max_len
        limits = jnp.full((batch,), steps, jnp.int32)  # [batch]
    elif isinstance(max_len, tuple) and len(max_len) == 2:
        a, b = max_len
        if a < 0:
            raise ValueError(f"max_len=(a, b) needs a >= 0, got a={a}")
        steps = min(cfg.max_len, math.floor(a * src_width + b))
        if steps < 1:
            raise ValueError(
                f"max_len={max_len} allows no target token for sources of width {src_width}"
            )
        src_len = jnp.sum((src != cfg.pad_id) & (src != cfg.eos_id), axis=1)  # [batch]
        limits = jnp.floor(a * src_len + b).astype(jnp.int32)  # [batch]
        limits = jnp.clip(limits, 1, steps)  # [batch]
    else:
        raise ValueError(f"max_len must be None, an int or a pair (a, b), got {max_len!r}")
    return steps, limits


def _run_phases(
    ends: list[int],
    cond: Callable,
    body: Callable,
    state: Any,
    grow: Callable[[Any, int], Any],
) -> Any:
    """``lax.while_loop(cond, body, state)`` run as one loop per phase: the loop of the
    phase ending at step ``end`` also stops there, then ``grow(cache, end)`` (a
    ``grow_decode_cache`` of the search's model, parameters, encoder output, source and
    beams) makes the cache (``state.cache``) room for the next phase's length. ``state``
    has fields ``step`` and ``cache``."""
    for phase, end in enumerate(ends):
        if phase:
            with jax.named_scope("grow_cache"):
                state = state._replace(cache=grow(state.cache, end))
        state = jax.lax.while_loop(lambda s, end=end: cond(s) & (s.step < end), body, state)
    return state


def _start_decoding(model: Transformer, params: Any, src: jax.Array, beams: int, steps: int):
    """Encodes ``src`` [batch, src] and builds the cache for ``beams`` hypotheses of each
    sentence (``init_decode_cache``: the encoder output is projected and kept once per
    sentence, the self-attention caches have a slot per hypothesis).

    Returns (encoded [batch, src, embed], cache).
    """
    if src.ndim != 2:
        raise ValueError(f"src must be [batch, length], got shape {src.shape}")
    encoded = model.apply({"params": params}, src, method=Transformer.encode)  # [batch, src, embed]
    cache = init_decode_cache(model, params, encoded, src, steps, beams)  # leaves [batch, ...]
    return encoded, cache


def log_softmax(logits: jax.Array) -> jax.Array:
    """``jax.nn.log_softmax`` over the last axis (same values), written so that XLA's CPU
    backend keeps its reductions out of the logits' matmul: it otherwise fuses the
    matmul, the row max and the subtraction into one YNNPACK graph that ran 2x slower
    than the matmul and the reductions apart (160 x 512 @ 512 x 10,000: 34 vs 17 ms,
    a fifth of beam search's time). ``reduce_precision`` to the dtype's own precision
    changes no value, and YNNPACK does not take it, so the fusion stops there."""
    info = jnp.finfo(logits.dtype)
    exact = jax.lax.reduce_precision(logits, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    shifted = logits - jax.lax.stop_gradient(jnp.max(exact, axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def _next_logits(model, params, cache, encoded, src, tokens):
    """One decoder step: tokens [batch * beams] (hypothesis j of sentence b in row
    b * beams + j), src [batch, src] -> (logits [batch * beams, vocab], new cache)."""
    logits, variables = model.apply(
        {"params": params, "cache": cache},
        encoded,
        src,
        tokens[:, None],
        decode=True,
        mutable=["cache"],
        method=Transformer.decode,
    )  # [n, 1, vocab]
    return logits[:, 0], variables["cache"]


def _never_generated(cfg) -> tuple[int, ...]:
    """The token ids no search generates (pad, BOS)."""
    return tuple(sorted({cfg.pad_id, cfg.bos_id}))


def _next_log_probs(model, params, cache, encoded, src, tokens):
    """``_next_logits`` -> (log-probs [batch * beams, vocab] with pad/bos at -inf, cache)."""
    logits, cache = _next_logits(model, params, cache, encoded, src, tokens)
    log_probs = log_softmax(logits)  # [n, vocab]
    banned = jnp.isin(
        jnp.arange(model.config.vocab_size), jnp.array(_never_generated(model.config), jnp.int32)
    )  # [vocab]
    return jnp.where(banned[None, :], NEG_INF, log_probs), cache


# Block width of ``top_log_probs``' first pass over the vocabulary: a divisor of the
# vocabulary size in [TOP_K_BLOCK // 2, 2 * TOP_K_BLOCK] nearest to TOP_K_BLOCK when there
# is one (XLA's CPU backend then reads the logits as blocks without copying them), else
# TOP_K_BLOCK and a shorter last block.
TOP_K_BLOCK = 128


def _block_width(vocab: int) -> int:
    divisors = [w for w in range(TOP_K_BLOCK // 2, 2 * TOP_K_BLOCK + 1) if vocab % w == 0]
    return min(divisors, key=lambda w: (abs(w - TOP_K_BLOCK), w), default=TOP_K_BLOCK)


def top_log_probs(
    logits: jax.Array, k: int, banned: tuple[int, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest log-probabilities of every row and their token ids, best first:
    ``jax.lax.top_k(log_softmax(logits), k)`` for logits [rows, vocab] with the token ids
    ``banned`` at -inf, without writing the [rows, vocab] log-probs.

    The row is cut into blocks of about ``TOP_K_BLOCK`` tokens (``_block_width``).
    The k best allowed tokens lie in the ``k + len(banned)`` blocks with the largest
    maxima (a banned token can lift at most one block above them); those blocks are
    searched in token order, so ties still go to the lower token id. With the
    log-softmax normaliser (over every token, banned ones included, as ``log_softmax``)
    this reads the logits in two vectorised passes, the block maxima and a sum of
    exponentials, where the plain form wrote the [rows, vocab] log-probs and ran
    ``top_k`` over whole rows (beam search's bookkeeping on a CPU, 160 x 10,000 per step:
    142 -> 103 ms of a 2.4 s call, BENCHMARKS.md)."""
    rows, vocab = logits.shape
    banned_ids = jnp.array(banned, jnp.int32)
    width = _block_width(vocab)
    blocks = -(-vocab // width)
    searched = k + len(banned)
    if blocks <= searched:  # small vocabulary: nothing to skip
        mask = jnp.isin(jnp.arange(vocab), banned_ids)[None, :]  # [1, vocab]
        return jax.lax.top_k(jnp.where(mask, NEG_INF, log_softmax(logits)), k)
    full = vocab // width * width
    block_max = jnp.max(
        logits[:, :full].reshape(rows, full // width, width), axis=-1
    )  # [rows, full blocks]
    if full < vocab:
        block_max = jnp.concatenate(
            [block_max, jnp.max(logits[:, full:], axis=-1, keepdims=True)], axis=1
        )
    best_blocks = jnp.sort(jax.lax.top_k(block_max, searched)[1], axis=-1)  # [rows, searched]
    tokens = (best_blocks[:, :, None] * width + jnp.arange(width)).reshape(rows, searched * width)
    values = jnp.take_along_axis(logits, jnp.minimum(tokens, vocab - 1), axis=1)
    allowed = (tokens < vocab) & ~jnp.isin(tokens, banned_ids)  # [rows, searched*block]
    values, chosen = jax.lax.top_k(jnp.where(allowed, values, NEG_INF), k)  # [rows, k]
    tokens = jnp.take_along_axis(tokens, chosen, axis=1)  # [rows, k]
    row_max = jnp.max(block_max, axis=-1, keepdims=True)  # [rows, 1], over every token
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))
    return (values - row_max) - log_norm, tokens


class _BeamState(NamedTuple):
    """Loop carry of ``beam_search``."""

    step: jax.Array  # [] tokens generated so far
    live_seqs: jax.Array  # [batch, beams, steps] unfinished hypotheses (pad-filled)
    live_log_probs: jax.Array  # [batch, beams] their summed log-probs (-inf: empty slot)
    finished_seqs: jax.Array  # [batch, beams, steps] best finished hypotheses
    finished_scores: jax.Array  # [batch, beams] their penalised scores, sorted (-inf: empty)
    cache: Any  # decoder cache (init_decode_cache), leaves [batch, ...]


@functools.partial(
    jax.jit, static_argnames=("model", "beam_size", "length_penalty", "max_len", "cache_phases")
)
def beam_search(
    model: Transformer,
    params: Any,
    src: jax.Array,  # [batch, src] int32, pad_id-padded
    *,
    beam_size: int = 5,
    length_penalty: float = 0.6,
    max_len: MaxLen = None,
    cache_phases: int = DEFAULT_CACHE_PHASES,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with the GNMT length penalty.

    Score of a finished hypothesis of length n (EOS included when present) =
    sum of its token log-probs / ((5 + n) / 6) ** length_penalty.

    At each step the ``2 * beam_size`` best extensions (by summed log-prob) are kept; an
    extension ending in EOS is finished if it ranks among the first ``beam_size`` (as in
    fairseq, so that ``beam_size=1`` with no length penalty is greedy search), the best
    ``beam_size`` others stay live. A sentence stops when no live hypothesis can still beat
    the worst of its ``beam_size`` best finished ones, or at its length bound.

    Returns (sequences [batch, beam_size, steps] best first, scores [batch, beam_size]);
    unused slots have score -inf and pad tokens. ``cache_phases``: see the module doc.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    cfg = model.config
    batch = src.shape[0]
    vocab = cfg.vocab_size
    steps, limits = length_limits(model, src, max_len)  # limits [batch]
    ends = phase_ends(steps, cache_phases)
    encoded, cache = _start_decoding(model, params, src, beam_size, ends[0])
    rank = jnp.arange(2 * beam_size)  # [2*beams]
    never = _never_generated(cfg)
    per_row = min(2 * beam_size, vocab)  # candidates kept per hypothesis

    def max_penalty(step):
        """Largest penalty any live hypothesis can still receive -> [batch]."""
        return jnp.maximum(
            gnmt_length_penalty(step + 1, length_penalty),
            gnmt_length_penalty(limits, length_penalty),
        )  # [batch]

    def sentence_done(state: _BeamState) -> jax.Array:
        """[batch] bool: the sentence's finished list can no longer change."""
        best_live = state.live_log_probs[:, 0]  # [batch]
        worst_finished = state.finished_scores[:, -1]  # [batch]
        cannot_win = best_live / max_penalty(state.step) < worst_finished  # [batch]
        return (state.step >= limits) | (best_live == NEG_INF) | cannot_win

    def cond(state: _BeamState) -> jax.Array:
        return (state.step < steps) & ~jnp.all(sentence_done(state))

    def advance(state: _BeamState, first: bool = False) -> _BeamState:
        """One step. The first feeds BOS to only one hypothesis per sentence, the only
        live one (unless the vocabulary is too small to fill 2 * beam_size candidates
        from one), so that the empty beams do not repeat its decoder work."""
        step = state.step
        fed = 1 if first and vocab >= 2 * beam_size else beam_size
        if first:
            tokens = jnp.full((batch, fed), cfg.bos_id, jnp.int32)  # [batch, fed]
        else:
            tokens = jax.lax.dynamic_index_in_dim(
                state.live_seqs, step - 1, axis=2, keepdims=False
            )  # [batch, beams]
        logits, cache = _next_logits(
            model, params, state.cache, encoded, src, tokens.reshape(-1)
        )  # [batch*fed, vocab]
        # The 2 * beam_size best extensions of the whole beam are among the 2 * beam_size
        # best of each hypothesis; ties go to the lower (hypothesis, token) as in one
        # top_k over all of them.
        row_best, row_tokens = top_log_probs(logits, per_row, never)  # [batch*fed, per_row]
        candidates = state.live_log_probs[:, :fed, None] + row_best.reshape(
            batch, fed, per_row
        )  # [batch, fed, per_row]
        best_log_probs, top_index = jax.lax.top_k(
            candidates.reshape(batch, fed * per_row), 2 * beam_size
        )  # [batch, 2*beams]
        top_origin = top_index // per_row  # [batch, 2*beams]
        top_tokens = jnp.take_along_axis(
            row_tokens.reshape(batch, fed * per_row), top_index, axis=1
        )  # [batch, 2*beams]
        top_seqs = gather_beams(state.live_seqs, top_origin)  # [batch, 2*beams, steps]
        top_seqs = top_seqs.at[:, :, step].set(top_tokens)  # [batch, 2*beams, steps]

        ends = (top_tokens == cfg.eos_id) | (step + 1 >= limits)[:, None]  # [batch, 2*beams]
        new_scores = best_log_probs / gnmt_length_penalty(
            step + 1, length_penalty
        )  # [batch, 2*beams]
        new_scores = jnp.where(ends & (rank < beam_size)[None, :], new_scores, NEG_INF)
        all_scores = jnp.concatenate(
            [state.finished_scores, new_scores], axis=1
        )  # [batch, 3*beams]
        all_seqs = jnp.concatenate(
            [state.finished_seqs, top_seqs], axis=1
        )  # [batch, 3*beams, steps]
        finished_scores, keep = jax.lax.top_k(all_scores, beam_size)  # [batch, beams]
        finished_seqs = gather_beams(all_seqs, keep)  # [batch, beams, steps]

        live_candidates = jnp.where(ends, NEG_INF, best_log_probs)  # [batch, 2*beams]
        live_log_probs, keep = jax.lax.top_k(live_candidates, beam_size)  # [batch, beams]
        live_seqs = gather_beams(top_seqs, keep)  # [batch, beams, steps]
        origin = gather_beams(top_origin, keep)  # [batch, beams]
        # survivor j extends hypothesis origin[b, j]: beam_cache, invariant 5
        cache = beam_cache.reorder(cache, origin)
        return _BeamState(
            step + 1, live_seqs, live_log_probs, finished_seqs, finished_scores, cache
        )

    first_beam_only = jnp.where(jnp.arange(beam_size) == 0, 0.0, NEG_INF)  # [beams]
    init = _BeamState(
        step=jnp.array(0, jnp.int32),
        live_seqs=jnp.full((batch, beam_size, steps), cfg.pad_id, jnp.int32),
        live_log_probs=jnp.broadcast_to(first_beam_only, (batch, beam_size)),
        finished_seqs=jnp.full((batch, beam_size, steps), cfg.pad_id, jnp.int32),
        finished_scores=jnp.full((batch, beam_size), NEG_INF, jnp.float32),
        cache=cache,
    )
    # The first step always runs: every sentence's bound is >= 1.
    first = advance(init, first=True)
    grow = functools.partial(grow_decode_cache, model, params, encoded, src, beams=beam_size)
    final = _run_phases(ends, cond, advance, first, grow)
    sequences = jnp.where(
        final.finished_scores[:, :, None] > NEG_INF, final.finished_seqs, cfg.pad_id
    )  # [batch, beams, steps]
    return sequences, final.finished_scores


class _SampleState(NamedTuple):
    """Loop carry of the one-hypothesis-per-sentence searches."""

    step: jax.Array  # [] tokens generated so far
    seqs: jax.Array  # [batch, steps] generated tokens (pad-filled)
    log_probs: jax.Array  # [batch] summed log-probs of the generated tokens
    done: jax.Array  # [batch] bool, EOS produced or bound reached
    cache: Any  # decoder cache, leaves [batch, ...]


def _left_to_right(
    model: Transformer,
    params: Any,
    src: jax.Array,  # [batch, src]
    max_len: MaxLen,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    cache_phases: int,
) -> tuple[jax.Array, jax.Array]:
    """Decodes one token per step with ``choose(log_probs [batch, vocab], step) -> [batch]``.

    Returns (sequences [batch, steps], summed log-probs [batch], EOS included, no penalty).
    """
    cfg = model.config
    batch = src.shape[0]
    steps, limits = length_limits(model, src, max_len)  # limits [batch]
    ends = phase_ends(steps, cache_phases)
    encoded, cache = _start_decoding(model, params, src, 1, ends[0])

    def cond(state: _SampleState) -> jax.Array:
        return (state.step < steps) & ~jnp.all(state.done)

    def body(state: _SampleState) -> _SampleState:
        step = state.step
        previous = jax.lax.dynamic_index_in_dim(
            state.seqs, jnp.maximum(step - 1, 0), axis=1, keepdims=False
        )  # [batch]
        tokens = jnp.where(step == 0, cfg.bos_id, previous)  # [batch]
        log_probs, cache = _next_log_probs(
            model, params, state.cache, encoded, src, tokens
        )  # [batch, vocab]
        chosen = jnp.where(state.done, cfg.pad_id, choose(log_probs, step))  # [batch]
        chosen_log_prob = jnp.take_along_axis(log_probs, chosen[:, None], axis=1)[:, 0]  # [batch]
        total = state.log_probs + jnp.where(state.done, 0.0, chosen_log_prob)  # [batch]
        seqs = state.seqs.at[:, step].set(chosen)  # [batch, steps]
        done = state.done | (chosen == cfg.eos_id) | (step + 1 >= limits)  # [batch]
        return _SampleState(step + 1, seqs, total, done, cache)

    init = _SampleState(
        step=jnp.array(0, jnp.int32),
        seqs=jnp.full((batch, steps), cfg.pad_id, jnp.int32),
        log_probs=jnp.zeros((batch,), jnp.float32),
        done=jnp.zeros((batch,), bool),
        cache=cache,
    )
    grow = functools.partial(grow_decode_cache, model, params, encoded, src, beams=1)
    final = _run_phases(ends, cond, body, init, grow)
    return final.seqs, final.log_probs


@functools.partial(jax.jit, static_argnames=("model", "max_len", "cache_phases"))
def greedy_search(
    model: Transformer,
    params: Any,
    src: jax.Array,  # [batch, src] int32
    *,
    max_len: MaxLen = None,
    cache_phases: int = DEFAULT_CACHE_PHASES,
) -> tuple[jax.Array, jax.Array]:
    """Most probable next token at every step.

    Returns (sequences [batch, steps], summed log-probs [batch]).
    """
    return _left_to_right(
        model,
        params,
        src,
        max_len,
        lambda log_probs, step: jnp.argmax(log_probs, axis=-1),
        cache_phases,
    )


def nucleus_mask(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus (top-p) restriction of logits [rows, vocab]: keeps, in every row, the fewest
    most probable tokens whose probability under ``softmax(logits)`` reaches ``top_p``
    (a token is kept when the tokens more probable than it hold less than ``top_p``; tokens
    as probable as the last kept one are kept too), the others set to -inf. ``top_p >= 1``
    keeps every token."""
    if top_p >= 1.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)  # [rows, vocab]
    ranked = -jnp.sort(-probs, axis=-1)  # [rows, vocab] descending
    before = jnp.cumsum(ranked, axis=-1) - ranked  # mass of the tokens ranked above
    threshold = jnp.min(
        jnp.where(before < top_p, ranked, jnp.inf), axis=-1, keepdims=True
    )  # [rows, 1] probability of the last kept token
    return jnp.where(probs >= threshold, logits, NEG_INF)


def _per_row_keys(rng: jax.Array) -> bool:
    """Whether ``rng`` holds one key per sentence (typed keys [batch] or raw [batch, 2])
    rather than one key for the batch."""
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return rng.ndim == (1 if typed else 2)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What ``sample`` draws each token from: ``softmax(log_probs / temperature)``,
    restricted to the ``top_k`` most probable tokens when ``top_k > 0``, then to the
    nucleus of probability ``top_p`` (``nucleus_mask``) when ``top_p < 1``. Hashable: a
    static argument of the jitted search."""

    temperature: float = 1.0  # > 0
    top_k: int = 0  # in [0, vocab_size]; 0 keeps every token
    top_p: float = 1.0  # in (0, 1]; 1 keeps every token


@functools.partial(jax.jit, static_argnames=("model", "sampling", "max_len", "cache_phases"))
def sample(
    model: Transformer,
    params: Any,
    src: jax.Array,  # [batch, src] int32
    rng: jax.Array,  # one key, or one per sentence ([batch] typed / [batch, 2] raw keys)
    *,
    sampling: Sampling = Sampling(),
    max_len: MaxLen = None,
    cache_phases: int = DEFAULT_CACHE_PHASES,
) -> tuple[jax.Array, jax.Array]:
    """Ancestral sampling, each token drawn as ``sampling`` says: the temperature, then the
    ``top_k`` restriction, then the nucleus, in that order (as transformers does).

    With one key per sentence, a sentence's sample depends only on its key, its source and
    the batch shape, not on the other sentences (how ``translate`` makes streamed and batch
    outputs equal); with one key, on the whole batch.

    Returns (sequences [batch, steps], summed model log-probs [batch] at temperature 1).
    """
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k < 0 or top_k > model.config.vocab_size:
        raise ValueError(f"top_k must be in [0, vocab_size={model.config.vocab_size}], got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    per_row = _per_row_keys(rng)

    def choose(log_probs: jax.Array, step: jax.Array) -> jax.Array:
        logits = log_probs / temperature  # [batch, vocab]
        if top_k:
            kth_best = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [batch, 1]
            logits = jnp.where(logits >= kth_best, logits, NEG_INF)  # [batch, vocab]
        logits = nucleus_mask(logits, top_p)  # [batch, vocab]
        if per_row:
            return jax.vmap(
                lambda key, row: jax.random.categorical(jax.random.fold_in(key, step), row)
            )(rng, logits)  # [batch]
        return jax.random.categorical(jax.random.fold_in(rng, step), logits, axis=-1)  # [batch]

    return _left_to_right(model, params, src, max_len, choose, cache_phases)
