"""Shared helpers of the comparison benchmarks (``scripts/bench/bench_*.py``).

What every benchmark does with them:

* **Timing**: ``time_runs`` calls a function ``warmup`` times (compilation, caches,
  allocator), then ``runs`` (>= 5) more times, each timed with ``time.perf_counter``
  around the call and a ``block_until_ready`` of its result (JAX dispatches
  asynchronously; torch on CPU is synchronous), and reports the median. The
  comparisons use ``time_interleaved``: the same, with the two sides' runs alternating
  (A B, B A, ...) so that both see the same machine.
* **Peak**: ``matmul_peak_gflops`` is the machine's measured matmul peak, the best
  GFLOP/s of a jitted 2048 x 2048 float32 JAX matmul (2 * 2048^3 FLOPs) over 10
  timings, taken before the benchmarks and again after them (``remeasure_peak``; the
  larger is kept). Utilisation = achieved GFLOP/s / that peak, for both sides of a comparison.
  torch's matmul rate is measured as well and reported in the machine description,
  because the two libraries use different GEMM kernels (XLA's vs MKL/oneDNN).
* **FLOPs** are counted analytically on the padded shapes (what is computed, not only
  the real tokens): a dense layer on ``n`` rows is ``2 * n * d_in * d_out``; attention
  is ``4 * q_len * kv_len * width`` per sequence (``Q K^T`` and ``weights @ V``);
  element-wise work (LayerNorm, softmax, dropout, the optimizer) is not counted.
  ``encoder_layer_flops`` and ``decoder_layer_flops`` sum them for one Transformer layer.
* **Output**: a markdown table on stdout and, with ``--json PATH``, a JSON list of
  records, one per (configuration, system), each with the machine description.
* **Threads**: torch runs with ``torch.set_num_threads(os.cpu_count())``; JAX's CPU
  backend sizes its own thread pool to the machine.
* **Accelerators**: when JAX's default backend is a GPU, torch runs on CUDA too
  (``torch_device``), each torch run ends with ``torch.cuda.synchronize()`` inside the
  timed region (``torch_sync``), and the matmul peak is taken on 8192 x 8192 operands in
  the benchmark's ``--dtype`` (bfloat16 is what GPUs are benchmarked in: with float32,
  XLA's GPU matmuls default to TF32 while torch's do not, so the two sides would not
  compute alike).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

# scripts/: the record provenance the user-facing scripts share (scripts/provenance.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from provenance import cpu_model, git_commit  # noqa: E402

MIN_RUNS = 5
DTYPES = ("float32", "bfloat16")


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of the timed runs of one benchmarked function."""

    runs_s: list[float]  # every timed run, in order

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def min_s(self) -> float:
        return min(self.runs_s)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the runs were."""
        return (max(self.runs_s) - min(self.runs_s)) / self.median_s


def block(x: Any) -> Any:
    """Waits for every JAX array in ``x`` (other leaves, e.g. torch tensors, are ignored)."""
    import jax

    return jax.block_until_ready(x)


def time_runs(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    runs: int = MIN_RUNS,
    sync: Callable[[Any], Any] = block,
    label: str | None = None,
) -> Timing:
    """Times ``fn()`` ``runs`` times after ``warmup`` untimed calls; ``sync(result)``
    (default: ``jax.block_until_ready``) is inside the timed region. With ``label``, the
    runs are printed when done."""
    if runs < MIN_RUNS:
        raise ValueError(f"need at least {MIN_RUNS} timed runs for a median, got {runs}")
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    timing = Timing(times)
    if label:
        print(
            f"{label}: median {timing.median_s * 1e3:.1f} ms, runs "
            + " ".join(f"{t * 1e3:.0f}" for t in times)
            + " ms",
            flush=True,
        )
    return timing


def configure_host(args) -> dict:
    """Applies ``distill_jax.runtime.configure_host`` as ``--host-memory`` says, before JAX
    starts; returns what was applied (recorded in every record's machine description).
    The setting is process-wide, so it holds for both sides of a comparison."""
    from distill_jax import runtime

    os.environ[runtime.ENV_VAR] = args.host_memory
    applied = runtime.configure_host()
    _HOST_SETTINGS.update(applied)
    _HOST_SETTINGS["host_memory"] = args.host_memory
    return applied


_HOST_SETTINGS: dict[str, Any] = {}


def time_interleaved(
    fns: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]],
    *,
    warmup: int = 2,
    runs: int = MIN_RUNS,
    label: bool = True,
) -> dict[str, Timing]:
    """Times several functions, ``{name: (fn, sync)}``, in alternating rounds: each round
    calls every function once, in the given order on even rounds and the reverse order
    on odd ones (A B, B A, A B, ...). Each side of a comparison therefore runs under the
    same conditions: this machine's speed drifts by 10-20% over minutes (other tenants
    of the host), which timing one side's runs after the other's would put into the
    ratio. ``warmup`` untimed rounds come first."""
    if runs < MIN_RUNS:
        raise ValueError(f"need at least {MIN_RUNS} timed runs for a median, got {runs}")
    names = list(fns)
    for round_index in range(warmup):  # alternating too: both sides' memory use settles
        for name in names if round_index % 2 == 0 else names[::-1]:
            fn, sync = fns[name]
            sync(fn())
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        for name in names if round_index % 2 == 0 else names[::-1]:
            fn, sync = fns[name]
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
    timings = {name: Timing(t) for name, t in times.items()}
    if label:
        for name, timing in timings.items():
            print(
                f"{name}: median {timing.median_s * 1e3:.1f} ms, runs "
                + " ".join(f"{t * 1e3:.0f}" for t in timing.runs_s)
                + " ms",
                flush=True,
            )
    return timings


# --------------------------------------------------------------------------- peak


_PEAK_CACHE: dict[str, float] = {}


_PEAK_DTYPE = {"dtype": "float32"}  # set by machine_info(dtype=...); remeasure_peak uses it


def peak_size() -> int:
    """The matmul peak's operand size: 2048 on CPUs, 8192 on accelerators (to fill them)."""
    import jax

    return 2048 if jax.default_backend() == "cpu" else 8192


