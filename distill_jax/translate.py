"""Translating with a student: sources grouped into length-bucketed batches, each decoded
by one jitted beam search / greedy search / sampling over the mesh's data axis, from
token ids or text."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import jax
import numpy as np

from distill_jax import runner
from distill_jax.errors import UserError
from distill_jax.experiment import DecodeConfig

MAX_ROWS = 128  # sentences per decoding batch (before beams)


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def decode_batches(sources: Sequence[np.ndarray], config: DecodeConfig, shards: int,
                   max_len: Optional[int] = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Groups sources (id arrays ending in </s>) into padded batches of similar length.

    Returns a list of (row indices into ``sources`` ([rows], -1 = filler), src [rows, S]).
    Rows are a multiple of ``shards`` and S a multiple of ``config.bucket_step`` (or
    ``max_len``, which no source may exceed), so only a few shapes get compiled.
    """
    bucket_step = config.bucket_step
    if max_len is not None:
        longest = max((len(s) for s in sources), default=0)
        if longest > max_len:
            raise ValueError(f"a source of {longest} ids is longer than max_len {max_len}")
        bucket = lambda n: min(_round_up(n, bucket_step), max_len)  # noqa: E731
    else:
        bucket = lambda n: _round_up(n, bucket_step)  # noqa: E731
    order = np.argsort([len(s) for s in sources], kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = bucket(len(sources[order[min(start + MAX_ROWS, len(order)) - 1]]))
        rows = max(shards, min(MAX_ROWS, config.tokens_per_batch // max(longest, 1)))
        rows = _round_up(rows, shards)
        chosen = order[start:start + rows]
        src_len = bucket(max(len(sources[i]) for i in chosen))
        src = np.zeros((rows, src_len), np.int32)
        index = np.full(rows, -1, np.int64)
        for row, i in enumerate(chosen):
            src[row, :len(sources[i])] = sources[i]
            index[row] = i
        batches.append((index, src))
        start += len(chosen)
    return batches


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (batch-sharded) global array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def search(model, params, src: jax.Array, config: DecodeConfig,
           rng: Optional[jax.Array] = None) -> np.ndarray:
    """Best output ids [rows, steps] of one batch, by ``config.method``."""
    from distill_jax import decode

    max_len = (config.max_len_a, config.max_len_b)
    phases = config.cache_phases
    if config.method == "beam":
        sequences, _ = decode.beam_search(model, params, src, beam_size=config.beam_size,
                                          length_penalty=config.length_penalty, max_len=max_len,
                                          cache_phases=phases)
        return to_host(sequences)[:, 0]
    if config.method == "greedy":
        sequences, _ = decode.greedy_search(model, params, src, max_len=max_len,
                                            cache_phases=phases)
        return to_host(sequences)
    if config.method == "sample":
        sequences, _ = decode.sample(model, params, src, rng, temperature=config.temperature,
                                     top_k=config.top_k, max_len=max_len, cache_phases=phases)
        return to_host(sequences)
    raise UserError(f"decode.method must be beam, greedy or sample, got {config.method!r}")


def translate_ids(model, params, sources: Sequence[np.ndarray], config: DecodeConfig, mesh,
                  *, seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """Output ids (without </s> and padding) for every source, in input order.

    Sources longer than the model's ``max_len`` (its position table) are cut to their first
    ``max_len - 1`` ids and ``</s>``; a note on stderr says how many."""
    shards = runner.data_shards(mesh)
    outputs: list[Optional[np.ndarray]] = [None] * len(sources)
    sources = truncate_sources(sources, model.config.max_len, model.config.eos_id)
    batches = decode_batches(sources, config, shards, max_len=model.config.max_len)
    bar = runner.progress(len(sources), 0, "generate", disable=not progress)
    for number, (index, src) in enumerate(batches):
        ids = search(model, params, _global_from_full(src, mesh), config,
                     jax.random.fold_in(jax.random.PRNGKey(seed), number))
        for row, i in enumerate(index):
            if i >= 0:
                seq = ids[row]
                stop = np.flatnonzero((seq == model.config.eos_id) | (seq == model.config.pad_id))
                outputs[i] = seq[:stop[0]] if len(stop) else seq
        bar.update(int((index >= 0).sum()))
    bar.close()
    return outputs


def truncate_sources(sources: Sequence[np.ndarray], max_len: int, eos_id: int
                     ) -> list[np.ndarray]:
    """Sources cut to ``max_len`` ids (the last one ``eos_id``); notes on stderr how many."""
    cut = [np.append(np.asarray(s)[:max_len - 1], eos_id).astype(np.int32)
           if len(s) > max_len else s for s in sources]
    longer = sum(len(s) > max_len for s in sources)
    if longer and runner.is_chief():
        print(f"note: {longer} of {len(sources)} sources are longer than the model's max_len "
              f"{max_len} and were truncated", file=sys.stderr, flush=True)
    return cut


def _global_from_full(src: np.ndarray, mesh) -> jax.Array:
    """A batch-sharded global array from a batch that every process holds whole (each
    process reads all sources, so no exchange is needed)."""
    from distill_jax import sharding
    return jax.make_array_from_callback(src.shape, sharding.batch_sharding(mesh),
                                        lambda index: src[index])


def translate_texts(model, params, vocab, texts: Sequence[str], config: DecodeConfig, mesh,
                    *, seed: int = 0, progress: bool = False) -> list[str]:
    """Detokenized outputs for raw source sentences."""
    from distill_jax.data.vocab import EOS

    sources = [np.asarray(vocab.encode(text) + [EOS], np.int32) for text in texts]
    outputs = translate_ids(model, params, sources, config, mesh, seed=seed, progress=progress)
    return [vocab.decode(ids.tolist()) for ids in outputs]
