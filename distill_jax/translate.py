"""Translating with a student: sources grouped into length-bucketed batches, each decoded
by one jitted beam search / greedy search / sampling over the mesh's data axis, from
token ids or text, all at once (``translate_ids``, ``translate_texts``) or as lines arrive
(``translate_stream``). The student comes as a ``TrainedModel`` (model, parameters,
vocabulary, mesh).

Every sentence is decoded in a batch of the shape its length gives it
(``batch_shape``: its source length rounded up to ``bucket_step``, and the rows that width
gets from ``tokens_per_batch``), whichever other sentences share the batch, and sampling
draws each sentence from a key of its own (the seed folded with its index). So a
sentence's output depends only on itself, its index and the settings: streamed micro-
batches give the outputs of one batch run, and reuse its compiled shapes."""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from distill_jax import runner
from distill_jax.errors import UserError
from distill_jax.experiment import DecodeConfig

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from distill_jax.data.vocab import Vocabulary
    from distill_jax.models.transformer import Transformer

MAX_ROWS = 128  # sentences per decoding batch (before beams)
STREAM_WAIT = 0.1  # seconds translate_stream waits for another line before decoding


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained student as the functions here take it (``student.load_trained`` gives the
    first three, ``api.Student`` holds all four)."""

    model: Transformer
    params: Any  # the model's "params" collection
    vocab: Vocabulary | None  # text <-> ids; None where only ids are translated
    mesh: Mesh  # its data axes split each decoding batch


class Hypothesis(NamedTuple):
    """One output of a search for one source."""

    ids: np.ndarray  # output ids, without </s> and padding
    score: float  # beam: summed log-probs / GNMT length penalty; else summed log-probs


class Translation(NamedTuple):
    """One output text for one source, with its ``Hypothesis.score``."""

    text: str
    score: float


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def batch_shape(
    length: int, config: DecodeConfig, shards: int, max_len: int | None = None
) -> tuple[int, int]:
    """(rows, width) of the batch a source of ``length`` ids is decoded in: the width is
    ``length`` rounded up to ``config.bucket_step`` (at most ``max_len``), the rows fill
    ``config.tokens_per_batch`` at that width (at most ``MAX_ROWS``), a multiple of
    ``shards``."""
    width = _round_up(length, config.bucket_step)
    if max_len is not None:
        width = min(width, max_len)
    rows = max(shards, min(MAX_ROWS, config.tokens_per_batch // max(width, 1)))
    return _round_up(rows, shards), width


def _batch(
    members: Sequence[tuple[int, np.ndarray]], rows: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices [rows] (-1 = filler), src [rows, width]) of (index, source) pairs."""
    src = np.zeros((rows, width), np.int32)
    index = np.full(rows, -1, np.int64)
    for row, (i, source) in enumerate(members):
        src[row, : len(source)] = source
        index[row] = i
    return index, src


