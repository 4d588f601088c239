"""The student decoder's incremental-decoding cache: its layout, growth, beam reorder and
the ancestry mask, in one place.

Everything that decodes one target position per call (beam search, greedy search and
sampling in ``distill_jax.decode``; the step-by-step test of ``Transformer.decode``) keeps
its state in the Flax ``cache`` collection of ``Transformer.decode(..., decode=True)``.
This module owns that collection: ``layers.MultiHeadAttention`` and
``transformer.Decoder`` call its functions to create and update their variables,
``transformer.init_decode_cache`` / ``grow_decode_cache`` create and grow it, and the
searches reorder it with ``reorder``.

Names
-----
``batch``     sentences (rows of ``src``)
``beams``     hypotheses kept per sentence (``beam_size``; 1 for greedy search and sampling)
``max_len``   target positions the cache has room for (a decoding phase's last step, below)
``heads``, ``kv``   attention heads and per-head width of the decoder
``src_len``   padded source width
Hypothesis ``j`` of sentence ``b`` is row ``b * g + j`` of every per-hypothesis array of
a step that feeds ``g`` hypotheses per sentence (the decoder's input tokens
``[batch * g, 1]``, its logits ``[batch * g, 1, vocab]``; ``g = beams`` but in beam
search's first step, see invariant 2).

Layout (the leaves of the ``cache`` collection)
-----------------------------------------------
``decoder/position_index``  int32 ``[]``: positions decoded so far; the position of the
    token the next call feeds (its position embedding).
``decoder/beam_ancestry``   int32 ``[batch, beams, max_len]``: ``beam_ancestry[b, j, p]`` is
    the beam slot that holds the key/value of hypothesis ``j``'s token at position ``p``
    (meaningful for ``p < position_index`` only).
``decoder/layer_N/self_attention/cached_key``    ``[batch, heads, kv, max_len * beams]``
``decoder/layer_N/self_attention/cached_value``  ``[batch, heads, max_len * beams, kv]``
    One row per sentence, heads-major (no step transposes the cache); keys transposed so
    that a step's scores are a plain ``[q, kv] @ [kv, slots]`` matmul per sentence and
    head. The last (keys) / third (values) axis holds ``max_len * beams`` entries in
    POSITION-MAJOR order: entry ``p * beams + i`` is position ``p`` of beam slot ``i``.
``decoder/layer_N/self_attention/cache_index``   int32 ``[]``: the position the layer's
    next call writes (equals ``position_index`` between calls).
``decoder/layer_N/cross_attention/cached_key``   ``[batch, heads, kv, src_len]``
``decoder/layer_N/cross_attention/cached_value`` ``[batch, heads, src_len, kv]``
    The projected encoder output, once per sentence (shared by its hypotheses), written
    by the call that creates the cache and only read afterwards.

Invariants
----------
1. Creation (``transformer.init_decode_cache``): one ``Transformer.decode`` call on a dummy
   ``[batch, max_len]`` target allocates zero keys/values and a zero ancestry, sets the
   counters to 0 and stores the cross-attention projections; its logits are discarded.
2. A step (``decode=True`` on an existing cache) feeds one position of the first ``g``
   hypotheses of every sentence, ``[batch * g, 1]`` with ``1 <= g <= beams`` (``g = 1``:
   beam search's first step, where every hypothesis would be the same BOS, when the
   vocabulary has at least ``2 * beams`` tokens; otherwise ``g = beams``). Every layer writes the new keys/values of hypothesis ``j < g`` into its
   own slot ``j`` at position ``position_index``, entries ``position_index * beams + j``
   (``write_self_attention``). Entries are written once and, but by the reference
   reorder of invariant 5, never moved afterwards.
3. The same step sets ``beam_ancestry[b, j, position_index] = j`` for every ``j < beams``
   (the fed and the unfed hypotheses alike; ``step_mask``), then increments
   ``position_index`` (``decoder_step``); each layer increments its ``cache_index`` after
   its write (``write_self_attention``).
4. Ancestry mask: in the step at position ``t``, hypothesis ``j`` of sentence ``b`` may
   attend to entry ``p * beams + i`` iff ``p <= t`` and ``beam_ancestry[b, j, p] == i``
   (after the write of 3): exactly one entry per decoded position, the key/value of its
   own token at ``t`` and of its ancestors' tokens before. The mask is
   ``[batch, 1, g, max_len * beams]`` (``step_mask``); the queries of a sentence's ``g``
   hypotheses share one batched matmul against its entries.
5. Reorder (``reorder``): after a step, beam search keeps ``beams`` survivors; survivor
   ``j`` of sentence ``b`` extends hypothesis ``origin[b, j]`` (``origin`` int32
   ``[batch, beams]``, within the sentence). Only ``beam_ancestry`` moves, a gather of its
   ``[max_len]`` rows: ``new[b, j, :] = old[b, origin[b, j], :]``; keys/values stay where
   they were written. Greedy search and sampling (one hypothesis) never reorder.
   The reference form ``reorder_by_gather`` instead moves every self-attention key/value
   of slot ``origin[b, j]`` to slot ``j`` at every position and keeps the ancestry as
   written by 3 (``beam_ancestry[b, j, p] == j`` for decoded ``p``); both forms give every
   hypothesis the same keys/values at every decoded position (``hypothesis_keys_values``)
   and so the same search results, up to the order of float summation in attention
   (tests/test_decode.py compares them); the ancestry form copies ``[batch, beams, max_len]``
   int32 per step where the gather copied every layer's keys and values (an eighth of
   beam search's time on a CPU).
6. Growth and phases (``grow``, ``phase_ends``): every step attends over all
   ``max_len * beams`` entries, masked down to the decoded ones, so the searches run their
   ``lax.while_loop`` in up to ``cache_phases`` phases of at least ``MIN_PHASE_STEPS``
   steps, each over a cache sized (``max_len``) for the phase's last step, and grow the
   cache between phases (``transformer.grow_decode_cache``): keys/values and the
   ancestry are padded with zeros at the end of their position axis, everything else is
   kept. Because the entries are position-major, entry ``p * beams + i`` keeps its index
   when ``max_len`` grows, and the padded positions are masked (``p > t``) until
   written; the grown cache is the one a larger ``init_decode_cache`` would have reached
   after the same steps. Results equal one loop over a full-size cache up to the order
   of float summation.

Zeros in unwritten entries and stale entries of dropped hypotheses are never visible
(invariant 4). The cache carries no sharding of its own: its leaves have the batch axis
first, so a batch-sharded ``src`` keeps them batch-sharded, and reorders gather within a
sentence, never across the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Variable names of the ``cache`` collection (the Flax modules' names are those of
# ``transformer``: ``decoder``, ``layer_N``, ``self_attention``, ``cross_attention``).
CACHED_KEY = "cached_key"
CACHED_VALUE = "cached_value"
CACHE_INDEX = "cache_index"
POSITION_INDEX = "position_index"
ANCESTRY = "beam_ancestry"
SELF_ATTENTION = "self_attention"  # the decoder layers' self-attention module

# Decoding phases are at least this many steps: a shorter one saves less attention work
# than another compiled copy of the decoder step costs.
MIN_PHASE_STEPS = 8
# Phases of a search by default: 4 made beam search 1.09x faster than 1 on a CPU (d 512,
# 6 + 6 layers, 32 steps; BENCHMARKS.md); 8 were barely faster than 4.
DEFAULT_CACHE_PHASES = 4


# --- the self-attention keys/values (layers.MultiHeadAttention) ---------------------------


def write_self_attention(
    module: nn.Module, key: jax.Array, value: jax.Array, beams: int
) -> tuple[jax.Array, jax.Array]:
    """The self-attention cache of ``module`` (a ``MultiHeadAttention`` inside its call).

    The first call (the one that creates the cache) takes key/value [batch, max_len,
    heads, kv], allocates zero caches, key [batch, heads, kv, max_len * beams] and value
    [batch, heads, max_len * beams, kv] (position-major: position p of beam slot i is
    entry p * beams + i), and returns its own keys/values in those layouts
    ([batch, heads, kv, max_len], [batch, heads, max_len, kv]; its output is discarded).
    Later calls take one position of the first ``g`` hypotheses of every sentence,
    [batch * g, 1, heads, kv] (``g`` from 1 to the cache's beams), and write their
    keys/values as one block into slots ``0..g-1`` of position ``cache_index``
    (invariant 2); they return the whole caches."""
    initialized = module.has_variable("cache", CACHED_KEY)
    if not initialized:
        batch, max_len, heads, head_dim = key.shape
        slots = max_len * beams
        module.variable("cache", CACHED_KEY, jnp.zeros, (batch, heads, head_dim, slots), key.dtype)
        module.variable(
            "cache", CACHED_VALUE, jnp.zeros, (batch, heads, slots, head_dim), value.dtype
        )
        module.variable("cache", CACHE_INDEX, lambda: jnp.array(0, dtype=jnp.int32))
        # [batch, heads, kv, max_len], [batch, heads, max_len, kv]
        return key.transpose(0, 2, 3, 1), value.transpose(0, 2, 1, 3)
    cached_key = module.variable("cache", CACHED_KEY)
    cached_value = module.variable("cache", CACHED_VALUE)
    cache_index = module.variable("cache", CACHE_INDEX)
    batch, heads, head_dim, slots = cached_key.value.shape
    if key.shape[1] != 1:
        raise ValueError(f"incremental decoding takes one position per call, got {key.shape[1]}")
    fed = key.shape[0] // batch
    if key.shape[0] % batch or not 1 <= fed <= beams or slots % beams:
        raise ValueError(
            f"the cache holds {beams} hypotheses of {batch} sentences in "
            f"{slots} slots each; got {key.shape[0]} hypotheses"
        )
    index = cache_index.value
    key = key.reshape(batch, fed, heads, head_dim).transpose(0, 2, 3, 1)  # [b, h, kv, fed]
    value = value.reshape(batch, fed, heads, head_dim).transpose(0, 2, 1, 3)  # [b, h, fed, kv]
    cached_key.value = jax.lax.dynamic_update_slice(
        cached_key.value, key.astype(cached_key.value.dtype), (0, 0, 0, index * beams)
    )
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (0, 0, index * beams, 0)
    )
    cache_index.value = index + 1
    return cached_key.value, cached_value.value


def cross_attention(
    module: nn.Module,
    inputs_kv: jax.Array,
    project: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
) -> tuple[jax.Array, jax.Array]:
    """The cross-attention cache of ``module``: the first call projects the encoder output
    ``inputs_kv`` [batch, src_len, embed] once with ``project`` (-> key, value [batch,
    src_len, heads, kv]) and keeps key [batch, heads, kv, src_len] and value [batch,
    heads, src_len, kv]; later calls return them and ignore ``inputs_kv``."""
    if module.has_variable("cache", CACHED_KEY):
        return (
            module.get_variable("cache", CACHED_KEY),
            module.get_variable("cache", CACHED_VALUE),
        )
    key, value = project(inputs_kv)
    key_t, value_h = key.transpose(0, 2, 3, 1), value.transpose(0, 2, 1, 3)
    module.put_variable("cache", CACHED_KEY, key_t)
    module.put_variable("cache", CACHED_VALUE, value_h)
    return key_t, value_h


# --- the step counter and the ancestry (transformer.Decoder) ------------------------------


def decoder_step(
    module: nn.Module, rows: int, length: int, beams: int
) -> tuple[jax.Array | None, jax.Array | None, int]:
    """The decoder's part of a decoding call of ``module`` (a ``Decoder`` inside its call),
    whose target is [rows, length]: (the position of the fed token, the self-attention
    mask, the cache's beams, which the self-attention layers need to find their slots).

    The call that creates the cache (``length`` = the cache's max_len, ``rows`` = batch)
    allocates ``position_index`` and a zero ``beam_ancestry`` [batch, beams, max_len] and
    returns (None, None, beams): its output is discarded. Later calls feed one
    position (``length`` 1) of ``g`` hypotheses per sentence (``rows`` = batch * g), ignore
    ``beams`` (the cache's own count is returned) and return the position
    ``position_index`` [1] and the mask [batch, 1, g, max_len * beams] of invariant 4,
    after recording invariant 3."""
    initialized = module.has_variable("cache", POSITION_INDEX)
    index = module.variable("cache", POSITION_INDEX, lambda: jnp.array(0, jnp.int32))
    ancestry = module.variable("cache", ANCESTRY, jnp.zeros, (rows, beams, length), jnp.int32)
    if not initialized:
        return None, None, beams
    if length != 1:
        raise ValueError(f"incremental decoding takes one target position per call, got {length}")
    sentences, beams = ancestry.value.shape[:2]
    fed = rows // sentences  # hypotheses fed per sentence
    if rows % sentences or not 1 <= fed <= beams:
        raise ValueError(
            f"the cache holds {beams} hypotheses of each of {sentences} sentences;"
            f" got {rows} rows, not 1 to {beams} per sentence"
        )
    position = index.value[None]  # [1]
    ancestry.value, mask = step_mask(ancestry.value, index.value)  # mask [batch, 1, beams, slots]
    mask = mask[:, :, :fed]  # [batch, 1, g, max_len * beams]
    index.value = index.value + 1
    return position, mask, beams


def step_mask(ancestry: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ancestry [batch, beams, max_len], index [] -> (ancestry with every hypothesis's
    position ``index`` in its own slot (invariant 3), the self-attention mask [batch, 1,
    beams, max_len * beams] over the position-major entries: hypothesis j sees entry
    p * beams + i iff p <= index and ancestry[b, j, p] == i (invariant 4))."""
    batch, beams, max_len = ancestry.shape
    own_slot = jnp.broadcast_to(
        jnp.arange(beams, dtype=jnp.int32)[None, :, None], (batch, beams, 1)
    )
    ancestry = jax.lax.dynamic_update_slice(ancestry, own_slot, (0, 0, index))
    slots = jnp.arange(beams, dtype=jnp.int32)[None, None, None, :]  # [1, 1, 1, beams]
    decoded = (jnp.arange(max_len) <= index)[None, None, :, None]  # [1, 1, max_len, 1]
    visible = (ancestry[:, :, :, None] == slots) & decoded  # [batch, j, max_len, i]
    return ancestry, visible.reshape(batch, 1, beams, max_len * beams)


# --- reorder (the searches) ---------------------------------------------------------------


def gather_beams(x: jax.Array, origin: jax.Array) -> jax.Array:
    """x [batch, beams, ...], origin [batch, new_beams] -> x[b, origin[b, j]] [batch, new_beams, ...]."""
    index = origin.reshape(origin.shape + (1,) * (x.ndim - 2))  # [batch, new_beams, 1...]
    return jnp.take_along_axis(x, index, axis=1)


def _name(entry: Any) -> str | None:
    return getattr(entry, "key", None)


def reorder(cache: Any, origin: jax.Array) -> Any:
    """Makes hypothesis j of sentence b the continuation of hypothesis ``origin[b, j]``
    (origin [batch, beams]): gathers the rows of ``beam_ancestry`` only (invariant 5); the
    keys/values stay in the slots where they were written."""

    def move(path, x):
        if _name(path[-1]) != ANCESTRY:
            return x
        return gather_beams(x, origin)  # [batch, beams, max_len]

    return jax.tree_util.tree_map_with_path(move, cache)


def _is_self_attention_entry(path) -> bool:
    return (
        len(path) >= 2
        and _name(path[-2]) == SELF_ATTENTION
        and _name(path[-1]) in (CACHED_KEY, CACHED_VALUE)
    )


def reorder_by_gather(cache: Any, origin: jax.Array) -> Any:
    """The reference form of ``reorder``: what a cache with one row per hypothesis does.
    Every self-attention key/value moves from slot ``origin[b, j]`` to slot ``j`` at every
    position; ``beam_ancestry`` is left as written (the identity on decoded positions), so
    the mask of invariant 4 shows hypothesis j its own slot. Gives the searches the
    results of ``reorder`` (tests/test_decode.py) at the cost of copying every layer's
    keys and values per step."""

    def move(path, x):
        if not _is_self_attention_entry(path):
            return x
        beams = origin.shape[1]
        if _name(path[-1]) == CACHED_KEY:  # [batch, heads, kv, max_len * beams]
            split = x.reshape(x.shape[:3] + (x.shape[3] // beams, beams))
            index = origin[:, None, None, None, :]  # [batch, 1, 1, 1, beams]
            return jnp.take_along_axis(split, index, axis=4).reshape(x.shape)
        split = x.reshape(x.shape[:2] + (x.shape[2] // beams, beams, x.shape[3]))
        index = origin[:, None, None, :, None]  # [batch, 1, 1, beams, 1]
        return jnp.take_along_axis(split, index, axis=3).reshape(x.shape)

    return jax.tree_util.tree_map_with_path(move, cache)


def hypothesis_keys_values(cache: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """What every hypothesis attends to, read through the ancestry (invariant 4): for each
    decoder layer (by its path), keys [batch, beams, heads, kv, t] and values [batch,
    beams, heads, t, kv] of hypothesis j's tokens at positions 0..t-1, t =
    ``position_index``. Equal for the two reorder forms after the same steps; for tests
    and inspection, outside ``jit`` (t becomes a shape)."""
    leaves = jax.tree_util.tree_leaves_with_path(cache)
    ancestry = next(x for path, x in leaves if _name(path[-1]) == ANCESTRY)
    decoded = int(next(x for path, x in leaves if _name(path[-1]) == POSITION_INDEX))
    batch, beams, _ = ancestry.shape
    slot = ancestry[:, :, :decoded]  # [batch, beams, t]
    layers: dict[str, dict[str, jax.Array]] = {}
    for path, x in leaves:
        if _is_self_attention_entry(path):
            layers.setdefault(jax.tree_util.keystr(path[:-1]), {})[_name(path[-1])] = x
    views: dict[str, tuple[jax.Array, jax.Array]] = {}
    for layer, entries in layers.items():
        _, heads, head_dim, slots = entries[CACHED_KEY].shape
        key = entries[CACHED_KEY].reshape(batch, 1, heads, head_dim, slots // beams, beams)
        key = jnp.take_along_axis(key[..., :decoded, :], slot[:, :, None, None, :, None], axis=5)[
            ..., 0
        ]
        value = entries[CACHED_VALUE].reshape(batch, 1, heads, slots // beams, beams, head_dim)
        value = jnp.take_along_axis(
            value[:, :, :, :decoded], slot[:, :, None, :, None, None], axis=4
        )[:, :, :, :, 0]
        views[layer] = (key, value)  # [batch, beams, heads, kv, t], [batch, beams, heads, t, kv]
    return views


# --- growth and phases ----------------------------------------------------------------------


def grow(cache: Any, target: Any) -> Any:
    """``cache`` with every leaf padded with zeros at the end of the axes where ``target``
    (the ``jax.ShapeDtypeStruct`` tree of a cache for more positions) is larger: the
    self-attention keys/values' entry axis and the ancestry's position axis (invariant 6);
    leaves of equal shape are returned as they are."""

    def pad(old: jax.Array, new: jax.ShapeDtypeStruct) -> jax.Array:
        if old.shape == new.shape:
            return old
        if old.ndim != len(new.shape) or any(o > n for o, n in zip(old.shape, new.shape)):
            raise ValueError(f"cannot grow a cache entry of shape {old.shape} to {new.shape}")
        return jnp.pad(old, [(0, n - o) for o, n in zip(old.shape, new.shape)])

    return jax.tree_util.tree_map(pad, cache, target)


def phase_ends(steps: int, phases: int) -> list[int]:
    """The step counts at which the decoding loop's phases end (invariant 6): up to
    ``phases`` phases of about equal length, none shorter than ``MIN_PHASE_STEPS`` steps
    (one phase when ``steps`` is short), the last ending at ``steps``."""
    if phases < 1:
        raise ValueError(f"cache_phases must be >= 1, got {phases}")
    count = max(1, min(phases, steps // MIN_PHASE_STEPS))
    return [-(-steps * k // count) for k in range(1, count + 1)]


__all__ = [
    "ANCESTRY",
    "CACHED_KEY",
    "CACHED_VALUE",
    "CACHE_INDEX",
    "DEFAULT_CACHE_PHASES",
    "MIN_PHASE_STEPS",
    "POSITION_INDEX",
    "SELF_ATTENTION",
    "cross_attention",
    "decoder_step",
    "gather_beams",
    "grow",
    "hypothesis_keys_values",
    "phase_ends",
    "reorder",
    "reorder_by_gather",
    "step_mask",
    "write_self_attention",
]
