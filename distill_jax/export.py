"""Exporting a trained student to Hugging Face transformers and CTranslate2.

Formats (``--format``; docs/export.md says why each choice is exact):

* ``marian`` (post-LN students; ``auto``'s choice for them): ``MarianMTModel``. Post-LN,
  biased projections, ReLU, LayerNorm eps 1e-5, sqrt(d)-scaled embeddings shared by
  source, target and output, a zero ``final_logits_bias``. Marian stores its position
  tables with the weights and reads row i for token i, as the student does: the export
  writes the student's own table (sinusoid or learned) there.
* ``m2m100`` (pre-LN students with final LayerNorms, OpenNMT's layout; ``auto``'s choice
  for them): ``M2M100ForConditionalGeneration``. M2M100 computes fairseq sinusoids (the
  student's formula) on the fly and reads row ``pad_token_id + 1 + i`` for token i; the
  export sets ``pad_token_id`` to -1 in ``config.json`` so that token i reads row i (the
  tokenizer and ``generation_config.json`` keep the real pad id 0). Learned position
  tables have nowhere to go and are refused.
* ``fsmt`` (post-LN): ``FSMTForConditionalGeneration``, whose position tables are part of
  its saved state, so the export survives ``save_pretrained`` (Marian's are left out of
  saved files and rebuilt with Marian's own sinusoid frequencies).
* ``ctranslate2``: a CTranslate2 model folder written from the student's parameters with
  CTranslate2's own model specification (``ctranslate2.specs.TransformerSpec``) and
  converter: pre- or post-LN, any LayerNorm epsilon (CTranslate2 stores it), the student's
  position table, the decoder started from ``<s>``'s embedding. ``--ctranslate2`` writes
  the same into ``ctranslate2/`` beside a transformers export.

Refused by name (``check_exportable``): what the chosen format cannot express: a
transformers format for a LayerNorm epsilon other than torch's 1e-5 (all three classes fix
it), pre-LN as marian/fsmt, post-LN as m2m100, learned positions as m2m100.

Target safety: an export folder carries a marker file (``.distill_jax_export.json``) that
lists what the export wrote. ``--overwrite`` replaces only such a folder, holding nothing
else, and never the work directory or a folder inside or above it (``check_target``). The
new export is written into a temporary folder beside ``--out`` and swapped in at the end
(one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it), so a failed export leaves the
old one, or nothing, never a half-written folder.

Tokenizer: the student's own (``Vocabulary.wordpiece_tokenizer``) with a post-processor
appending ``</s>``, so it gives ``distill-jax generate``'s ids for any text. Decoding
settings go to ``generation_config.json`` as far as ``generate`` expresses them
(docs/export.md: the length bound and the length penalty).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill_jax.data.vocab import BOS, EOS, PAD, UNK, Vocabulary
from distill_jax.errors import UserError
from distill_jax.experiment import DecodeConfig
from distill_jax.models import layers
from distill_jax.models.transformer import TransformerConfig

TORCH_LAYER_NORM_EPS = 1e-5  # the LayerNorms of FSMT, Marian and M2M100 use torch's default
WEIGHTS_NAME = "model.safetensors"
MARKER = ".distill_jax_export.json"  # written by every export; --overwrite needs it
CT2_FOLDER = "ctranslate2"  # --ctranslate2 writes the CTranslate2 model here
FORMATS = ("auto", "marian", "m2m100", "fsmt", "ctranslate2")
TRANSFORMERS_FORMATS = ("marian", "m2m100", "fsmt")
ARCHITECTURES = {
    "marian": "MarianMTModel",
    "m2m100": "M2M100ForConditionalGeneration",
    "fsmt": "FSMTForConditionalGeneration",
}


@dataclasses.dataclass(frozen=True)
class ExportedStudent:
    """A trained student as an export writes it."""

    params: Any  # its parameter tree (boxed or sharded arrays are fine)
    config: TransformerConfig  # its architecture (``model.config``)
    vocab: Vocabulary  # its pieces, for the tokenizer and CTranslate2's vocabulary
    decode: DecodeConfig  # the run's decoding settings, for generation_config.json
    langs: Sequence[str] = ("src", "tgt")  # source and target language (FSMT, model card)


@dataclasses.dataclass(frozen=True)
class CardInfo:
    """What the model card says besides the student: the run's name, the checkpoint the
    parameters came from, the dataset and the license."""

    name: str  # the run's name (WORKDIR/students/NAME)
    checkpoint: str  # ``--checkpoint``: best, latest, averaged or a step
    dataset_meta: Mapping | None = None  # the prepared dataset's dataset.json
    license: str = "unknown"  # the card metadata's license


# ----------------------------------------------------------------------------- checks


def resolve_format(config: TransformerConfig, fmt: str) -> str:
    """``auto`` -> ``m2m100`` for pre-LN students, ``marian`` for post-LN ones."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return "m2m100" if config.pre_layer_norm else "marian"
    return fmt


