"""Soft-target cache input throughput: how fast the student's input side attaches the
teacher's top-K soft targets to its batches, against how fast the student step consumes
them.

Measured, in target tokens per second (non-pad ``tgt_out`` positions of the batches):

  memmap   the previous cache layout (``logits.f16`` / ``indices.i32`` / ``offsets.i64``,
           memory-mapped, one slice per example), written by this script in a temporary
           folder and read the way the previous ``attach_soft_targets`` read it;
  local    the tensorstore cache (``distill_jax.soft_target_cache``) on local disk, read
           through ``student.SoftTargetBatches`` (two batches ahead), in its two modes:
           ``memory`` (the cache fits ``preload_bytes``: read whole when opened, the time
           to open is reported apart) and ``range`` (``preload_bytes=0``: one batched read
           per batch and array, byte ranges of the inner chunks; each pass opens the cache
           afresh, so every read goes to storage);
  gcs      the same cache and modes on the Cloud Storage emulator (``gcp-storage-emulator``,
           in this process, on 127.0.0.1: a single-threaded Python server sharing this
           process's interpreter, far slower per request than Cloud Storage);
  step     the student train step (``train.make_train_step``) of ``configs/multi30k_cpu.py``'s
           student on a batch of its ``data.tokens_per_batch``, with K soft targets.

The data are synthetic: ``--examples`` targets with lengths drawn like Multi30k's English
side (5-40 pieces), batches planned by ``data.pipeline.plan_epoch`` with the config's
token budget and bucket step, shuffled as in training. Each reader pass reads ``--batches``
batches; ``--runs`` passes each, the median is reported. The caches are read cold the
first pass (local: from the page cache after the write).

Run: ``python scripts/bench/bench_cache.py [--json results/bench_cache.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "scripts", "bench"))
from benchlib import cpu_model, git_commit, init_student, one_device_mesh  # noqa: E402


def synthetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    """[n] target lengths (``tgt_out``, EOS included), 5..40, mean ~15."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.gamma(6.0, 2.5, n)), 5, 40).astype(np.int64)


