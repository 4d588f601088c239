"""Exporting a trained student as a Hugging Face transformers FSMT checkpoint.

The student (post-LN, biased projections, ReLU, LayerNorm eps 1e-5, sqrt(d)-scaled
embeddings shared by source, target and output, fairseq sinusoids with sin then cos) is
the architecture of ``FSMTForConditionalGeneration`` with ``tie_word_embeddings=True``,
with one difference: FSMT's token i reads row ``pad_id + 1 + i`` of its position table
(fairseq's ``make_positions``), the student reads row i. The export writes the student's
rows shifted into FSMT's table (row ``pad_id + 1 + i`` = student row i, rows up to
``pad_id`` zero) instead of adding an offset option to the student: FSMT saves its
position tables with the weights and ``from_pretrained`` loads them back as they are
(``tests/test_export.py`` checks the round trip), so the student stays unchanged and
learned position tables export the same way as sinusoid ones. FSMT only rebuilds the
table when a sequence is longer than it, which the student's ``max_len`` rules out.

What FSMT cannot express is refused by name (``check_exportable``): pre-LN students
(FSMT has no final LayerNorms and normalises after each block), a LayerNorm epsilon
other than torch's 1e-5 (FSMT's is fixed).

The folder holds the safetensors weights (written with numpy, no torch needed),
``config.json`` / ``generation_config.json`` with the student vocabulary's ids, a
``tokenizers`` WordPiece tokenizer over the student vocabulary (the teacher's BERT
normalizer and pre-tokenizer, ``</s>`` appended by the post-processor, as FSMT expects
sources to end) that ``AutoTokenizer`` loads, and a model card. ``export`` writes into a
temporary folder beside the destination and renames it at the end, so a failed export
leaves nothing that looks like a checkpoint.

Tokenizer: the exported tokenizer is the student's own (``Vocabulary.wordpiece_tokenizer``,
the teacher's normalizer and pre-tokenizer, WordPiece over the student pieces) with a
post-processor appending ``</s>``, so it gives ``distill-jax generate``'s ids for any text.

Decoding: ``generation_config.json`` carries the student's decoding settings as far as
``generate`` can express them: pad and BOS suppressed (the student never generates them),
no forced EOS at the length bound (the student's hypothesis ends there as it is), the
decoder started with the student's BOS. Two differences remain and are documented: the
length bound is a single ``max_length`` (the student's is per source, see
``max_new_tokens``) and transformers divides beam scores by ``length ** alpha`` where the
student uses GNMT's ``((5 + length) / 6) ** alpha``; with ``length_penalty=0`` the two
agree.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from distill_jax.data.vocab import BOS, EOS, PAD, UNK, Vocabulary
from distill_jax.errors import UserError
from distill_jax.experiment import DecodeConfig
from distill_jax.models import layers
from distill_jax.models.transformer import TransformerConfig

TORCH_LAYER_NORM_EPS = 1e-5  # FSMT's LayerNorms use torch's default epsilon
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------- checks


def check_exportable(config: TransformerConfig) -> None:
    """Raises UserError naming every student setting FSMT cannot express."""
    problems = []
    if config.pre_layer_norm:
        problems.append("student.pre_layer_norm=True (FSMT is post-LN: a LayerNorm after each "
                        "block and no final LayerNorm)")
    if abs(config.layer_norm_eps - TORCH_LAYER_NORM_EPS) > 1e-12:
        problems.append(f"student.layer_norm_eps={config.layer_norm_eps} (FSMT's LayerNorms use "
                        f"{TORCH_LAYER_NORM_EPS})")
    if problems:
        raise UserError("cannot export this student as FSMT: " + "; ".join(problems))


def _check_vocab(config: TransformerConfig, vocab: Vocabulary) -> None:
    if (config.pad_id, config.bos_id, config.eos_id) != (PAD, BOS, EOS):
        raise UserError(f"the student's special ids (pad {config.pad_id}, bos {config.bos_id}, "
                        f"eos {config.eos_id}) are not the vocabulary's ({PAD}, {BOS}, {EOS})")
    if config.vocab_size != len(vocab):
        raise UserError(f"the student has {config.vocab_size} embeddings, the vocabulary "
                        f"{len(vocab)} pieces")


# ----------------------------------------------------------------------------- weights


def _host_tree(params: Any) -> Any:
    """Plain numpy float32 arrays of a (possibly boxed, sharded) parameter tree."""
    import flax.linen as nn
    import jax

    unboxed = nn.meta.unbox(params)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), unboxed)


def position_table(params: Mapping, config: TransformerConfig, side: str) -> np.ndarray:
    """FSMT's position table ``[max_len + pad_id + 1, d]`` for ``side`` (encoder/decoder):
    the student's row i at row ``pad_id + 1 + i``, zeros above (FSMT's pad row is zero)."""
    if config.positions == "learned":
        rows = np.asarray(params[side]["positions"]["embedding"], np.float32)
    else:
        rows = layers.sinusoidal_positions(config.max_len, config.d_model, np.float32)
    offset = config.pad_id + 1
    table = np.zeros((config.max_len + offset, config.d_model), np.float32)
    table[offset:] = rows
    return table


def _attention(prefix: str, p: Mapping, out: dict) -> None:
    """Our [embed, heads, kv] / [heads, kv, embed] kernels as torch Linear weights [out, in]."""
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        kernel = p[ours]["kernel"]  # [embed, heads, kv]
        out[f"{prefix}.{theirs}.weight"] = kernel.reshape(kernel.shape[0], -1).T
        out[f"{prefix}.{theirs}.bias"] = p[ours]["bias"].reshape(-1)
    kernel = p["out"]["kernel"]  # [heads, kv, embed]
    out[f"{prefix}.out_proj.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
    out[f"{prefix}.out_proj.bias"] = p["out"]["bias"]


def _norm(prefix: str, p: Mapping, out: dict) -> None:
    out[f"{prefix}.weight"] = p["norm"]["scale"]
    out[f"{prefix}.bias"] = p["norm"]["bias"]


def _feed_forward(prefix: str, p: Mapping, out: dict) -> None:
    out[f"{prefix}.fc1.weight"] = p["intermediate"]["kernel"].T
    out[f"{prefix}.fc1.bias"] = p["intermediate"]["bias"]
    out[f"{prefix}.fc2.weight"] = p["output"]["kernel"].T
    out[f"{prefix}.fc2.bias"] = p["output"]["bias"]


# Every student parameter module the conversion reads, per layer kind.
_ENCODER_LAYER_KEYS = {"self_attention", "self_attention_block", "feed_forward",
                       "feed_forward_block"}
_DECODER_LAYER_KEYS = _ENCODER_LAYER_KEYS | {"cross_attention", "cross_attention_block"}


def fsmt_state_dict(params: Any, config: TransformerConfig) -> dict[str, np.ndarray]:
    """The FSMT weights (transformers' names, torch layouts) of student ``params``.

    Only the decoder's token embedding is written: with ``tie_word_embeddings`` FSMT ties
    the encoder's embedding and the output projection to it (as ``save_pretrained`` does).
    Raises UserError on a parameter the conversion does not know (so nothing is dropped
    silently)."""
    check_exportable(config)
    p = _host_tree(params)
    out: dict[str, np.ndarray] = {
        "model.decoder.embed_tokens.weight": p["shared_embedding"]["embedding"]}
    expected_top = {"shared_embedding", "encoder", "decoder"}
    unknown = [f"{k}" for k in p if k not in expected_top]
    for side, count, keys in (("encoder", config.num_encoder_layers, _ENCODER_LAYER_KEYS),
                              ("decoder", config.num_decoder_layers, _DECODER_LAYER_KEYS)):
        tree = p[side]
        known = {f"layer_{i}" for i in range(count)}
        if config.positions == "learned":
            known.add("positions")
        unknown += [f"{side}/{k}" for k in tree if k not in known]
        out[f"model.{side}.embed_positions.weight"] = position_table(p, config, side)
        for i in range(count):
            layer, prefix = tree[f"layer_{i}"], f"model.{side}.layers.{i}"
            unknown += [f"{side}/layer_{i}/{k}" for k in layer if k not in keys]
            _attention(f"{prefix}.self_attn", layer["self_attention"], out)
            _norm(f"{prefix}.self_attn_layer_norm", layer["self_attention_block"], out)
            if side == "decoder":
                _attention(f"{prefix}.encoder_attn", layer["cross_attention"], out)
                _norm(f"{prefix}.encoder_attn_layer_norm", layer["cross_attention_block"], out)
            _feed_forward(prefix, layer["feed_forward"], out)
            _norm(f"{prefix}.final_layer_norm", layer["feed_forward_block"], out)
    if unknown:
        raise UserError(f"cannot export this student as FSMT: parameters without an FSMT "
                        f"counterpart: {sorted(unknown)}")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- configs


def fsmt_config(config: TransformerConfig, decode: DecodeConfig,
                langs: Sequence[str] = ("src", "tgt")) -> dict:
    """``config.json`` of the export (FSMTConfig fields), with the student's ids."""
    return {
        "architectures": ["FSMTForConditionalGeneration"],
        "model_type": "fsmt",
        "langs": list(langs),
        "src_vocab_size": config.vocab_size,
        "tgt_vocab_size": config.vocab_size,
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
        "forced_eos_token_id": config.eos_id,
        # FSMTConfig's own generation fields; generate() reads generation_config.json
        "num_beams": decode.beam_size if decode.method == "beam" else 1,
        "length_penalty": decode.length_penalty,
        "max_length": config.max_len + 1,
        "early_stopping": False,
    }


def generation_config(config: TransformerConfig, decode: DecodeConfig) -> dict:
    """``generation_config.json``: the student's decoding as far as ``generate`` expresses
    it (see the module docstring for what differs)."""
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
        out.update(num_beams=decode.beam_size, length_penalty=decode.length_penalty,
                   early_stopping="never", do_sample=False)
    elif decode.method == "sample":
        out.update(do_sample=True, temperature=decode.temperature, top_k=decode.top_k or None,
                   num_beams=1)
    else:
        out.update(do_sample=False, num_beams=1)
    return out


def max_new_tokens(src_ids: Sequence[int], decode: DecodeConfig, max_len: int,
                   pad_id: int = PAD, eos_id: int = EOS) -> int:
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

    backend = Tokenizer.from_str(vocab.wordpiece_tokenizer().to_str())   # a copy to extend
    eos = vocab.pieces[EOS]
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, EOS)])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fillers = [p for p in vocab.pieces if p.startswith("<fill_")]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=vocab.pieces[PAD], bos_token=vocab.pieces[BOS],
        eos_token=eos, extra_special_tokens=fillers, clean_up_tokenization_spaces=False,
        split_special_tokens=True, model_max_length=max_len)