def check_exportable(config: TransformerConfig, fmt: str = "auto") -> str:
    """The concrete format for ``fmt``; raises UserError naming every student setting that
    format cannot express."""
    fmt = resolve_format(config, fmt)
    problems = []
    if fmt in ("marian", "fsmt") and config.pre_layer_norm:
        problems.append(
            f"student.pre_layer_norm=True ({ARCHITECTURES[fmt]} is post-LN: a "
            "LayerNorm after each block and no final LayerNorm; use --format "
            "m2m100 or ctranslate2)"
        )
    if fmt == "m2m100" and not config.pre_layer_norm:
        problems.append(
            "student.pre_layer_norm=False (M2M100 is pre-LN with final "
            "LayerNorms; use --format marian, fsmt or ctranslate2)"
        )
    if fmt == "m2m100" and config.positions == "learned":
        problems.append(
            "student.positions='learned' (M2M100 computes sinusoid positions "
            "and loads no position table; use --format ctranslate2)"
        )
    if fmt in TRANSFORMERS_FORMATS and abs(config.layer_norm_eps - TORCH_LAYER_NORM_EPS) > 1e-12:
        problems.append(
            f"student.layer_norm_eps={config.layer_norm_eps} ({ARCHITECTURES[fmt]}'s "
            f"LayerNorms use {TORCH_LAYER_NORM_EPS}, not configurable; --format "
            "ctranslate2 stores any epsilon)"
        )
    if problems:
        raise UserError(f"cannot export this student as {fmt}: " + "; ".join(problems))
    return fmt


def _check_vocab(config: TransformerConfig, vocab: Vocabulary) -> None:
    if (config.pad_id, config.bos_id, config.eos_id) != (PAD, BOS, EOS):
        raise UserError(
            f"the student's special ids (pad {config.pad_id}, bos {config.bos_id}, "
            f"eos {config.eos_id}) are not the vocabulary's ({PAD}, {BOS}, {EOS})"
        )
    if config.vocab_size != len(vocab):
        raise UserError(
            f"the student has {config.vocab_size} embeddings, the vocabulary {len(vocab)} pieces"
        )


def _local_path(path: os.PathLike | str) -> Path | None:
    """``path`` resolved, or None for a remote URL (gs://...)."""
    text = str(path)
    return None if "://" in text else Path(text).expanduser().resolve()


def check_target(
    out: os.PathLike | str, workdir: os.PathLike | str | None, overwrite: bool
) -> None:
    """Refuses (UserError) an ``out`` that exists unless ``overwrite``, and with
    ``overwrite`` anything but a folder an earlier export wrote (its marker file lists
    every entry in it), the work directory, a folder inside it or a folder above it."""
    path = Path(out)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise UserError(
            f"{out} exists; choose another --out or pass --overwrite (which "
            "replaces only a folder written by distill-jax export)"
        )
    target = _local_path(out)
    work = _local_path(workdir) if workdir else None
    if work is not None:
        if target == work:
            raise UserError(f"--overwrite refused: {out} is the work directory {workdir}")
        if work in target.parents:
            raise UserError(f"--overwrite refused: {out} is inside the work directory {workdir}")
        if target in work.parents:
            raise UserError(f"--overwrite refused: {out} holds the work directory {workdir}")
    if path.is_symlink() or not path.is_dir():
        raise UserError(f"--overwrite refused: {out} is not a folder written by distill-jax export")
    marker = path / MARKER
    try:
        listed = set(json.loads(marker.read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"--overwrite refused: {out} has no readable {MARKER}, so it was not "
            "written by distill-jax export; choose another --out"
        ) from None
    extra = sorted(set(os.listdir(path)) - listed)
    if extra:
        raise UserError(
            f"--overwrite refused: {out} holds files the export did not write: "
            f"{extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )


# ----------------------------------------------------------------------------- weights


def _host_tree(params: Any) -> Any:
    """Plain numpy float32 arrays of a (possibly boxed, sharded) parameter tree."""
    import flax.linen as nn
    import jax

    unboxed = nn.meta.unbox(params)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), unboxed)


