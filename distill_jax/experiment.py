"""The experiment config: everything ``train-teacher``, ``soft-targets``, ``train-student``
and ``generate`` read. Config files in ``configs/`` return an ``ExperimentConfig`` from
``get_config()``; any field can be overridden with ``--set section.field=value``.

A work directory holds one experiment::

    WORKDIR/teacher/                  C-MLM fine-tuning: checkpoints/, metrics.jsonl,
                                      config.json (the teacher and runtime sections), .lock
    WORKDIR/soft_targets/SPLIT/       the teacher's top-K cache (see soft_target_cache)
    WORKDIR/soft_targets/.SPLIT.lock  the lock of the cache's writer
    WORKDIR/students/NAME/            one student run: checkpoints/, metrics.jsonl, *.txt,
                                      config.json, .lock

A run's ``config.json`` is the config of its first run that saved a step; a later run
with another config is refused, naming the changed fields. ``.lock`` files keep one
writer per run directory (``runlock``). Every numeric field has a valid range
(``RANGES``), checked by ``ExperimentConfig.check`` before any work.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from typing import Any

from distill_jax import runtime
from distill_jax.models import fast_paths
from distill_jax.models.layers import ATTENTION_IMPLS
from distill_jax.models.transformer import TransformerConfig
from distill_jax.sharding import MeshConfig

KD_KINDS = ("none", "offline", "online")
TEACHER_INITS = ("pretrained", "random")
SELECT_METRICS = ("bleu", "rouge1", "rouge2", "rougeL")
STUDENT_SCHEDULES = ("inverse_sqrt", "noam", "constant")  # optim.SCHEDULES a student can use
FINAL_CHECKPOINTS = ("best", "last")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which prepared dataset to read and how to batch it."""

    prepared: str = ""  # directory written by `distill-jax prepare` ("" = WORKDIR/data)
    train_split: str = "train"  # split to train on
    train_examples: int = 0  # train on the first N pairs of train_split only (0 = all)
    valid_split: str = "val"  # split for validation and checkpoint selection
    test_splits: tuple[str, ...] = ("test2016",)  # splits scored at the end
    tokens_per_batch: int = 4096  # global token budget of a training batch
    bucket_step: int = 8  # padded lengths are multiples of this
    max_src_len: int = 128  # longer training sources (</s> included) are dropped
    max_tgt_len: int = 128  # longer training targets (</s> included) are dropped
    seed: int = 0  # shuffling and C-MLM masking seed

    def example_limit(self, split: str) -> int:
        """How many of a split's first pairs a run reads (0 = all): ``train_examples`` for
        the training split, every pair of the others."""
        return self.train_examples if split == self.train_split else 0


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """C-MLM fine-tuning of BERT (docs/method.md §1) and soft-target extraction (§2)."""

    checkpoint: str = "sentence-transformers/all-MiniLM-L6-v2"  # HF folder or hub name
    init: str = "pretrained"  # "pretrained" weights, or "random" (ablation: same shapes)
    steps: int = 2000  # fine-tuning updates
    learning_rate: float = 5e-5  # AdamW peak learning rate
    warmup_fraction: float = 0.05  # linear warm-up share of the steps, then linear decay
    weight_decay: float = 0.01  # AdamW decay (not on biases / LayerNorm)
    grad_clip_norm: float = 1.0  # global gradient-norm clip
    dropout: float = 0.1  # hidden and attention dropout
    tokens_per_batch: int = 4096  # global token budget of a batch (source + target)
    mask_rate: float = 0.15  # probability of masking each target position
    eval_every: int = 500  # validate (masked-token loss / accuracy) every N steps
    save_every: int = 500  # checkpoint every N steps
    top_k: int = 8  # soft targets kept per position (K)
    stride: int = 7  # soft-target extraction masks positions i, i+S, ... in copy i
    # validation examples (the first N; 0 = all) on which every validation also measures
    # the soft targets' quality with stride masking (teacher_quality.py: top-1, top-K)
    quality_examples: int = 512
    # attention kernel of the fine-tuned teacher's forward passes (soft targets, online
    # distillation): "einsum", "xla", or "cudnn" (fused, NVIDIA GPUs with bfloat16; 1.2x
    # faster on an H100, BENCHMARKS.md). Fine-tuning always uses "einsum".
    inference_attention: str = "einsum"

    def __post_init__(self):
        if self.init not in TEACHER_INITS:
            raise ValueError(f"teacher.init must be one of {TEACHER_INITS}, got {self.init!r}")
        if self.inference_attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"teacher.inference_attention must be one of {ATTENTION_IMPLS}, "
                f"got {self.inference_attention!r}"
            )
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"teacher.mask_rate must be in (0, 1), got {self.mask_rate}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How the student uses the teacher (docs/method.md §3)."""

    kd: str = "offline"  # "none" (baseline), "offline" (soft-target cache), "online" (in-step)
    alpha: float = 0.5  # weight of the distillation term
    temperature: float = 10.0  # teacher temperature
    kd_mode: str = "paper"  # losses.KD_MODES: "paper", "kl", "soft_ce_t"
    top_k: int = 8  # teacher entries used per position (<= teacher.top_k for offline)

    def __post_init__(self):
        if self.kd not in KD_KINDS:
            raise ValueError(f"distill.kd must be one of {KD_KINDS}, got {self.kd!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distill.alpha must be in [0, 1], got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Student optimisation, validation and checkpointing."""

    steps: int = 20000  # updates (with patience: at most)
    # stop once this many validations in a row have not improved the validation
    # select_metric ("trained until val stops improving"); 0 = train all steps. A run may
    # be resumed with more steps or patience: the student's schedules do not depend on them
    patience: int = 0
    # learning-rate schedule (optim): "inverse_sqrt" (fairseq), "noam" (OpenNMT-py, the
    # paper's reference) or "constant"
    schedule: str = "inverse_sqrt"
    # Adam peak learning rate; with "noam" the factor (OpenNMT's -learning_rate), the peak
    # being factor * (student.d_model * warmup_steps)^-0.5
    learning_rate: float = 5e-4
    warmup_steps: int = 4000  # warm-up updates
    grad_clip_norm: float | None = None  # global gradient-norm clip (None = off)
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy term
    adam_eps: float = 1e-8  # Adam denominator epsilon (the OpenNMT-py reference: 1e-9)
    accum_steps: int = 1  # gradient-accumulation micro-batches per update
    compute_dtype: str = "float32"  # "float32" or "bfloat16" (params stay float32)
    seed: int = 0  # parameter init and dropout seed
    eval_every: int = 1000  # validation loss / accuracy / BLEU every N steps
    save_every: int = 1000  # checkpoint every N steps
    keep_last: int = 3  # checkpoints kept besides the best one
    average_last: int = 0  # average the last N checkpoints at the end (0 = off)
    bleu_sentences: int = 0  # validation sentences decoded for BLEU (0 = the whole split)
    select_metric: str = "bleu"  # validation score that picks the best checkpoint (max)
    # parameters scored at the end (unless average_last > 1): "best" by select_metric on
    # the validation split, or "last", the final step (what the reference reports)
    final_checkpoint: str = "best"

    def __post_init__(self):
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(
                f"train.select_metric must be one of {SELECT_METRICS}, got {self.select_metric!r}"
            )
        if self.schedule not in STUDENT_SCHEDULES:
            raise ValueError(
                f"train.schedule must be one of {STUDENT_SCHEDULES}, got {self.schedule!r}"
            )
        if self.final_checkpoint not in FINAL_CHECKPOINTS:
            raise ValueError(
                f"train.final_checkpoint must be one of {FINAL_CHECKPOINTS}, "
                f"got {self.final_checkpoint!r}"
            )


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Generation settings (docs/method.md §4)."""

    method: str = "beam"  # "beam", "greedy" or "sample"
    beam_size: int = 5  # beams
    length_penalty: float = 0.6  # GNMT length-penalty alpha
    max_len_a: float = 1.5  # max output length = a * source length + b ...
    max_len_b: int = 10  # ... capped by the model's max_len
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # sample from the k most likely tokens (0 = all)
    tokens_per_batch: int = 4096  # source-token budget of a decoding batch
    bucket_step: int = 8  # padded source lengths of decoding batches are multiples of this
    cache_phases: int = 4  # decode in up to N phases over growing key/value caches (1: one loop)

    def __post_init__(self):
        if self.cache_phases < 1:
            raise ValueError(f"decode.cache_phases must be >= 1, got {self.cache_phases}")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the programs run: settings that change which program XLA executes, not the
    method (the forms they choose between agree to float32 rounding). Saved with every run
    and compared on resume like the other sections; a run saved before this section
    existed resumes with its defaults. The environment variables named below only set the
    defaults (read when the config is made), so the values a run used are the ones in its
    ``config.json``."""

    # the models' CPU-friendly forms (models/fast_paths.py); default: env
    # DISTILL_JAX_FAST_PATHS (1 on, the default; 0 every operation in its plain form)
    fast_paths: bool = dataclasses.field(default_factory=fast_paths.default_enabled)
    # attention masks as an additive bias in inference calls (fast_paths.apply_mask; only
    # with fast_paths on); false: the select form
    mask_by_bias: bool = True
    # host memory on CPUs (runtime.py): "keep" freed memory for reuse with synchronous CPU
    # dispatch, or "system" (glibc's defaults); default: env DISTILL_JAX_HOST_MEMORY, else keep
    host_memory: str = dataclasses.field(default_factory=runtime.default_host_memory)
    # XLA option of the train step on CPUs: copy insertion with region analysis, so that
    # the donated state is updated in place (train.donated_state_compiler_options); no
    # effect on other platforms
    cpu_copy_region_analysis: bool = True

    def __post_init__(self):
        if self.host_memory not in runtime.HOST_MEMORY_MODES:
            raise ValueError(
                f"runtime.host_memory must be one of {runtime.HOST_MEMORY_MODES}, "
                f"got {self.host_memory!r}"
            )


def default_student() -> TransformerConfig:
    """The reference student; ``vocab_size`` is replaced by the dataset vocabulary's size."""
    return TransformerConfig(vocab_size=8)


def opennmt_student(dropout: float = 0.3) -> TransformerConfig:
    """The paper's reference student, an OpenNMT-py Transformer: 6+6 layers, d 512, ff 2048,
    8 heads, pre-LayerNorm with final LayerNorms (eps 1e-6), ``dropout`` on residuals,
    attention weights and feed-forward activations, Glorot-initialised kernels (ours always
    are) and embedding."""
    return dataclasses.replace(
        default_student(),
        d_model=512,
        num_heads=8,
        mlp_dim=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout_rate=dropout,
        attention_dropout_rate=dropout,
        activation_dropout_rate=dropout,
        pre_layer_norm=True,
        layer_norm_eps=1e-6,
        embedding_init="glorot",
    )


def small_student(
    d_model: int = 256, mlp_dim: int = 1024, layers: int = 3, max_len: int = 128
) -> TransformerConfig:
    """A small student for CPU budgets: ``layers`` encoder and ``layers`` decoder layers of
    width ``d_model``, 4 heads, feed-forward ``mlp_dim``, dropout 0.1 on residuals and a
    position table of ``max_len``; the rest is :func:`default_student`'s. The defaults are
    the 3+3-layer, d 256 student of configs/multi30k_cpu.py (and of the configs built on
    it); configs/tiny.py asks for a 2+2-layer, d 32 one."""
    return dataclasses.replace(
        default_student(),
        d_model=d_model,
        num_heads=4,
        mlp_dim=mlp_dim,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        dropout_rate=0.1,
        max_len=max_len,
    )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: data, teacher, student, distillation, optimisation, decoding, mesh
    and runtime settings."""

    name: str = "experiment"  # a label for logs and result tables
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: TransformerConfig = dataclasses.field(default_factory=default_student)
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()
    mesh: MeshConfig = MeshConfig()
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    # "field.path=value" overrides applied when distill.kd == "none" (the baseline), before
    # the command line's: the reference trains its baseline with another schedule than its
    # distilled student (see with_overrides)
    baseline_overrides: tuple[str, ...] = ()

    def check(self) -> None:
        """Checks every numeric field against its range (``RANGES``) and the fields that
        depend on each other (run once all overrides are applied, so that fields can be
        raised together in any order); raises ValueError naming the field."""
        check_ranges(self)
        if self.distill.kd == "offline" and self.distill.top_k > self.teacher.top_k:
            raise ValueError(
                f"distill.top_k {self.distill.top_k} is larger than teacher.top_k "
                f"{self.teacher.top_k} (the entries the soft-target cache keeps per position)"
            )
        if self.train.schedule in ("inverse_sqrt", "noam") and self.train.warmup_steps < 1:
            raise ValueError(
                f"train.warmup_steps must be ≥ 1 with train.schedule "
                f"{self.train.schedule!r}, got {self.train.warmup_steps}"
            )
        for side in ("src", "tgt"):
            limit = getattr(self.data, f"max_{side}_len")
            if limit > self.student.max_len:
                raise ValueError(
                    f"data.max_{side}_len {limit} is longer than student.max_len "
                    f"{self.student.max_len} (the size of the student's position table)"
                )


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field: a finite number above ``low`` (or at
    it, unless ``low_open``) and below ``high`` (or at it, unless ``high_open``); ``None``
    when ``optional``, and the values in ``also``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    also: tuple = ()

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if value in self.also:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = (
                f"in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            text = f"{'>' if self.low_open else '≥'} {_number(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '≤'} {_number(self.high)}"
        else:
            text = "a finite number"
        extra = [repr(v) for v in self.also] + (["None"] if self.optional else [])
        return text + "".join(f" or {v}" for v in extra)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)  # [0, 1]
DROPOUT = Range(0, 1, high_open=True)  # [0, 1)

# The valid range of every numeric field of an ExperimentConfig, by dotted name (checked by
# ExperimentConfig.check before any work; tests/test_config_ranges.py checks that every
# numeric field has an entry).
RANGES: dict[str, Range] = {
    # data
    "data.train_examples": AT_LEAST_0,
    "data.tokens_per_batch": AT_LEAST_1,
    "data.bucket_step": AT_LEAST_1,
    "data.max_src_len": Range(2),
    "data.max_tgt_len": Range(2),
    "data.seed": AT_LEAST_0,
    # teacher
    "teacher.steps": AT_LEAST_1,
    "teacher.learning_rate": POSITIVE,
    "teacher.warmup_fraction": Range(0, 1, high_open=True),
    "teacher.weight_decay": AT_LEAST_0,
    "teacher.grad_clip_norm": POSITIVE,
    "teacher.dropout": DROPOUT,
    "teacher.tokens_per_batch": AT_LEAST_1,
    "teacher.mask_rate": Range(0, 1, True, True),
    "teacher.eval_every": AT_LEAST_1,
    "teacher.save_every": AT_LEAST_1,
    "teacher.top_k": AT_LEAST_1,
    "teacher.stride": AT_LEAST_1,
    "teacher.quality_examples": AT_LEAST_0,
    # student
    "student.vocab_size": Range(4),
    "student.d_model": AT_LEAST_1,
    "student.num_heads": AT_LEAST_1,
    "student.mlp_dim": AT_LEAST_1,
    "student.num_encoder_layers": AT_LEAST_1,
    "student.num_decoder_layers": AT_LEAST_1,
    "student.dropout_rate": DROPOUT,
    "student.attention_dropout_rate": DROPOUT,
    "student.activation_dropout_rate": DROPOUT,
    "student.max_len": Range(2),
    "student.layer_norm_eps": POSITIVE,
    "student.pad_id": AT_LEAST_0,
    "student.bos_id": AT_LEAST_0,
    "student.eos_id": AT_LEAST_0,
    # distill
    "distill.alpha": PROBABILITY,
    "distill.temperature": POSITIVE,
    "distill.top_k": AT_LEAST_1,
    # train
    "train.steps": AT_LEAST_1,
    "train.patience": AT_LEAST_0,
    "train.learning_rate": POSITIVE,
    "train.warmup_steps": AT_LEAST_0,
    "train.grad_clip_norm": Range(0, low_open=True, optional=True),
    "train.label_smoothing": DROPOUT,
    "train.adam_eps": POSITIVE,
    "train.accum_steps": AT_LEAST_1,
    "train.seed": AT_LEAST_0,
    "train.eval_every": AT_LEAST_1,
    "train.save_every": AT_LEAST_1,
    "train.keep_last": AT_LEAST_1,
    "train.average_last": AT_LEAST_0,
    "train.bleu_sentences": AT_LEAST_0,
    # decode
    "decode.beam_size": AT_LEAST_1,
    "decode.length_penalty": AT_LEAST_0,
    "decode.max_len_a": AT_LEAST_0,
    "decode.max_len_b": AT_LEAST_0,
    "decode.temperature": POSITIVE,
    "decode.top_k": AT_LEAST_0,
    "decode.tokens_per_batch": AT_LEAST_1,
    "decode.bucket_step": AT_LEAST_1,
    "decode.cache_phases": AT_LEAST_1,
    # mesh: a positive size, or -1 for the remaining devices
    "mesh.data": Range(1, also=(-1,)),
    "mesh.fsdp": Range(1, also=(-1,)),
    "mesh.tensor": Range(1, also=(-1,)),
}


def numeric_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> value of every int / float (or Optional number) field of a nested
    dataclass config (bools, strings and tuples are not numeric)."""
    out = {}
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        name = prefix + field.name
        if dataclasses.is_dataclass(value):
            out.update(numeric_fields(value, name + "."))
            continue
        kinds = set(typing.get_args(hints[field.name])) or {hints[field.name]}
        if kinds & {int, float} and bool not in kinds:
            out[name] = value
    return out


def check_ranges(config: ExperimentConfig) -> None:
    """Raises ValueError naming the first numeric field outside its ``RANGES`` entry
    (e.g. ``train.steps must be ≥ 1, got -5``)."""
    for name, value in numeric_fields(config).items():
        allowed = RANGES.get(name)
        if allowed is not None and not allowed.contains(value):
            raise ValueError(f"{name} must be {allowed.describe()}, got {value!r}")


def with_overrides(config: ExperimentConfig, assignments: Sequence[str]) -> ExperimentConfig:
    """``config`` with the command line's ``--set`` assignments; for a baseline
    (``distill.kd == "none"`` once they are applied) its ``baseline_overrides`` come first,
    so that an explicit ``--set`` still wins. Raises UserError on a bad assignment."""
    from distill_jax import configlib

    assignments = list(assignments)
    updated = configlib.override(config, assignments)
    if updated.distill.kd == "none" and updated.baseline_overrides:
        updated = configlib.override(config, list(updated.baseline_overrides) + assignments)
    return updated