def matmul_peak_gflops(n: int | None = None, repeats: int = 10, dtype: str | None = None) -> float:
    """Best GFLOP/s of a jitted ``n x n`` JAX matmul (random operands of ``dtype``,
    default: the dtype given to ``machine_info``) over ``repeats`` timings."""
    n = n or peak_size()
    dtype = dtype or _PEAK_DTYPE["dtype"]
    key = f"jax{n}{dtype}"
    if key not in _PEAK_CACHE:
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
        matmul = jax.jit(jnp.matmul)
        jax.block_until_ready(matmul(a, b))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a, b))
            best = min(best, time.perf_counter() - start)
        _PEAK_CACHE[key] = 2 * n**3 / best / 1e9
    return _PEAK_CACHE[key]


def remeasure_peak(records: Sequence[dict]) -> float:
    """Measures the matmul peak again (after the benchmarks) and keeps the larger of the
    two measurements, updating every record's machine description and utilisation.

    A single measurement taken while something else used the CPU understates the peak;
    two measurements minutes apart make that less likely.
    """
    n, dtype = peak_size(), _PEAK_DTYPE["dtype"]
    key = f"jax{n}{dtype}"
    before = matmul_peak_gflops()
    _PEAK_CACHE.pop(key, None)
    peak = max(before, matmul_peak_gflops())
    _PEAK_CACHE[key] = peak
    for record in records:
        record["machine"]["matmul_peak_gflops"] = round(peak, 2)
        record["machine"]["matmul_peak_definition"] = (
            f"best of 2 x 10 jitted {n}x{n} {dtype} JAX matmuls, before and after the runs"
        )
        record["utilisation"] = record["gflop_per_s"] / peak
    return peak


def torch_matmul_dtype(dtype: str | None = None) -> str:
    """The dtype ``torch_matmul_gflops`` measures: the benchmark's on GPUs, float32 on CPUs."""
    return (dtype or _PEAK_DTYPE["dtype"]) if torch_device() == "cuda" else "float32"