# ----------------------------------------------------------------------------- model card


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_card(run_dir: Path, name: str, config: TransformerConfig, vocab: Vocabulary,
               dataset_meta: Optional[Mapping], checkpoint: str) -> str:
    """README.md of the export: data, teacher, distillation settings and scores, from the
    run's ``config.json`` and ``results.json`` in ``run_dir``."""
    experiment = _read_json(run_dir / "config.json") or {}
    results = _read_json(run_dir / "results.json") or {}
    data = experiment.get("data", {})
    distill = experiment.get("distill", {})
    teacher = experiment.get("teacher", {})
    train = experiment.get("train", {})
    decode = experiment.get("decode", {})
    kd = results.get("kd", distill.get("kd", "?"))
    method = ("a baseline trained on the references alone (no distillation), for comparison "
              "with students distilled" if kd == "none" else
              f"a student distilled ({kd} soft targets)")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: translation", "tags:",
        "- fsmt", "- distill-jax", "- knowledge-distillation", "---", "",
        f"# {name}: a distill-jax student exported to FSMT", "",
        f"A Transformer encoder-decoder trained with distill-jax: {method} from a C-MLM "
        "fine-tuned BERT teacher (Chen et al., ACL 2020, \"Distilling Knowledge Learned in "
        "BERT for Text Generation\"). Exported with `distill-jax export`.", "",
        "## Data", "",
        f"- dataset: `{(dataset_meta or {}).get('tfds_name', data.get('dataset', '?'))}`"
        f" (train split `{data.get('train_split', 'train')}`)",
        f"- vocabulary: {len(vocab)} WordPiece pieces of the teacher tokenizer "
        f"(`{vocab.name}`), shared by source and target", "",
        "## Teacher", "",
        f"- checkpoint: `{teacher.get('checkpoint', '?')}`"
        f" (init `{teacher.get('init', '?')}`, fine-tuned {teacher.get('steps', '?')} steps as "
        "a conditional masked language model)"
        + ("; this baseline uses only its tokenizer" if kd == "none" else ""), "",
        "## Distillation", "",
        f"- mode: `{kd}`" + (" (baseline, no teacher)" if kd == "none" else ""),
    ]
    if kd != "none":
        lines += [f"- alpha {distill.get('alpha', '?')}, temperature "
                  f"{distill.get('temperature', '?')}, top-K {distill.get('top_k', '?')}, "
                  f"loss `{distill.get('kd_mode', '?')}`"]
    lines += [
        f"- student: {config.num_encoder_layers}+{config.num_decoder_layers} layers, d "
        f"{config.d_model}, {config.num_heads} heads, feed-forward {config.mlp_dim}, "
        f"{config.positions} positions, max length {config.max_len}",
        f"- training: {results.get('steps', train.get('steps', '?'))} steps, learning rate "
        f"{train.get('learning_rate', '?')}, label smoothing "
        f"{train.get('label_smoothing', '?')}, seed {results.get('seed', train.get('seed', '?'))}",
        f"- exported parameters: `--checkpoint {checkpoint}`"
        + (f" (training reported: {results['checkpoint']})" if "checkpoint" in results else ""),
        "", "## Scores", "",
    ]
    splits = results.get("splits", {})
    if splits:
        lines += ["Beam search as configured in distill-jax (beam "
                  f"{decode.get('beam_size', '?')}, GNMT length penalty "
                  f"{decode.get('length_penalty', '?')}); BLEU is case-insensitive sacreBLEU.",
                  "", "| split | BLEU | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|---|"]
        for split, s in splits.items():
            lines.append(f"| {split} | {s.get('bleu', float('nan')):.2f} | "
                         f"{s.get('rouge1', float('nan')):.2f} | "
                         f"{s.get('rouge2', float('nan')):.2f} | "
                         f"{s.get('rougeL', float('nan')):.2f} |")
    else:
        lines.append("No results.json in the run folder: not scored.")
    lines += [
        "", "## Use", "", "```python",
        "from transformers import AutoTokenizer, FSMTForConditionalGeneration",
        "PATH = \"path/to/this/folder\"",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "model = FSMTForConditionalGeneration.from_pretrained(PATH).eval()",
        "batch = tokenizer([\"a source sentence\"], return_tensors=\"pt\", padding=True)",
        "print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))",
        "```", "",
        "Differences from `distill-jax generate`: transformers' beam search divides scores by "
        "`length ** length_penalty` (distill-jax: GNMT `((5 + length) / 6) ** alpha`), and its "
        "length bound is one `max_length` (distill-jax: `a * source length + b` per "
        "sentence). The tokenizer is distill-jax's own, so token ids are the same for any "
        "text.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writing


def write_export(folder: Path, params: Any, config: TransformerConfig, vocab: Vocabulary,
                 decode: DecodeConfig, card: str, langs: Sequence[str] = ("src", "tgt")) -> None:
    """Writes the checkpoint files into an existing empty ``folder``."""
    from safetensors.numpy import save_file

    check_exportable(config)
    _check_vocab(config, vocab)
    save_file(fsmt_state_dict(params, config), str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(fsmt_config(config, decode, langs), indent=2)
                                        + "\n", encoding="utf-8")
    (folder / "generation_config.json").write_text(
        json.dumps(generation_config(config, decode), indent=2) + "\n", encoding="utf-8")
    build_tokenizer(vocab, config.max_len).save_pretrained(str(folder))
    (folder / "README.md").write_text(card, encoding="utf-8")


def _readable_files(folder: Path) -> None:
    """Gives the written files the user's default permissions (umask), which some writers
    (safetensors) narrow to the owner."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def export(out: os.PathLike, params: Any, config: TransformerConfig, vocab: Vocabulary,
           decode: DecodeConfig, card: str, langs: Sequence[str] = ("src", "tgt"), *,
           overwrite: bool = False) -> Path:
    """Writes the FSMT checkpoint to ``out`` atomically: into a temporary folder beside it,
    renamed to ``out`` once complete. An existing ``out`` is refused unless ``overwrite``
    (then it is replaced only after the new export is complete)."""
    out = Path(out)
    check_exportable(config)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (not tempfile's private 0700 folder): the export gets the permissions
    # of any folder the user creates
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        write_export(tmp, params, config, vocab, decode, card, langs)
        _readable_files(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
