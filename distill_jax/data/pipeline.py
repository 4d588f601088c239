"""The training input pipeline: length buckets, token-budget batches, per-host split, resume.

An epoch's batches are planned from the record lengths alone (``plan_epoch``): the records are
shuffled with ``(seed, epoch)``, put into buckets of padded shape (multiples of
``bucket_step``), cut into batches whose size fits a token budget and is a multiple of
``batch_multiple``, and the batch order is shuffled. Every host computes the same plan and
reads its own slice of the rows of every global batch. grain reads and pads the batches in
background threads. The iterator's state is ``{"epoch", "position"}``: a restored iterator
produces exactly the batches the saved one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill_jax.data.cmlm import masked_capacity, masked_positions, random_target_mask
from distill_jax.data.vocab import BOS, EOS
from distill_jax.errors import UserError


@dataclass(frozen=True)
class PipelineConfig:
    """How batches are made."""

    seed: int = 0  # shuffling (and C-MLM mask) seed
    shuffle: bool = True  # shuffle records and batch order every epoch
    num_epochs: int | None = None  # None: repeat forever
    tokens_per_batch: int = 4096  # global budget: rows * max(padded src, padded tgt length)
    batch_multiple: int = 8  # global rows are a multiple of this (data-parallel shards)
    bucket_step: int = 8  # padded lengths are multiples of this
    max_src_len: int | None = None  # longer sources (</s> included) dropped or truncated
    max_tgt_len: int | None = None  # longer targets (</s> included) dropped or truncated
    truncate: bool = False  # truncate over-long pairs instead of dropping them
    max_padded_len: int | None = None  # padded lengths never exceed this (a position table)
    mlm_mask_rate: float | None = None  # add "mlm_mask" (C-MLM) drawn with this rate; None: no
    num_threads: int = 2  # grain reader threads
    prefetch: int = 8  # batches read ahead


@dataclass(frozen=True)
class Bucket:
    """One padded batch shape."""

    src_len: int  # padded source length
    tgt_len: int  # padded target length
    rows: int  # global batch rows


@dataclass(frozen=True)
class EpochPlan:
    """The global batches of one epoch: record indices (-1 = empty filler row) and buckets."""

    batches: tuple[np.ndarray, ...]  # each [rows] int64 record indices
    buckets: tuple[Bucket, ...]  # the shape of each batch


def _round_up(x: np.ndarray | int, step: int):
    return -(-x // step) * step


def _padded(lengths: np.ndarray | int, config: PipelineConfig):
    """Lengths rounded up to ``bucket_step``, capped at ``max_padded_len``."""
    padded = _round_up(lengths, config.bucket_step)
    return padded if config.max_padded_len is None else np.minimum(padded, config.max_padded_len)


def select_records(
    lengths: np.ndarray, config: PipelineConfig
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Applies the length limits.

    Returns:
      The kept record indices ``[n]``, their effective lengths ``[n, 2]`` (after truncation)
      and counts ``{"records", "kept", "dropped_too_long", "truncated"}``.
    """
    lengths = np.asarray(lengths, np.int64).reshape(-1, 2)
    unlimited = np.iinfo(np.int64).max
    cap = config.max_padded_len or unlimited  # a longer record would not fit any batch
    limit = np.array(
        [min(config.max_src_len or unlimited, cap), min(config.max_tgt_len or unlimited, cap)]
    )
    over = (lengths > limit).any(axis=1)  # [N]
    if config.truncate:
        keep = np.arange(len(lengths))
        effective = np.minimum(lengths, limit)
    else:
        keep = np.flatnonzero(~over)
        effective = lengths[keep]
    counts = {
        "records": int(len(lengths)),
        "kept": int(len(keep)),
        "dropped_too_long": 0 if config.truncate else int(over.sum()),
        "truncated": int(over.sum()) if config.truncate else 0,
    }
    return keep, effective, counts


def bucket_for(src_len: int, tgt_len: int, config: PipelineConfig) -> Bucket:
    """The padded shape of a pair of lengths and its token-budget batch size."""
    s, t = int(_padded(int(src_len), config)), int(_padded(int(tgt_len), config))
    rows = config.tokens_per_batch // max(s, t) // config.batch_multiple * config.batch_multiple
    return Bucket(s, t, max(rows, config.batch_multiple))