def torch_matmul_gflops(n: int | None = None, repeats: int = 10, dtype: str | None = None) -> float:
    """Best GFLOP/s of an ``n x n`` torch matmul on ``torch_device()`` (for the machine
    description)."""
    import torch

    device = torch_device()
    n = n or peak_size()
    # torch's CPU bfloat16 matmul is unoptimised here (seconds per 1024^3 product): on
    # CPUs the description always measures float32.
    dtype = torch_matmul_dtype(dtype)
    key = f"torch{n}{dtype}"
    if key not in _PEAK_CACHE:
        a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
        b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
        torch_sync(torch.matmul(a, b))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch_sync(torch.matmul(a, b))
            best = min(best, time.perf_counter() - start)
        _PEAK_CACHE[key] = 2 * n**3 / best / 1e9
    return _PEAK_CACHE[key]


# --------------------------------------------------------------------------- machine


def torch_device() -> str:
    """ "cuda" when JAX runs on a GPU and torch sees one, else "cpu": both sides of a
    comparison run on the same kind of device."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_sync(x: Any) -> Any:
    """Waits for queued CUDA work (torch launches asynchronously on GPUs); returns ``x``."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return x


def set_torch_threads(threads: int | None = None) -> int:
    """``torch.set_num_threads(threads or os.cpu_count())``; returns the thread count."""
    import torch

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def warn_if_loaded(info: dict, threshold: float = 0.5) -> None:
    """Prints a warning when the 1-minute load average exceeds ``threshold`` x cores.

    On an oversubscribed CPU torch's OpenMP thread team waits at every operator's
    barrier for descheduled threads, so torch timings (many small ops: decoding) can be
    several times slower than on a quiet machine; JAX suffers less. Compare only
    numbers taken on a quiet machine.
    """
    load, cores = info.get("load_average_1m"), info.get("cpu_count") or 1
    if load is not None and load > threshold * cores:
        print(
            f"WARNING: load average {load:.1f} on {cores} cores: the machine is busy and "
            "the timings (torch's especially) are not representative"
        )


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def machine_info(*, with_torch: bool = True, dtype: str = "float32") -> dict:
    """CPU model, core counts, accelerator, library versions, thread settings and the
    matmul peak in ``dtype`` (also the dtype of later peak measurements)."""
    import jax

    _PEAK_DTYPE["dtype"] = dtype
    n = peak_size()
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "matmul_peak_dtype": dtype,
        "matmul_peak_gflops": round(matmul_peak_gflops(), 2),
        "matmul_peak_definition": f"best of 10 jitted {n}x{n} {dtype} JAX matmuls",
        "host_settings": dict(_HOST_SETTINGS),
        "commit": git_commit(),
    }
    if with_torch:
        import torch

        info.update(
            {
                "torch": torch.__version__,
                "transformers": _version("transformers"),
                "torch_threads": torch.get_num_threads(),
                "torch_device": torch_device(),
                "torch_matmul_gflops": round(torch_matmul_gflops(), 2),
                "torch_matmul_dtype": torch_matmul_dtype(),
            }
        )
    return info


def describe_machine(info: dict) -> str:
    """One line for the report header."""
    parts = [
        f"{info['cpu_model']}, {info['cpu_count']} cores",
        f"load {info['load_average_1m']:.2f}" if info.get("load_average_1m") is not None else "",
        f"jax {info['jax']} ({info['jax_backend']}"
        + (f": {info['device_kind']})" if info.get("jax_backend", "cpu") != "cpu" else ")"),
    ]
    if "torch" in info:
        parts.append(f"torch {info['torch']} ({info['torch_threads']} threads)")
    dtype = info.get("matmul_peak_dtype", "float32")
    parts.append(f"{dtype} matmul peak {info['matmul_peak_gflops']:.1f} GFLOP/s (JAX)")
    if "torch_matmul_gflops" in info:
        parts.append(
            f"torch {info.get('torch_matmul_dtype', 'float32')} matmul "
            f"{info['torch_matmul_gflops']:.1f} GFLOP/s"
        )
    host = info.get("host_settings") or {}
    if host:
        parts.append(f"host memory {host.get('host_memory')}")
    return ", ".join(p for p in parts if p)