def student_positions(params: Mapping, config: TransformerConfig, side: str) -> np.ndarray:
    """The student's position rows ``[max_len, d]`` of ``side`` (row i: token i)."""
    if config.positions == "learned":
        return np.asarray(params[side]["positions"]["embedding"], np.float32)
    return layers.sinusoidal_positions(config.max_len, config.d_model, np.float32)


def position_table(params: Mapping, config: TransformerConfig, side: str) -> np.ndarray:
    """FSMT's position table ``[max_len + pad_id + 1, d]`` for ``side`` (encoder/decoder):
    the student's row i at row ``pad_id + 1 + i``, zeros above (FSMT's pad row is zero)."""
    rows = student_positions(params, config, side)
    offset = config.pad_id + 1
    table = np.zeros((config.max_len + offset, config.d_model), np.float32)
    table[offset:] = rows
    return table


def _qkv(p: Mapping, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Our [embed, heads, kv] kernel as a torch Linear weight [heads * kv, embed] and bias."""
    kernel = p[name]["kernel"]  # [embed, heads, kv]
    return kernel.reshape(kernel.shape[0], -1).T, p[name]["bias"].reshape(-1)


def _out(p: Mapping) -> tuple[np.ndarray, np.ndarray]:
    kernel = p["out"]["kernel"]  # [heads, kv, embed]
    return kernel.reshape(-1, kernel.shape[-1]).T, p["out"]["bias"]


def _attention(prefix: str, p: Mapping, out: dict) -> None:
    """An attention block in transformers' names (q/k/v/out_proj, weights [out, in])."""
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out[f"{prefix}.{theirs}.weight"], out[f"{prefix}.{theirs}.bias"] = _qkv(p, ours)
    out[f"{prefix}.out_proj.weight"], out[f"{prefix}.out_proj.bias"] = _out(p)


def _norm(prefix: str, norm: Mapping, out: dict) -> None:
    out[f"{prefix}.weight"] = norm["scale"]
    out[f"{prefix}.bias"] = norm["bias"]


def _feed_forward(prefix: str, p: Mapping, out: dict) -> None:
    out[f"{prefix}.fc1.weight"] = p["intermediate"]["kernel"].T
    out[f"{prefix}.fc1.bias"] = p["intermediate"]["bias"]
    out[f"{prefix}.fc2.weight"] = p["output"]["kernel"].T
    out[f"{prefix}.fc2.bias"] = p["output"]["bias"]


# Every student parameter module the conversion reads, per layer kind.
_ENCODER_LAYER_KEYS = {
    "self_attention",
    "self_attention_block",
    "feed_forward",
    "feed_forward_block",
}
_DECODER_LAYER_KEYS = _ENCODER_LAYER_KEYS | {"cross_attention", "cross_attention_block"}


def _check_known(p: Mapping, config: TransformerConfig, fmt: str) -> None:
    """Raises UserError on a student parameter the conversion does not know, so nothing is
    dropped silently."""
    unknown = [k for k in p if k not in ("shared_embedding", "encoder", "decoder")]
    for side, count, keys in (
        ("encoder", config.num_encoder_layers, _ENCODER_LAYER_KEYS),
        ("decoder", config.num_decoder_layers, _DECODER_LAYER_KEYS),
    ):
        known = {f"layer_{i}" for i in range(count)}
        if config.positions == "learned":
            known.add("positions")
        if config.pre_layer_norm:
            known.add("final_norm")
        unknown += [f"{side}/{k}" for k in p[side] if k not in known]
        for i in range(count):
            unknown += [f"{side}/layer_{i}/{k}" for k in p[side][f"layer_{i}"] if k not in keys]
    if unknown:
        raise UserError(
            f"cannot export this student as {fmt}: parameters without a "
            f"counterpart: {sorted(unknown)}"
        )


def transformers_state_dict(
    params: Any, config: TransformerConfig, fmt: str
) -> dict[str, np.ndarray]:
    """The weights of ``fmt`` (marian, m2m100 or fsmt: transformers' names, torch layouts)
    of student ``params``. One embedding is written (``model.shared`` or, for FSMT,
    the decoder's); the classes tie the others and the output projection to it."""
    fmt = check_exportable(config, fmt)
    if fmt not in TRANSFORMERS_FORMATS:
        raise ValueError(f"{fmt} is not a transformers format")
    p = _host_tree(params)
    _check_known(p, config, fmt)
    embedding = p["shared_embedding"]["embedding"]  # [vocab, embed]
    out: dict[str, np.ndarray] = {}
    if fmt == "fsmt":
        out["model.decoder.embed_tokens.weight"] = embedding
    else:
        out["model.shared.weight"] = embedding
    if fmt == "marian":
        out["final_logits_bias"] = np.zeros((1, config.vocab_size), np.float32)
    for side, count in (
        ("encoder", config.num_encoder_layers),
        ("decoder", config.num_decoder_layers),
    ):
        tree = p[side]
        if fmt == "fsmt":
            out[f"model.{side}.embed_positions.weight"] = position_table(p, config, side)
        elif fmt == "marian":
            out[f"model.{side}.embed_positions.weight"] = student_positions(p, config, side)
        if config.pre_layer_norm:
            _norm(f"model.{side}.layer_norm", tree["final_norm"], out)
        for i in range(count):
            layer, prefix = tree[f"layer_{i}"], f"model.{side}.layers.{i}"
            _attention(f"{prefix}.self_attn", layer["self_attention"], out)
            _norm(f"{prefix}.self_attn_layer_norm", layer["self_attention_block"]["norm"], out)
            if side == "decoder":
                _attention(f"{prefix}.encoder_attn", layer["cross_attention"], out)
                _norm(
                    f"{prefix}.encoder_attn_layer_norm", layer["cross_attention_block"]["norm"], out
                )
            _feed_forward(prefix, layer["feed_forward"], out)
            _norm(f"{prefix}.final_layer_norm", layer["feed_forward_block"]["norm"], out)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def fsmt_state_dict(params: Any, config: TransformerConfig) -> dict[str, np.ndarray]:
    """The FSMT weights of student ``params`` (``transformers_state_dict(..., "fsmt")``)."""
    return transformers_state_dict(params, config, "fsmt")


# ----------------------------------------------------------------------------- configs


def _common_config(config: TransformerConfig) -> dict:
    return {
        "d_model": config.d_model,
        "encoder_layers": config.num_encoder_layers,
        "decoder_layers": config.num_decoder_layers,
        "encoder_attention_heads": config.num_heads,
        "decoder_attention_heads": config.num_heads,
        "encoder_ffn_dim": config.mlp_dim,
        "decoder_ffn_dim": config.mlp_dim,
        "activation_function": "relu",
        "max_position_embeddings": config.max_len,
        "scale_embedding": config.scale_embeddings,
        "tie_word_embeddings": True,
        "dropout": config.dropout_rate,
        "attention_dropout": config.attention_dropout_rate,
        "activation_dropout": config.activation_dropout_rate,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": config.pad_id,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "decoder_start_token_id": config.bos_id,
        "forced_eos_token_id": None,
    }


def transformers_config(
    config: TransformerConfig, decode: DecodeConfig, fmt: str, langs: Sequence[str] = ("src", "tgt")
) -> dict:
    """``config.json`` of a transformers export (``fmt``: marian, m2m100 or fsmt), with the
    student vocabulary's ids."""
    out = {"architectures": [ARCHITECTURES[fmt]], **_common_config(config)}
    if fmt == "marian":
        out.update(
            model_type="marian",
            vocab_size=config.vocab_size,
            decoder_vocab_size=config.vocab_size,
            share_encoder_decoder_embeddings=True,
        )
    elif fmt == "m2m100":
        # token i reads row pad_token_id + 1 + i of M2M100's sinusoids: -1 makes it row i,
        # the student's (the real pad id, 0, is the tokenizer's and generation_config's)
        out.update(model_type="m2m_100", vocab_size=config.vocab_size, pad_token_id=-1)
    else:
        out.update(
            model_type="fsmt",
            langs=list(langs),
            src_vocab_size=config.vocab_size,
            tgt_vocab_size=config.vocab_size,
            forced_eos_token_id=config.eos_id,
            num_beams=decode.beam_size if decode.method == "beam" else 1,
            length_penalty=decode.length_penalty,
            max_length=config.max_len + 1,
            early_stopping=False,
        )
    return out


def fsmt_config(
    config: TransformerConfig, decode: DecodeConfig, langs: Sequence[str] = ("src", "tgt")
) -> dict:
    """``config.json`` of an FSMT export."""
    return transformers_config(config, decode, "fsmt", langs)


def generation_config(config: TransformerConfig, decode: DecodeConfig) -> dict:
    """``generation_config.json``: the student's decoding as far as ``generate`` expresses
    it (see docs/export.md for what differs)."""
    out = {
        "decoder_start_token_id": config.bos_id,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "pad_token_id": config.pad_id,
        # the student's bound: a hypothesis that reaches it ends without a forced EOS
        "forced_eos_token_id": None,
        # the student never generates pad or BOS (log-probs set to -inf, not renormalised)
        "suppress_tokens": sorted({config.pad_id, config.bos_id}),
        # the start token plus at most max_len generated tokens
        "max_length": config.max_len + 1,
    }
    if decode.method == "beam":
        out.update(
            num_beams=decode.beam_size,
            length_penalty=decode.length_penalty,
            early_stopping="never",
            do_sample=False,
        )
    elif decode.method == "sample":
        out.update(
            do_sample=True, temperature=decode.temperature, top_k=decode.top_k or None, num_beams=1
        )
    else:
        out.update(do_sample=False, num_beams=1)
    return out


# ----------------------------------------------------------------------------- CTranslate2


def ctranslate2_spec(params: Any, config: TransformerConfig, vocab: Vocabulary):
    """A ``ctranslate2.specs.TransformerSpec`` holding student ``params``: pre- or post-LN
    as the student, the student's position rows, its LayerNorm epsilon, ``<s>`` as the
    decoder's first input (with its own embedding) and ``</s>`` appended to sources."""
    from ctranslate2.specs import common_spec, transformer_spec

    p = _host_tree(params)
    _check_known(p, config, "ctranslate2")
    spec = transformer_spec.TransformerSpec.from_config(
        (config.num_encoder_layers, config.num_decoder_layers),
        config.num_heads,
        pre_norm=config.pre_layer_norm,
        activation=common_spec.Activation.RELU,
    )
    embedding = p["shared_embedding"]["embedding"]  # [vocab, embed]
    scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0

    def linear(target, weight: np.ndarray, bias: np.ndarray) -> None:
        target.weight = np.ascontiguousarray(weight, np.float32)
        target.bias = np.ascontiguousarray(bias, np.float32)

    def norm(target, tree: Mapping) -> None:
        target.gamma, target.beta = tree["scale"], tree["bias"]

    def feed_forward(target, layer: Mapping) -> None:
        ff = layer["feed_forward"]
        linear(target.linear_0, ff["intermediate"]["kernel"].T, ff["intermediate"]["bias"])
        linear(target.linear_1, ff["output"]["kernel"].T, ff["output"]["bias"])
        norm(target.layer_norm, layer["feed_forward_block"]["norm"])

    for side_spec, side in ((spec.encoder, "encoder"), (spec.decoder, "decoder")):
        tree = p[side]
        side_spec.scale_embeddings = scale
        side_spec.position_encodings.encodings = student_positions(p, config, side)
        if config.pre_layer_norm:
            norm(side_spec.layer_norm, tree["final_norm"])
        for i, layer_spec in enumerate(side_spec.layer):
            layer = tree[f"layer_{i}"]
            attn = layer["self_attention"]
            parts = [_qkv(attn, k) for k in ("query", "key", "value")]
            linear(
                layer_spec.self_attention.linear[0],
                np.concatenate([w for w, _ in parts]),
                np.concatenate([b for _, b in parts]),
            )
            linear(layer_spec.self_attention.linear[1], *_out(attn))
            norm(layer_spec.self_attention.layer_norm, layer["self_attention_block"]["norm"])
            if side == "decoder":
                cross = layer["cross_attention"]
                linear(layer_spec.attention.linear[0], *_qkv(cross, "query"))
                kv = [_qkv(cross, k) for k in ("key", "value")]
                linear(
                    layer_spec.attention.linear[1],
                    np.concatenate([w for w, _ in kv]),
                    np.concatenate([b for _, b in kv]),
                )
                linear(layer_spec.attention.linear[2], *_out(cross))
                norm(layer_spec.attention.layer_norm, layer["cross_attention_block"]["norm"])
            feed_forward(layer_spec.ffn, layer)
    spec.encoder.embeddings[0].weight = embedding
    spec.decoder.embeddings.weight = embedding
    spec.decoder.projection.weight = embedding
    spec.decoder.start_from_zero_embedding = False
    spec.config.layer_norm_epsilon = float(config.layer_norm_eps)
    spec.config.add_source_eos = True
    for field, token_id in (
        ("bos_token", BOS),
        ("eos_token", EOS),
        ("unk_token", UNK),
        ("decoder_start_token", config.bos_id),
    ):
        setattr(spec.config, field, vocab.pieces[token_id])
    spec.register_source_vocabulary(list(vocab.pieces))
    spec.register_target_vocabulary(list(vocab.pieces))
    return spec


def write_ctranslate2(
    folder: Path, params: Any, config: TransformerConfig, vocab: Vocabulary
) -> None:
    """Writes the CTranslate2 model (float32) of the student into ``folder`` (which must
    not exist)."""
    try:
        import ctranslate2
    except ImportError:
        raise UserError(
            'the CTranslate2 export needs the ctranslate2 package: pip install -e ".[export]"'
        ) from None

    spec = ctranslate2_spec(params, config, vocab)

    class _StudentConverter(ctranslate2.converters.Converter):
        """CTranslate2's converter over a ready specification."""

        def _load(self):
            return spec

    _StudentConverter().convert(str(folder))


def ctranslate2_suppressed(vocab: Vocabulary) -> list[list[str]]:
    """``suppress_sequences`` for CTranslate2: pad and ``<s>``, which the student never
    generates."""
    return [[vocab.pieces[PAD]], [vocab.pieces[BOS]]]


def max_new_tokens(
    src_ids: Sequence[int], decode: DecodeConfig, max_len: int, pad_id: int = PAD, eos_id: int = EOS
) -> int:
    """The student's length bound for one source (``decode.length_limits``), to pass as
    ``generate(max_new_tokens=...)``: ``floor(a * n + b)`` tokens, ``n`` the source ids that
    are neither pad nor EOS (computed in float32 as the student does), within
    ``[1, max_len]``."""
    n = sum(1 for i in src_ids if i not in (pad_id, eos_id))
    bound = np.floor(np.float32(decode.max_len_a) * np.float32(n) + np.float32(decode.max_len_b))
    return int(min(max(int(bound), 1), max_len))


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(vocab: Vocabulary, max_len: int):
    """A ``PreTrainedTokenizerFast`` around the student's own tokenizer
    (``Vocabulary.wordpiece_tokenizer``: the teacher's normalizer and pre-tokenizer,
    WordPiece over the student pieces), with ``</s>`` appended to every sequence and the
    WordPiece decoder, whose per-token clean-up removes the space before . ? ! , (what
    ``Vocabulary.decode`` does).

    pad, ``<s>``, ``</s>`` and the fillers are special tokens (dropped by
    ``skip_special_tokens``); ``<unk>`` is not, so decoded text shows it as the student
    does. Special-token strings in raw text are split like other text
    (``split_special_tokens``), as the student's encoder treats them."""
    from tokenizers import Tokenizer, decoders, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(vocab.wordpiece_tokenizer().to_str())  # a copy to extend
    eos = vocab.pieces[EOS]
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, EOS)]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fillers = [p for p in vocab.pieces if p.startswith("<fill_")]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=vocab.pieces[PAD],
        bos_token=vocab.pieces[BOS],
        eos_token=eos,
        extra_special_tokens=fillers,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
        model_max_length=max_len,
    )