def _carry_target(key: tuple[int, int], keys: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The smallest later bucket key at least as long as ``key`` on both sides, if any."""
    bigger = [k for k in keys if k != key and k[0] >= key[0] and k[1] >= key[1]]
    return min(bigger, key=lambda k: (k[0] + k[1], k)) if bigger else None


def plan_epoch(
    records: np.ndarray, lengths: np.ndarray, config: PipelineConfig, epoch: int
) -> EpochPlan:
    """The batches of ``epoch``; depends only on the arguments (same on every host).

    Records are grouped by padded shape; each group is cut into full batches, and the
    remainder that does not fill a batch is carried to the smallest larger shape (padded
    to it), so only shapes with no larger shape end with a partly filled batch (filled with
    empty rows).

    Args:
      records: ``[n]`` record indices.
      lengths: ``[n, 2]`` their source / target lengths.
    """
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(records)) if config.shuffle else np.arange(len(records))
    padded = _padded(lengths[order], config)  # [n, 2]
    keys = [tuple(int(x) for x in k) for k in np.unique(padded, axis=0)]  # sorted
    members = {k: list(records[order[(padded == k).all(axis=1)]]) for k in keys}
    batches, buckets = [], []
    for key in sorted(keys, key=lambda k: (k[0] + k[1], k)):
        bucket = bucket_for(key[0], key[1], config)
        pending = members.pop(key)
        full = len(pending) // bucket.rows * bucket.rows
        for start in range(0, full, bucket.rows):
            batches.append(np.asarray(pending[start : start + bucket.rows], np.int64))
            buckets.append(bucket)
        rest = pending[full:]
        target = _carry_target(key, list(members))
        if target is not None:
            members[target] = rest + members[target]
        elif rest:
            batches.append(
                np.pad(np.asarray(rest, np.int64), (0, bucket.rows - len(rest)), constant_values=-1)
            )
            buckets.append(bucket)
    if config.shuffle:
        perm = rng.permutation(len(batches))
        batches, buckets = [batches[i] for i in perm], [buckets[i] for i in perm]
    return EpochPlan(tuple(batches), tuple(buckets))


def plan_statistics(plan: EpochPlan, lengths_of: dict[int, tuple[int, int]] | np.ndarray) -> dict:
    """Padding fraction (source + target slots) and distinct shapes of an epoch plan.

    Args:
      lengths_of: ``[N, 2]`` lengths indexed by record index.
    """
    real = padded = 0
    for rows, bucket in zip(plan.batches, plan.buckets):
        used = rows[rows >= 0]
        real += int(np.minimum(lengths_of[used], [bucket.src_len, bucket.tgt_len]).sum())
        padded += len(rows) * (bucket.src_len + bucket.tgt_len)
    shapes = sorted({(b.rows, b.src_len, b.tgt_len) for b in plan.buckets})
    return {
        "batches": len(plan.batches),
        "padding_fraction": 1 - real / max(padded, 1),
        "real_tokens": real,
        "padded_tokens": padded,
        "shapes": shapes,
    }


def pad_batch(examples: list[dict | None], bucket: Bucket, rows: int) -> dict[str, np.ndarray]:
    """Student batch arrays from stored examples (``None`` = empty filler row).

    Returns:
      ``src [rows, S]``, ``tgt_in [rows, T]``, ``tgt_out [rows, T]`` int32, 0-padded;
      sources and targets longer than the bucket are truncated (keeping the final ``</s>``).
    """
    src = np.zeros((rows, bucket.src_len), np.int32)
    tgt_in = np.zeros((rows, bucket.tgt_len), np.int32)
    tgt_out = np.zeros((rows, bucket.tgt_len), np.int32)
    for row, ex in enumerate(examples):
        if ex is None:
            continue
        s = ex["src"]
        if len(s) > bucket.src_len:
            s = np.append(s[: bucket.src_len - 1], EOS)
        t = ex["tgt"][: bucket.tgt_len - 1]
        src[row, : len(s)] = s
        tgt_in[row, 0] = BOS
        tgt_in[row, 1 : len(t) + 1] = t
        tgt_out[row, : len(t)] = t
        tgt_out[row, len(t)] = EOS
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


class BatchPipeline:
    """Batches of one split for this host; iterate with ``iter(...)`` (a ``BatchIterator``).

    Each batch is a dict of numpy arrays with this host's rows of a global batch: ``src``,
    ``tgt_in``, ``tgt_out`` (int32), ``index`` (``[rows]`` int32 record index, -1 for filler
    rows) and, with ``mlm_mask_rate``, ``mlm_mask`` (bool ``[rows, T]``) and
    ``mlm_positions`` (int32 ``[rows, masked_capacity(T, rate)]``: the masked positions of
    each row, -1 padded; ``data.cmlm.masked_positions``).
    """

    def __init__(
        self,
        source,
        lengths: np.ndarray,
        config: PipelineConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        import jax

        self.source = source  # random access: source[i] -> dict
        self.config = config
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if len(lengths) != len(source):
            raise UserError(f"{len(lengths)} lengths for {len(source)} records")
        if config.batch_multiple % self.process_count:
            raise UserError(
                f"batch_multiple {config.batch_multiple} is not a multiple of the "
                f"process count {self.process_count}"
            )
        if not 0 <= self.process_index < self.process_count:
            raise UserError(f"process_index {self.process_index} not in [0, {self.process_count})")
        self.lengths = np.asarray(lengths, np.int64).reshape(-1, 2)  # [N, 2]
        self.records, self.effective_lengths, self.counts = select_records(self.lengths, config)
        if not len(self.records):
            raise UserError(f"no records left after the length limits ({self.counts})")
        self._plan_cache: tuple[int, EpochPlan] | None = None
        self.batches_per_epoch = len(self.plan(0).batches)

    def plan(self, epoch: int) -> EpochPlan:
        """The (global) plan of ``epoch``; the latest one is cached."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (
                epoch,
                plan_epoch(self.records, self.effective_lengths, self.config, epoch),
            )
        return self._plan_cache[1]

    def statistics(self, epoch: int = 0) -> dict:
        """Padding fraction and distinct shapes of an epoch (global batches)."""
        effective = self.lengths.copy()
        effective[self.records] = self.effective_lengths
        return plan_statistics(self.plan(epoch), effective)

    def _mask_seed(self, epoch: int) -> int:
        """Seed of the C-MLM masks of an epoch (masks change between epochs)."""
        return int(np.random.SeedSequence([self.config.seed, epoch]).generate_state(1)[0])

    def load_batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's part of global batch ``step`` (counted from the first epoch's start)."""
        epoch, position = divmod(step, self.batches_per_epoch)
        plan = self.plan(epoch)
        rows, bucket = plan.batches[position], plan.buckets[position]
        per_host = len(rows) // self.process_count
        mine = rows[self.process_index * per_host : (self.process_index + 1) * per_host]
        valid = [int(i) for i in mine if i >= 0]
        read = iter(self.source.__getitems__(valid)) if valid else iter(())
        examples = [None if i < 0 else next(read) for i in mine]  # one bulk read
        batch = pad_batch(examples, bucket, per_host)
        batch["index"] = mine.astype(np.int32)
        if self.config.mlm_mask_rate is not None:
            seed = self._mask_seed(epoch)
            tgt_lens = (batch["tgt_out"] != 0).sum(axis=1)
            mask = np.zeros_like(batch["tgt_out"], dtype=bool)
            for row, (i, n) in enumerate(zip(mine, tgt_lens)):
                if i >= 0:
                    mask[row, :n] = random_target_mask(
                        int(n), seed, int(i), self.config.mlm_mask_rate
                    )
            batch["mlm_mask"] = mask
            batch["mlm_positions"] = masked_positions(
                mask, masked_capacity(bucket.tgt_len, self.config.mlm_mask_rate)
            )
        return batch

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)


class BatchIterator:
    """Iterator over a ``BatchPipeline`` with a small, JSON-able state."""

    def __init__(self, pipeline: BatchPipeline, step: int = 0):
        self._pipeline = pipeline
        self._start(step)

    def _start(self, step: int) -> None:
        import grain

        p = self._pipeline
        stop = (
            p.batches_per_epoch * p.config.num_epochs if p.config.num_epochs is not None else 2**62
        )
        self._step = step
        if step >= stop:
            self._iter = iter(())
            return
        dataset = grain.MapDataset.range(step, stop).map(p.load_batch)
        options = grain.ReadOptions(
            num_threads=p.config.num_threads, prefetch_buffer_size=p.config.prefetch
        )
        self._iter = iter(dataset.to_iter_dataset(options))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """``{"epoch", "position", "batches_per_epoch", "seed"}`` of the next batch."""
        p = self._pipeline
        epoch, position = divmod(self._step, p.batches_per_epoch)
        return {
            "epoch": epoch,
            "position": position,
            "batches_per_epoch": p.batches_per_epoch,
            "seed": p.config.seed,
        }

    def set_state(self, state: dict) -> None:
        """Continues from a state saved by ``get_state`` (same data and config)."""
        p = self._pipeline
        for key, ours in (("batches_per_epoch", p.batches_per_epoch), ("seed", p.config.seed)):
            if state.get(key) != ours:
                raise UserError(
                    f"cannot restore the data iterator: saved {key} {state.get(key)} "
                    f"differs from this pipeline's {ours} (different data or config)"
                )
        self._start(int(state["epoch"]) * p.batches_per_epoch + int(state["position"]))