def start_comparison(args) -> tuple[dict, int, str]:
    """How a comparison with torch starts (``add_common_args``' flags): applies
    ``--host-memory`` before JAX starts and torch's thread count (``--torch-threads``),
    describes the machine with its matmul peak in ``--dtype``, prints that description and
    torch's threads and device, and warns when the machine is busy. Returns (the machine
    description, torch's thread count, torch's device)."""
    configure_host(args)  # before JAX starts
    threads = set_torch_threads(args.torch_threads)
    machine = machine_info(dtype=args.dtype)
    device = torch_device()
    print(f"machine: {describe_machine(machine)}")
    print(
        f"torch.set_num_threads({threads}) (os.cpu_count() = {os.cpu_count()}); torch on "
        f"{device}; compute dtype {args.dtype}"
    )
    warn_if_loaded(machine)
    return machine, threads, device


# --------------------------------------------------------------------------- FLOPs


def dense_flops(rows: int, d_in: int, d_out: int) -> int:
    """A matmul of ``[rows, d_in] @ [d_in, d_out]``: ``2 * rows * d_in * d_out``."""
    return 2 * rows * d_in * d_out


def attention_flops(sequences: int, q_len: int, kv_len: int, width: int) -> int:
    """Scores ``Q K^T`` and context ``weights @ V`` over all heads (``width = heads *
    head_dim``): ``2 * 2 * sequences * q_len * kv_len * width``."""
    return 4 * sequences * q_len * kv_len * width


def encoder_layer_flops(sequences: int, length: int, d: int, ff: int) -> int:
    """One encoder (or BERT) layer on ``sequences`` x ``length`` positions of width ``d``:
    the q, k, v and output projections, self-attention and the feed-forward block
    (``d -> ff -> d``)."""
    tokens = sequences * length
    return (
        4 * dense_flops(tokens, d, d)
        + 2 * dense_flops(tokens, d, ff)
        + attention_flops(sequences, length, length, d)
    )


def decoder_layer_flops(
    sequences: int, q_len: int, kv_len: int, src_len: int, d: int, ff: int
) -> int:
    """One decoder layer on ``sequences`` x ``q_len`` positions of width ``d``: the
    self-attention's q, k, v and output projections, the cross-attention's q and output
    projections, the feed-forward block (``d -> ff -> d``), self-attention over ``kv_len``
    keys and cross-attention over ``src_len`` source positions. The cross-attention's keys
    and values (``2 * dense_flops(sequences * src_len, d, d)``) are not included: they are
    computed once per source, which a beam search does once, not at every step."""
    tokens = sequences * q_len
    return (
        4 * dense_flops(tokens, d, d)
        + 2 * dense_flops(tokens, d, d)
        + 2 * dense_flops(tokens, d, ff)
        + attention_flops(sequences, q_len, kv_len, d)
        + attention_flops(sequences, q_len, src_len, d)
    )


def jax_compiled_flops(compiled: Any) -> float | None:
    """XLA's own FLOP count of a compiled function (``cost_analysis()['flops']``), or None."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


# --------------------------------------------------------------------------- records


def make_record(
    *,
    benchmark: str,
    config: dict,
    system: str,
    timing: Timing,
    flops: float,
    items: float,
    item_unit: str,
    peak_gflops: float,
    machine: dict,
    extra: dict | None = None,
) -> dict:
    """One JSON record: a system's result on one configuration (ratio added later)."""
    gflop_per_s = flops / timing.median_s / 1e9
    record = {
        "benchmark": benchmark,
        "config": config,
        "system": system,
        "median_s": timing.median_s,
        "min_s": timing.min_s,
        "runs_s": timing.runs_s,
        "throughput": items / timing.median_s,
        "throughput_unit": f"{item_unit}/s",
        "gflop": flops / 1e9,
        "gflop_per_s": gflop_per_s,
        "utilisation": gflop_per_s / peak_gflops,
        "machine": machine,
    }
    if extra:
        record.update(extra)
    return record