def soft_targets_of(length: int, k: int, example: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(example)
    logits = -np.sort(-rng.normal(size=(length, k)) * 3.0, axis=-1).astype(np.float32)
    return logits, rng.integers(4, 8000, (length, k)).astype(np.int32)


class MemmapCache:
    """The previous on-disk layout, memory-mapped; one read per example."""

    def __init__(self, folder: str, lengths: np.ndarray, k: int):
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rows = int(offsets[-1])
        logits = np.memmap(os.path.join(folder, "logits.f16"), np.float16, "w+", shape=(rows, k))
        indices = np.memmap(os.path.join(folder, "indices.i32"), np.int32, "w+", shape=(rows, k))
        for i, length in enumerate(lengths):
            values, ids = soft_targets_of(int(length), k, i)
            logits[offsets[i] : offsets[i + 1]] = values
            indices[offsets[i] : offsets[i + 1]] = ids
        logits.flush()
        indices.flush()
        offsets.tofile(os.path.join(folder, "offsets.i64"))
        self.offsets = np.fromfile(os.path.join(folder, "offsets.i64"), np.int64)
        self.logits = np.memmap(
            os.path.join(folder, "logits.f16"), np.float16, "r", shape=(rows, k)
        )
        self.indices = np.memmap(
            os.path.join(folder, "indices.i32"), np.int32, "r", shape=(rows, k)
        )

    def __getitem__(self, i: int):
        start, end = self.offsets[i], self.offsets[i + 1]
        return (np.asarray(self.logits[start:end], np.float32), np.asarray(self.indices[start:end]))


def attach_memmap(batch: dict, cache: MemmapCache, k: int) -> dict:
    """The previous ``attach_soft_targets``: one memory-mapped slice per example."""
    rows, tgt_len = batch["tgt_out"].shape
    logits = np.zeros((rows, tgt_len, k), np.float32)
    indices = np.zeros((rows, tgt_len, k), np.int32)
    for row, record in enumerate(batch["index"]):
        if record < 0:
            continue
        values, ids = cache[int(record)]
        logits[row, : len(values)] = values[:, :k]
        indices[row, : len(values)] = ids[:, :k]
    return {**batch, "kd_logits": logits, "kd_indices": indices}


def write_new_cache(path: str, lengths: np.ndarray, k: int) -> None:
    from distill_jax.soft_target_cache import CacheIdentity, create_or_resume

    identity = CacheIdentity("bench", "bench", "bench", "train", k, 7)
    writer = create_or_resume(path, identity, lengths)
    for chunk in writer.pending_chunks():
        writer.write_chunk(
            chunk, {e: soft_targets_of(int(lengths[e]), k, e) for e in writer.examples_of(chunk)}
        )
    writer.finalize()


def plan_batches(
    lengths: np.ndarray, tokens_per_batch: int, bucket_step: int, count: int
) -> list[dict]:
    """``count`` student-like batches (``index``, ``tgt_out``) from a shuffled epoch plan."""
    from distill_jax.data.pipeline import PipelineConfig, plan_epoch

    config = PipelineConfig(
        shuffle=True, tokens_per_batch=tokens_per_batch, batch_multiple=1, bucket_step=bucket_step
    )
    both = np.stack([lengths, lengths], axis=1)
    plan = plan_epoch(np.arange(len(lengths)), both, config, epoch=0)
    out = []
    for rows, bucket in zip(plan.batches[:count], plan.buckets[:count]):
        tgt_out = np.zeros((len(rows), bucket.tgt_len), np.int32)
        for r, record in enumerate(rows):
            if record >= 0:
                tgt_out[r, : lengths[record]] = 5
        out.append({"index": rows.astype(np.int32), "tgt_out": tgt_out})
    return out


def time_reader(make_iterator, batches: list[dict], runs: int) -> list[float]:
    """Target tokens per second of ``runs`` passes over ``batches`` (``make_iterator()``
    is called before each pass's clock starts)."""
    tokens = sum(int(np.count_nonzero(b["tgt_out"])) for b in batches)
    rates = []
    for _ in range(runs):
        iterator = make_iterator()
        start = time.perf_counter()
        for out in iterator:
            assert out["kd_logits"].shape[-1] > 0
        rates.append(tokens / (time.perf_counter() - start))
    return rates


def time_cache(path: str, batches: list[dict], k: int, runs: int, results: dict, name: str) -> None:
    """Both reading modes of the cache at ``path`` into ``results[name + "-memory"]`` and
    ``results[name + "-range"]``; the time to open (and preload) into ``open_s``."""
    from distill_jax.soft_target_cache import open_cache
    from distill_jax.student import SoftTargetBatches

    opens = []

    def preloaded():
        start = time.perf_counter()
        cache = open_cache(path)
        opens.append(time.perf_counter() - start)
        assert cache.in_memory is not None
        return SoftTargetBatches(ListBatches(batches), cache, k)

    results[f"{name}-memory"] = time_reader(preloaded, batches, runs)
    results["open_s"][f"{name}-memory"] = opens
    results[f"{name}-range"] = time_reader(
        lambda: SoftTargetBatches(ListBatches(batches), open_cache(path, preload_bytes=0), k),
        batches,
        runs,
    )


class ListBatches:
    """A list of batches with the iterator state API the reader wraps."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __next__(self):
        if self.position >= len(self.batches):
            raise StopIteration
        self.position += 1
        return self.batches[self.position - 1]

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def student_step_rate(config_path: str, vocab: int, k: int, runs: int) -> dict:
    """Target tokens per second of the config's student train step on one batch of its
    ``data.tokens_per_batch`` (rows x 16 positions, the most common bucket)."""
    import dataclasses

    import jax

    from distill_jax import configlib, sharding, train

    config = configlib.load_config_file(config_path)
    length = config.data.bucket_step
    rows = config.data.tokens_per_batch // length
    rng = np.random.default_rng(0)
    tgt_lengths = np.clip(synthetic_lengths(rows, seed=1), 2, length)
    src = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    tgt_out = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    for r, n in enumerate(tgt_lengths):
        tgt_out[r, n - 1], tgt_out[r, n:] = 2, 0
        src[r, n - 1], src[r, n:] = 2, 0
    tgt_in = np.concatenate([np.ones((rows, 1), np.int32), tgt_out[:, :-1]], axis=1)
    tgt_in[tgt_out == 0] = 0
    kd_logits = -np.sort(-rng.normal(size=(rows, length, k)), axis=-1).astype(np.float32)
    kd_indices = rng.integers(4, vocab, (rows, length, k)).astype(np.int32)
    batch_np = {
        "src": src,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "kd_logits": kd_logits,
        "kd_indices": kd_indices,
    }

    settings = train.StudentLossConfig(
        alpha=0.5, label_smoothing=0.1, kd_mode="paper", temperature=10.0
    )
    mesh = one_device_mesh()
    model, optimizer, state, shardings = init_student(
        dataclasses.replace(config.student, vocab_size=vocab), mesh
    )
    batch = sharding.shard_batch(batch_np, mesh)
    step = train.make_train_step(
        train.student_loss_fn(model, settings),
        optimizer,
        mesh,
        shardings,
        sharding.batch_shardings(batch_np, mesh),
    )
    key = jax.random.PRNGKey(1)
    for _ in range(2):
        state, metrics = step(state, batch, key)
    jax.block_until_ready(state)
    tokens = int(np.count_nonzero(tgt_out))
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(5):
            state, metrics = step(state, batch, key)
        jax.block_until_ready(state)
        rates.append(5 * tokens / (time.perf_counter() - start))
    return {
        "rows": rows,
        "positions": length,
        "target_tokens": tokens,
        "runs": rates,
        "median": statistics.median(rates),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--top-k", type=int, default=8, help="K stored and read")
    parser.add_argument("--batches", type=int, default=60, help="batches per reader pass")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--config",
        default=os.path.join(REPO, "configs", "multi30k_cpu.py"),
        help="whose student step and batch budget to compare with",
    )
    parser.add_argument("--vocab", type=int, default=8000, help="student vocabulary size")
    parser.add_argument("--no-emulator", action="store_true", help="skip the gcs reader")
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from distill_jax import configlib

    config = configlib.load_config_file(args.config)
    k = args.top_k
    lengths = synthetic_lengths(args.examples)
    batches = plan_batches(
        lengths, config.data.tokens_per_batch, config.data.bucket_step, args.batches
    )
    results: dict = {"open_s": {}}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        os.makedirs(os.path.join(tmp, "memmap"))
        old = MemmapCache(os.path.join(tmp, "memmap"), lengths, k)
        results["memmap"] = time_reader(
            lambda: (attach_memmap(b, old, k) for b in batches), batches, args.runs
        )
        write_new_cache(os.path.join(tmp, "tensorstore"), lengths, k)
        time_cache(os.path.join(tmp, "tensorstore"), batches, k, args.runs, results, "local")
    if not args.no_emulator:
        import gcs_emulator

        with gcs_emulator.running() as gcs:
            path = gcs.gs("bench", "cache")
            write_new_cache(path, lengths, k)
            time_cache(path, batches, k, args.runs, results, "gcs")
    step = student_step_rate(args.config, args.vocab, k, args.runs)
    open_s = results.pop("open_s")

    record = {
        "benchmark": "soft_target_cache_input",
        "git_commit": git_commit(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "config": {
            "examples": args.examples,
            "top_k": k,
            "batches": len(batches),
            "runs": args.runs,
            "student_config": os.path.relpath(args.config, REPO),
            "tokens_per_batch": config.data.tokens_per_batch,
            "bucket_step": config.data.bucket_step,
            "vocab": args.vocab,
            "target_tokens_per_pass": int(sum(np.count_nonzero(b["tgt_out"]) for b in batches)),
        },
        "readers_target_tokens_per_s": {
            name: {"runs": rates, "median": statistics.median(rates)}
            for name, rates in results.items()
        },
        "open_and_preload_s": {
            name: {"runs": v, "median": statistics.median(v)} for name, v in open_s.items()
        },
        "student_step_target_tokens_per_s": step,
    }
    record["ratio_to_student_step"] = {
        name: value["median"] / step["median"]
        for name, value in record["readers_target_tokens_per_s"].items()
    }
    print(f"machine: {record['machine']['cpu']} ({record['machine']['cores']} cores)")
    print(
        f"student step ({record['config']['student_config']}, {step['rows']} x "
        f"{step['positions']}): {step['median']:,.0f} target tokens/s (median of "
        f"{args.runs})"
    )
    for name, value in record["open_and_preload_s"].items():
        print(f"{name}: open + preload {value['median']:.3f} s (median)")
    for name, value in record["readers_target_tokens_per_s"].items():
        print(
            f"{name:13s} {value['median']:>14,.0f} target tokens/s  "
            f"{record['ratio_to_student_step'][name]:7.1f}x the step  runs "
            + ", ".join(f"{r:,.0f}" for r in value["runs"])
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