def decode_batches(
    sources: Sequence[np.ndarray], config: DecodeConfig, shards: int, max_len: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Groups sources (id arrays ending in </s>) into padded batches of equal width.

    Returns a list of (row indices into ``sources`` ([rows], -1 = filler), src [rows, S]).
    Each source goes to a batch of its ``batch_shape`` (rows a multiple of ``shards``, S a
    multiple of ``config.bucket_step`` or ``max_len``, which no source may exceed), so
    only a few shapes get compiled; sources of one width are batched in length order.
    """
    if max_len is not None:
        longest = max((len(s) for s in sources), default=0)
        if longest > max_len:
            raise ValueError(f"a source of {longest} ids is longer than max_len {max_len}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i in np.argsort([len(s) for s in sources], kind="stable"):
        groups.setdefault(batch_shape(len(sources[i]), config, shards, max_len), []).append(int(i))
    batches = []
    for (rows, width), members in groups.items():
        for start in range(0, len(members), rows):
            chosen = members[start : start + rows]
            batches.append(_batch([(i, sources[i]) for i in chosen], rows, width))
    return batches


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (batch-sharded) global array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def search(
    model,
    params,
    src: jax.Array,
    config: DecodeConfig,
    rng: jax.Array | None = None,
    *,
    nbest: int = 1,
    top_p: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``nbest`` best outputs of one batch by ``config.method``: (ids [rows, nbest,
    steps], scores [rows, nbest]), best first. Beam search scores a hypothesis by its
    summed log-probs over the GNMT length penalty (slots it could not fill: -inf); greedy
    search and sampling (``nbest`` 1) by the summed log-probs. ``rng``: sampling keys, one
    for the batch or one per row; ``top_p``: sampling's nucleus."""
    from distill_jax import decode

    max_len = (config.max_len_a, config.max_len_b)
    phases = config.cache_phases
    if config.method == "beam":
        sequences, scores = decode.beam_search(
            model,
            params,
            src,
            beam_size=config.beam_size,
            length_penalty=config.length_penalty,
            max_len=max_len,
            cache_phases=phases,
        )
        return to_host(sequences)[:, :nbest], to_host(scores)[:, :nbest]
    if config.method == "greedy":
        sequences, scores = decode.greedy_search(
            model, params, src, max_len=max_len, cache_phases=phases
        )
    elif config.method == "sample":
        sequences, scores = decode.sample(
            model,
            params,
            src,
            rng,
            sampling=decode.Sampling(config.temperature, config.top_k, top_p),
            max_len=max_len,
            cache_phases=phases,
        )
    else:
        raise UserError(f"decode.method must be beam, greedy or sample, got {config.method!r}")
    return to_host(sequences)[:, None], to_host(scores)[:, None]


def check_options(config: DecodeConfig, nbest: int | None, top_p: float) -> None:
    """Raises ValueError unless ``nbest`` (None or 1..beam_size, more than 1 only with beam
    search) and ``top_p`` (in (0, 1], below 1 only with sampling) suit ``config``."""
    if nbest is not None:
        if nbest < 1:
            raise ValueError(f"nbest must be >= 1, got {nbest}")
        if nbest > 1 and config.method != "beam":
            raise ValueError(
                f"nbest {nbest} needs beam search (decode.method 'beam', not "
                f"{config.method!r}): it gives one hypothesis per source"
            )
        if config.method == "beam" and nbest > config.beam_size:
            raise ValueError(
                f"nbest {nbest} is larger than the beam (decode.beam_size {config.beam_size})"
            )
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p < 1.0 and config.method != "sample":
        raise ValueError(
            f"top_p {top_p} applies to sampling (decode.method 'sample', not {config.method!r})"
        )


def _row_keys(seed: int, index: np.ndarray) -> np.ndarray:
    """Sampling keys [rows, 2] (raw uint32): the seed folded with each row's source index
    (fillers: 0)."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(
        jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
            base, np.maximum(index, 0).astype(np.uint32)
        )
    )


def _decode_batch(
    trained: TrainedModel,
    index: np.ndarray,
    src: np.ndarray,
    config: DecodeConfig,
    seed: int,
    nbest: int,
    top_p: float,
) -> list[list[Hypothesis]]:
    """The hypotheses (best first, at most ``nbest``) of the rows of one batch."""
    mesh = trained.mesh
    keys = _global_from_full(_row_keys(seed, index), mesh) if config.method == "sample" else None
    ids, scores = search(
        trained.model,
        trained.params,
        _global_from_full(src, mesh),
        config,
        keys,
        nbest=nbest,
        top_p=top_p,
    )
    cfg = trained.model.config
    out = []
    for row in range(len(index)):
        hyps = []
        for seq, score in zip(ids[row], scores[row]):
            if score == -np.inf:
                continue
            stop = np.flatnonzero((seq == cfg.eos_id) | (seq == cfg.pad_id))
            hyps.append(Hypothesis(seq[: stop[0]] if len(stop) else seq, float(score)))
        out.append(hyps)
    return out


def translate_ids(
    trained: TrainedModel,
    sources: Sequence[np.ndarray],
    config: DecodeConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    nbest: int | None = None,
    top_p: float = 1.0,
) -> list[np.ndarray] | list[list[Hypothesis]]:
    """Output ids (without </s> and padding) for every source, in input order; with
    ``nbest``, the list of the (up to) ``nbest`` best ``Hypothesis`` of every source
    instead, best first (``check_options`` says which settings take it). ``top_p`` < 1:
    nucleus sampling (``config.method`` 'sample'). ``seed``: sampling's seed (source i
    samples from the key ``fold_in(PRNGKey(seed), i)``). ``trained.vocab`` is not read.

    Sources longer than the model's ``max_len`` (its position table) are cut to their first
    ``max_len - 1`` ids and ``</s>``; a note on stderr says how many."""
    check_options(config, nbest, top_p)
    shards = runner.data_shards(trained.mesh)
    cfg = trained.model.config
    outputs: list = [None] * len(sources)
    sources = truncate_sources(sources, cfg.max_len, cfg.eos_id)
    batches = decode_batches(sources, config, shards, max_len=cfg.max_len)
    bar = runner.progress(len(sources), 0, "generate", disable=not progress)
    for index, src in batches:
        hyps = _decode_batch(trained, index, src, config, seed, nbest or 1, top_p)
        for row, i in enumerate(index):
            if i >= 0:
                outputs[i] = hyps[row] if nbest else hyps[row][0].ids
        bar.update(int((index >= 0).sum()))
    bar.close()
    return outputs


def truncate_sources(sources: Sequence[np.ndarray], max_len: int, eos_id: int) -> list[np.ndarray]:
    """Sources cut to ``max_len`` ids (the last one ``eos_id``); notes on stderr how many."""
    cut = [
        np.append(np.asarray(s)[: max_len - 1], eos_id).astype(np.int32) if len(s) > max_len else s
        for s in sources
    ]
    longer = sum(len(s) > max_len for s in sources)
    if longer and runner.is_chief():
        print(
            f"note: {longer} of {len(sources)} sources are longer than the model's max_len "
            f"{max_len} and were truncated",
            file=sys.stderr,
            flush=True,
        )
    return cut


def _global_from_full(src: np.ndarray, mesh) -> jax.Array:
    """A batch-sharded global array from a batch that every process holds whole (each
    process reads all sources, so no exchange is needed)."""
    from distill_jax import sharding

    return jax.make_array_from_callback(
        src.shape, sharding.batch_sharding(mesh), lambda index: src[index]
    )


def _texts(vocab, hyps: list[Hypothesis], nbest: int | None) -> str | list[Translation]:
    """A source's output text, or with ``nbest`` its ``Translation`` list."""
    if nbest is None:
        return vocab.decode(hyps[0].ids.tolist())
    return [Translation(vocab.decode(h.ids.tolist()), h.score) for h in hyps]