def add_ratio(ours: dict, theirs: dict) -> float:
    """Stores throughput(ours) / throughput(theirs) on both records and returns it."""
    ratio = ours["throughput"] / theirs["throughput"]
    for record in (ours, theirs):
        record["ratio_ours_over_theirs"] = ratio
    return ratio


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def record_rows(records: Sequence[dict], config_text: Callable[[dict], str]) -> list[list]:
    """Table rows (config, system, median ms, throughput, GFLOP/s, utilisation, ratio)."""
    return [
        [
            config_text(r["config"]),
            r["system"],
            r["median_s"] * 1e3,
            f"{r['throughput']:.4g} {r['throughput_unit']}",
            r["gflop_per_s"],
            f"{100 * r['utilisation']:.1f}%",
            f"{r.get('ratio_ours_over_theirs', float('nan')):.2f}x",
        ]
        for r in records
    ]


TABLE_HEADER = (
    "config",
    "system",
    "median ms",
    "throughput",
    "GFLOP/s",
    "util. of peak",
    "ours/theirs",
)


# --------------------------------------------------------------------------- students


def add_student_args(parser) -> None:
    """--d-model, --mlp-dim, --heads and --layers: the student's dimensions (default: the
    reference student's), read by ``transformer_config`` with the benchmark's --vocab."""
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--mlp-dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each")


def transformer_config(args, **fields: Any) -> Any:
    """A student ``TransformerConfig`` of the dimensions the student benchmarks take
    (``--vocab`` and ``add_student_args``' ``--d-model``, ``--heads``, ``--mlp-dim``, and
    ``--layers`` encoder and decoder layers each), with ``fields`` (``max_len``, ``dtype``,
    ...) set as well."""
    from distill_jax.models.transformer import TransformerConfig

    return TransformerConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        num_heads=args.heads,
        mlp_dim=args.mlp_dim,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        **fields,
    )