# ----------------------------------------------------------------------------- model card


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_USAGE = {
    "transformers": [
        "```python",
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        'PATH = "path/to/this/folder"',
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForSeq2SeqLM.from_pretrained(PATH).eval()",
        'batch = tokenizer(["a source sentence"], return_tensors="pt", padding=True)',
        "print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))",
        "```",
    ],
    "ctranslate2": [
        "```python",
        "import ctranslate2, transformers",
        'PATH = "path/to/this/folder"',
        "tokenizer = transformers.AutoTokenizer.from_pretrained(PATH)",
        'translator = ctranslate2.Translator(PATH, compute_type="float32")',
        'source = tokenizer.tokenize("a source sentence")   # </s> is added by the model',
        "result = translator.translate_batch([source], beam_size=4, suppress_sequences="
        '[["<pad>"], ["<s>"]])',
        "print(tokenizer.convert_tokens_to_string(result[0].hypotheses[0]))",
        "```",
    ],
}


def model_card(run_dir: Path, student: ExportedStudent, info: CardInfo, fmt: str = "marian") -> str:
    """README.md of the ``fmt`` export of ``student``, a ``huggingface_hub.ModelCard``:
    metadata (language, datasets, license, BLEU per split in ``model-index``) from
    ``ModelCardData``, the text from ``info`` and the run's ``config.json`` and
    ``results.json`` in ``run_dir`` (the student's parameters and decoding settings are
    not read)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config, vocab, langs = student.config, student.vocab, student.langs
    name, checkpoint = info.name, info.checkpoint

    experiment = _read_json(run_dir / "config.json") or {}
    results = _read_json(run_dir / "results.json") or {}
    data = experiment.get("data", {})
    distill = experiment.get("distill", {})
    teacher = experiment.get("teacher", {})
    train = experiment.get("train", {})
    decode = experiment.get("decode", {})
    kd = results.get("kd", distill.get("kd", "?"))
    dataset = str((info.dataset_meta or {}).get("tfds_name", data.get("dataset", "unknown")))
    splits = results.get("splits", {})
    library = "ctranslate2" if fmt == "ctranslate2" else "transformers"
    languages = [
        lang
        for lang in langs
        if lang.isalpha() and 2 <= len(lang) <= 3 and lang not in ("src", "tgt")
    ]
    pair = "-".join(langs)
    evals = [
        EvalResult(
            task_type="translation",
            task_name=f"Translation {pair}",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type="bleu",
            metric_name="BLEU (sacreBLEU, case-insensitive)",
            metric_value=round(float(s["bleu"]), 2),
        )
        for split, s in splits.items()
        if "bleu" in s
    ]
    card_data = ModelCardData(
        language=languages or None,
        license=info.license,
        library_name=library,
        pipeline_tag="translation",
        datasets=[dataset],
        tags=["distill-jax", "knowledge-distillation", fmt],
        model_name=name,
        eval_results=evals or None,
    )
    method = (
        "a baseline trained on the references alone (no distillation), for comparison "
        "with students distilled"
        if kd == "none"
        else f"a student distilled ({kd} soft targets)"
    )
    layout = "pre-LN with final LayerNorms" if config.pre_layer_norm else "post-LN"
    lines = [
        f"# {name}: a distill-jax student ({fmt})",
        "",
        f"A Transformer encoder-decoder ({layout}) trained with distill-jax: {method} from a "
        'C-MLM fine-tuned BERT teacher (Chen et al., ACL 2020, "Distilling Knowledge Learned '
        f'in BERT for Text Generation"). Exported with `distill-jax export --format {fmt}`.',
        "",
        "## Data",
        "",
        f"- dataset: `{dataset}` (train split `{data.get('train_split', 'train')}`), {pair}",
        f"- vocabulary: {len(vocab.pieces)} WordPiece pieces of the teacher tokenizer "
        f"(`{vocab.name}`), shared by source and target",
        "",
        "## Teacher",
        "",
        f"- checkpoint: `{teacher.get('checkpoint', '?')}`"
        f" (init `{teacher.get('init', '?')}`, fine-tuned {teacher.get('steps', '?')} steps as "
        "a conditional masked language model)"
        + ("; this baseline uses only its tokenizer" if kd == "none" else ""),
        "",
        "## Distillation",
        "",
        f"- mode: `{kd}`" + (" (baseline, no teacher)" if kd == "none" else ""),
    ]
    if kd != "none":
        lines += [
            f"- alpha {distill.get('alpha', '?')}, temperature "
            f"{distill.get('temperature', '?')}, top-K {distill.get('top_k', '?')}, "
            f"loss `{distill.get('kd_mode', '?')}`"
        ]
    lines += [
        f"- student: {config.num_encoder_layers}+{config.num_decoder_layers} layers, d "
        f"{config.d_model}, {config.num_heads} heads, feed-forward {config.mlp_dim}, "
        f"{config.positions} positions, LayerNorm eps {config.layer_norm_eps}, max length "
        f"{config.max_len}",
        f"- training: {results.get('steps', train.get('steps', '?'))} steps, learning rate "
        f"{train.get('learning_rate', '?')}, label smoothing "
        f"{train.get('label_smoothing', '?')}, seed {results.get('seed', train.get('seed', '?'))}",
        f"- exported parameters: `--checkpoint {checkpoint}`"
        + (f" (training reported: {results['checkpoint']})" if "checkpoint" in results else ""),
        "",
        "## Scores",
        "",
    ]
    if splits:
        lines += [
            "Beam search as configured in distill-jax (beam "
            f"{decode.get('beam_size', '?')}, GNMT length penalty "
            f"{decode.get('length_penalty', '?')}); BLEU is case-insensitive sacreBLEU.",
            "",
            "| split | BLEU | ROUGE-1 | ROUGE-2 | ROUGE-L |",
            "|---|---|---|---|---|",
        ]
        for split, s in splits.items():
            lines.append(
                f"| {split} | {s.get('bleu', float('nan')):.2f} | "
                f"{s.get('rouge1', float('nan')):.2f} | "
                f"{s.get('rouge2', float('nan')):.2f} | "
                f"{s.get('rougeL', float('nan')):.2f} |"
            )
    else:
        lines.append("No results.json in the run folder: not scored.")
    caveat = (
        []
        if fmt != "marian"
        else [
            "",
            "Copy or upload this folder as it is (`huggingface_hub.upload_folder`): "
            "transformers' `save_pretrained` / `push_to_hub` leave Marian's position tables out "
            "and the reloaded model would use Marian's own sinusoids, not this model's.",
        ]
    )
    lines += [
        "",
        "## Use",
        "",
        *_USAGE[library],
        *caveat,
        "",
        "Differences from `distill-jax generate`: the length penalty (transformers and "
        "CTranslate2 divide by `length ** alpha`, distill-jax by GNMT's "
        "`((5 + length) / 6) ** alpha`; with 0 they agree) and the length bound (one "
        "per call; distill-jax: `a * source length + b` per sentence). Token ids are "
        "the same for any text.",
        "",
    ]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)))


# ----------------------------------------------------------------------------- writing


def write_export(
    folder: Path,
    student: ExportedStudent,
    card: str,
    fmt: str = "auto",
    ctranslate2: bool = False,
) -> None:
    """Writes the export of ``student`` (format ``fmt``; with ``ctranslate2`` also a
    CTranslate2 model in ``ctranslate2/``), with ``card`` as its README.md, into an existing
    empty ``folder``."""
    from safetensors.numpy import save_file

    params, config, vocab, decode = student.params, student.config, student.vocab, student.decode
    fmt = check_exportable(config, fmt)
    _check_vocab(config, vocab)
    if fmt == "ctranslate2":
        os.rmdir(folder)  # CTranslate2's converter creates its output folder
        write_ctranslate2(folder, params, config, vocab)
    else:
        save_file(
            transformers_state_dict(params, config, fmt),
            str(folder / WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        (folder / "config.json").write_text(
            json.dumps(transformers_config(config, decode, fmt, student.langs), indent=2) + "\n",
            encoding="utf-8",
        )
        (folder / "generation_config.json").write_text(
            json.dumps(generation_config(config, decode), indent=2) + "\n", encoding="utf-8"
        )
        if ctranslate2:
            write_ctranslate2(folder / CT2_FOLDER, params, config, vocab)
    # (the tokenizer files do not touch CTranslate2's config.json)
    build_tokenizer(vocab, config.max_len).save_pretrained(str(folder))
    (folder / "README.md").write_text(card, encoding="utf-8")


def write_marker(folder: Path, fmt: str) -> None:
    """The marker file that lets ``--overwrite`` recognise the export: it lists every
    entry of ``folder`` (itself included)."""
    entries = sorted(set(os.listdir(folder)) | {MARKER})
    (folder / MARKER).write_text(
        json.dumps({"written_by": "distill-jax export", "format": fmt, "files": entries}, indent=2)
        + "\n",
        encoding="utf-8",
    )


def _readable_files(folder: Path) -> None:
    """Gives the written files the user's default permissions (umask), which some writers
    (safetensors) narrow to the owner."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system does not offer it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def export(
    out: os.PathLike,
    student: ExportedStudent,
    card: str,
    *,
    fmt: str = "auto",
    ctranslate2: bool = False,
    overwrite: bool = False,
    workdir: os.PathLike | str | None = None,
) -> Path:
    """Writes the export of ``student`` (``write_export``) to ``out`` atomically: into a
    temporary folder beside it, moved to ``out`` once complete. An existing ``out`` is
    refused unless ``overwrite``, and then replaced only if an earlier export wrote it
    (``check_target``), by swapping the new folder in once it is complete."""
    out = Path(out)
    fmt = check_exportable(student.config, fmt)
    check_target(out, workdir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (not tempfile's private 0700 folder): the export gets the permissions
    # of any folder the user creates
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        write_export(tmp, student, card, fmt, ctranslate2)
        write_marker(tmp, fmt)
        _readable_files(tmp)
        if out.exists():
            if not _exchange(tmp, out):
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
                os.replace(out, old)
                os.replace(tmp, out)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.exists() and tmp.resolve() != out.resolve():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