def translate_texts(
    trained: TrainedModel,
    texts: Sequence[str],
    config: DecodeConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    nbest: int | None = None,
    top_p: float = 1.0,
) -> list[str] | list[list[Translation]]:
    """Detokenized outputs for raw source sentences (``trained.vocab``'s ``encode`` and
    ``decode``); with ``nbest``, the list of the (up to) ``nbest`` best ``Translation``
    (text, score) of every sentence, best first. ``seed``, ``nbest``, ``top_p``: see
    ``translate_ids``."""
    from distill_jax.data.vocab import EOS

    vocab = trained.vocab
    sources = [np.asarray(vocab.encode(text) + [EOS], np.int32) for text in texts]
    outputs = translate_ids(
        trained,
        sources,
        config,
        seed=seed,
        progress=progress,
        nbest=nbest or 1,
        top_p=top_p,
    )
    return [_texts(vocab, hyps, nbest) for hyps in outputs]


def translate_stream(
    trained: TrainedModel,
    lines: Iterable[str],
    config: DecodeConfig,
    *,
    seed: int = 0,
    nbest: int | None = None,
    top_p: float = 1.0,
    wait: float = STREAM_WAIT,
) -> Iterator[list]:
    """Translates ``lines`` as they arrive (e.g. ``sys.stdin``, read on a thread of its own),
    in length-bucketed micro-batches, with the outputs of ``translate_texts``.

    A line joins the pending lines of its ``batch_shape``; a shape's batch is decoded when it
    is full, every pending one when no new line arrived for ``wait`` seconds or the input
    ended. After each decoding this yields the outputs that are complete in input order
    (strings, or with ``nbest`` ``Translation`` lists): a caller that writes and flushes
    them serves as a filter in a pipe. One process only (the others could not know when a
    process's batch is due)."""
    from distill_jax.data.vocab import EOS

    check_options(config, nbest, top_p)
    if jax.process_count() > 1:
        raise UserError(
            "streaming translation runs in one process; give the processes a "
            "file to translate instead"
        )
    if not wait > 0:
        raise ValueError(f"wait must be > 0 seconds, got {wait}")
    arrived: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for line in lines:
                arrived.put(("line", line))
            arrived.put(("end", None))
        except BaseException as err:  # handed to the consumer, which raises it
            arrived.put(("error", err))

    threading.Thread(target=read, name="translate_stream-reader", daemon=True).start()
    shards, cfg, vocab = runner.data_shards(trained.mesh), trained.model.config, trained.vocab
    pending: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    done: dict[int, list[Hypothesis]] = {}
    count = written = 0
    ended = False

    def run(shape: tuple[int, int]) -> None:
        members = pending.pop(shape)
        index, src = _batch(members, *shape)
        for row, hyps in enumerate(
            _decode_batch(trained, index, src, config, seed, nbest or 1, top_p)
        ):
            if index[row] >= 0:
                done[int(index[row])] = hyps

    while not ended or pending:
        try:
            kind, item = arrived.get(timeout=wait) if pending else arrived.get()
        except queue.Empty:
            for shape in list(pending):
                run(shape)
        else:
            if kind == "error":
                raise item
            if kind == "end":
                ended = True
                for shape in list(pending):
                    run(shape)
            else:
                source = np.asarray(vocab.encode(item.rstrip("\r\n")) + [EOS], np.int32)
                if len(source) > cfg.max_len:
                    print(
                        f"note: line {count + 1} is longer than the model's max_len "
                        f"{cfg.max_len} and was truncated",
                        file=sys.stderr,
                        flush=True,
                    )
                    source = np.append(source[: cfg.max_len - 1], cfg.eos_id).astype(np.int32)
                shape = batch_shape(len(source), config, shards, cfg.max_len)
                pending.setdefault(shape, []).append((count, source))
                count += 1
                if len(pending[shape]) == shape[0]:
                    run(shape)
        ready = []
        while written in done:
            ready.append(_texts(vocab, done.pop(written), nbest))
            written += 1
        if ready:
            yield ready