def init_transformer(cfg: Any) -> tuple[Any, Any]:
    """``Transformer(cfg)`` and its parameters initialised from PRNGKey(0), unboxed (for
    decoding): (model, params)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from distill_jax.models.transformer import Transformer

    model = Transformer(cfg)
    x = jnp.ones((1, 4), jnp.int32)
    return model, nn.unbox(model.init(jax.random.PRNGKey(0), x, x)["params"])


def one_device_mesh() -> Any:
    """A (1, 1, 1) mesh on the first device: a train step without any sharding."""
    import jax

    from distill_jax import sharding

    return sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices=jax.devices()[:1])


def init_student(cfg: Any, mesh: Any) -> tuple[Any, Any, Any, Any]:
    """(model, optimizer, sharded TrainState, its shardings) of a student ``cfg`` on
    ``mesh``: Adam as in training (``optim.OptimizerConfig.student()``), parameters
    initialised from PRNGKey(0)."""
    import jax
    import jax.numpy as jnp

    from distill_jax import optim, sharding, train
    from distill_jax.models.transformer import Transformer

    model = Transformer(cfg)
    tx = optim.make_optimizer(optim.OptimizerConfig.student())

    def init():
        params = model.init(
            jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
        )["params"]
        return train.TrainState.create(params, tx)

    state, state_shardings = sharding.create_sharded_state(init, mesh)
    return model, tx, state, state_shardings


def time_train_steps(
    step: Callable, state: Any, batch: Any, rng: Any, steps: int
) -> tuple[list[float], Any]:
    """Seconds of each of ``steps`` calls ``state, metrics = step(state, batch, rng)``, each
    timed until its metrics are ready, after one untimed warm-up call: (the times, the
    last state). Unlike ``time_runs``, any number of steps (a median of fewer than
    ``MIN_RUNS`` is the caller's choice)."""
    import jax

    state, metrics = step(state, batch, rng)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times, state


# --------------------------------------------------------------------------- profiles


def perfetto_events(trace_dir: str) -> list[dict]:
    """The events of the newest ``perfetto_trace.json.gz`` that ``jax.profiler.trace(...,
    create_perfetto_trace=True)`` wrote under ``trace_dir``."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"no perfetto trace (perfetto_trace.json.gz) under {trace_dir}")
    with gzip.open(sorted(paths)[-1], "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def hlo_op_names(hlo_text: str, strip: str = "") -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata (from a compiled module's text),
    with ``layer_3`` folded to ``layer_N``, and the ``jit(...)/`` prefix and ``strip``
    (a module name such as ``"BertModel/"``) removed from the front."""
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
        if m:
            op = re.sub(r"layer_\d+", "layer_N", m.group(2))
            op = re.sub(r"^jit\([^)]*\)/", "", op)
            names[m.group(1)] = op[len(strip) :] if strip and op.startswith(strip) else op
    return names


def thunk_table(trace_dir: str, names: dict[str, str], calls: int) -> list[tuple[str, str, float]]:
    """(fusion kind, op_name, ms per call) of the XLA thunks in a CPU profiler trace,
    largest first: every traced event named after an HLO instruction of ``names``
    (``hlo_op_names``) is summed by (kind, op_name) and divided by ``calls``."""
    totals: collections.Counter = collections.Counter()
    for event in perfetto_events(trace_dir):
        if event.get("ph") == "X" and event.get("name") in names:
            kind = re.sub(r"\.\d+$", "", event["name"])
            totals[(kind, names[event["name"]])] += event.get("dur", 0)
    return [(kind, op, us / calls / 1e3) for (kind, op), us in totals.most_common()]


def traced_thunks(
    compiled: Any, call: Callable[[], Any], calls: int, strip: str = ""
) -> list[tuple[str, str, float]]:
    """``thunk_table`` of ``calls`` calls of ``call()`` (which runs ``compiled``, a compiled
    JAX function; each call is waited for), traced by ``jax.profiler`` into a temporary
    folder; op names are ``hlo_op_names(compiled.as_text(), strip)``."""
    import jax

    names = hlo_op_names(compiled.as_text(), strip)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(call())
        return thunk_table(trace_dir, names, calls)


def thunk_markdown(
    rows: Sequence[tuple[str, str, float]], op_text: Callable[[str], str] = str
) -> str:
    """A markdown table (ms, XLA op, op_name) of ``thunk_table`` rows; ``op_text`` shortens
    the op names."""
    return markdown_table(
        ["ms", "XLA op", "op_name"], [[f"{ms:.1f}", kind, op_text(op)] for kind, op, ms in rows]
    )


def finish(
    records: list[dict],
    json_path: str | None,
    config_text: Callable[[dict], str] | None = None,
    table: Callable[[], str] | None = None,
) -> None:
    """The end of a comparison: measures the matmul peak again (``remeasure_peak``, which
    updates every record's utilisation) and prints it, prints the records' markdown table
    (``table()``, or by default ``TABLE_HEADER`` and ``record_rows`` with ``config_text``)
    and writes the records to ``json_path`` (``--json``; none: no file)."""
    peak = remeasure_peak(records)
    print(f"matmul peak (best before/after): {peak:.1f} GFLOP/s")
    print()
    print(table() if table else markdown_table(TABLE_HEADER, record_rows(records, config_text)))
    write_json(json_path, records)


def write_json(path: str | None, records: Sequence[dict]) -> None:
    """Writes the records as a JSON list (no-op when ``path`` is None)."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(list(records), f, indent=2)
        f.write("\n")
    print(f"wrote {len(records)} records to {path}")


def parse_compiler_options(items: Sequence[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}`` for ``compile(compiler_options=...)``
    (an empty VALUE is allowed: it clears a list-valued XLA option)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"compiler option {item!r}: expected KEY=VALUE")
        options[key] = value
    return options


def describe_options(options: dict[str, str]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


def add_common_args(parser, *, warmup: int = 2) -> None:
    """--runs, --warmup, --json, --torch-threads, --dtype."""
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads value (default: os.cpu_count())",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=MIN_RUNS,
        help=f"timed runs per system (median reported; >= {MIN_RUNS})",
    )
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs before timing")
    parser.add_argument("--json", default=None, metavar="PATH", help="write JSON records here")
    parser.add_argument(
        "--host-memory",
        choices=("keep", "system"),
        default="keep",
        help="distill_jax.runtime.configure_host's allocator setting for the "
        "process (both sides run in it): keep freed memory for reuse "
        "(default, what distill-jax does) or glibc's defaults",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="compute dtype of both sides and of the matmul peak (parameters "
        "stay float32 where the side keeps a float32 master copy)",
    )
