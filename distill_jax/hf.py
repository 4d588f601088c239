"""Loading Hugging Face BERT checkpoints (safetensors) and tokenizers, without torch.

A checkpoint is a folder with ``config.json`` and ``model.safetensors`` (or shards listed
in ``model.safetensors.index.json``), or a Hub name that is downloaded into the Hugging
Face cache. Pickle checkpoints (``pytorch_model.bin``) are refused and never opened.

Weights are read with ``safetensors``' numpy backend and renamed with one key table
(``bert_key_table``): Hugging Face name -> Flax path + layout transform.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from distill_jax.errors import UserError
from distill_jax.models.bert import BertConfig, BertModel

Path = pathlib.Path
FlaxPath = tuple[str, ...]

# Files fetched from the Hub: the config, safetensors weights and the tokenizer.
HUB_PATTERNS = (
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
# Pickle-based weight files that are refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Checkpoint keys that are known and not used (after dropping the ``bert.`` prefix).
IGNORED_KEYS = (
    r"pooler\..*",  # the next-sentence pooler
    r"embeddings\.position_ids",  # a buffer (arange), not a weight
    r"embeddings\.token_type_ids",  # a buffer (zeros), not a weight
    r"cls\.predictions\.decoder\..*",  # MLM output over BERT's vocabulary (tied to embeddings)
    r"cls\.predictions\.bias",  # its bias
    r"cls\.seq_relationship\..*",  # next-sentence prediction head
)


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be loaded (content, format or shapes); a
    ``UserError``: the CLI prints it and exits with status 2."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A local checkpoint path that does not exist."""


class CheckpointUnavailable(CheckpointError, OSError):
    """A name that is no local folder and could not be fetched from the Hub."""


# A Hugging Face Hub model id: "name" or "org/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a Hugging Face tensor becomes a Flax parameter of known shape."""

    name: str  # shown in the key table and in errors
    to_flax: Callable[[np.ndarray, tuple], np.ndarray]  # (hf array, flax shape) -> flax array
    hf_shape: Callable[[tuple], tuple]  # flax shape -> the Hugging Face shape it comes from


IDENTITY = Transform("identity", lambda w, s: w, lambda s: tuple(s))
# torch Linear weight [out, in] -> Dense kernel [in, out]
LINEAR = Transform("linear", lambda w, s: w.T, lambda s: (s[1], s[0]))
# q/k/v Linear weight [heads*kv, embed] -> attention kernel [embed, heads, kv]
LINEAR_TO_HEADS = Transform(
    "linear_to_heads", lambda w, s: w.T.reshape(s), lambda s: (s[1] * s[2], s[0])
)
# q/k/v bias [heads*kv] -> [heads, kv]
BIAS_TO_HEADS = Transform("bias_to_heads", lambda w, s: w.reshape(s), lambda s: (s[0] * s[1],))
# attention output Linear weight [embed, heads*kv] -> attention kernel [heads, kv, embed]
LINEAR_FROM_HEADS = Transform(
    "linear_from_heads", lambda w, s: w.T.reshape(s), lambda s: (s[2], s[0] * s[1])
)


def _linear(hf: str, flax: FlaxPath) -> dict[str, tuple[FlaxPath, Transform]]:
    """Table rows for a torch Linear (weight + bias) -> flax Dense."""
    return {
        f"{hf}.weight": (flax + ("kernel",), LINEAR),
        f"{hf}.bias": (flax + ("bias",), IDENTITY),
    }


def _layer_norm(hf: str, flax: FlaxPath) -> dict[str, tuple[FlaxPath, Transform]]:
    """Table rows for a torch LayerNorm (weight, bias) -> flax LayerNorm (scale, bias)."""
    return {
        f"{hf}.weight": (flax + ("scale",), IDENTITY),
        f"{hf}.bias": (flax + ("bias",), IDENTITY),
    }


def bert_key_table(
    config: BertConfig, *, mlm_transform: bool = False
) -> dict[str, tuple[FlaxPath, Transform]]:
    """Hugging Face key (without ``bert.``) -> (Flax path in ``params``, transform).

    With ``mlm_transform``, BERT's ``cls.predictions.transform`` maps onto
    ``cmlm_head/dense`` and ``cmlm_head/LayerNorm``.
    """
    table = {
        "embeddings.word_embeddings.weight": (
            ("embeddings", "word_embeddings", "embedding"),
            IDENTITY,
        ),
        "embeddings.position_embeddings.weight": (
            ("embeddings", "position_embeddings", "embedding"),
            IDENTITY,
        ),
        "embeddings.token_type_embeddings.weight": (
            ("embeddings", "token_type_embeddings", "embedding"),
            IDENTITY,
        ),
        **_layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm")),
    }
    for i in range(config.num_hidden_layers):
        hf, fx = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
        for proj in ("query", "key", "value"):
            table[f"{hf}.attention.self.{proj}.weight"] = (
                fx + ("attention", proj, "kernel"),
                LINEAR_TO_HEADS,
            )
            table[f"{hf}.attention.self.{proj}.bias"] = (
                fx + ("attention", proj, "bias"),
                BIAS_TO_HEADS,
            )
        table[f"{hf}.attention.output.dense.weight"] = (
            fx + ("attention", "out", "kernel"),
            LINEAR_FROM_HEADS,
        )
        table[f"{hf}.attention.output.dense.bias"] = (fx + ("attention", "out", "bias"), IDENTITY)
        table.update(_layer_norm(f"{hf}.attention.output.LayerNorm", fx + ("attention_LayerNorm",)))
        table.update(_linear(f"{hf}.intermediate.dense", fx + ("ffn", "intermediate")))
        table.update(_linear(f"{hf}.output.dense", fx + ("ffn", "output")))
        table.update(_layer_norm(f"{hf}.output.LayerNorm", fx + ("output_LayerNorm",)))
    if mlm_transform:
        table.update(_linear("cls.predictions.transform.dense", ("cmlm_head", "dense")))
        table.update(_layer_norm("cls.predictions.transform.LayerNorm", ("cmlm_head", "LayerNorm")))
    return table


def _looks_like_local_path(name: str) -> bool:
    """True for names that can only be a local path (not ``org/model`` Hub ids)."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or not _HUB_ID.fullmatch(name)
    )


def local_folder_or_hub_id(path_or_name) -> Path | None:
    """The checkpoint folder ``path_or_name`` names, or None when it is a Hub model id
    (no such local path, and a valid id). A missing path that cannot be a Hub id (absolute,
    ``./``, ``~``, two or more ``/``) is a :class:`CheckpointNotFound` saying that the path
    does not exist; a file is refused too."""
    path = Path(os.path.expanduser(str(path_or_name)))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder with config.json")
    if _looks_like_local_path(str(path_or_name)):
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        raise CheckpointNotFound(
            f"no checkpoint folder at {path_or_name}: the path does not exist ("
            f"{path.absolute()}"
            + (f"; the nearest existing folder is {parent})" if parent else ")")
        )
    return None


def not_a_local_folder(path_or_name) -> str:
    """The part of a message saying a Hub-like name is no local folder either."""
    return (
        f"the path {path_or_name} does not exist (no folder "
        f"{Path(str(path_or_name)).absolute()}), and as a Hugging Face Hub model id"
    )


def resolve_checkpoint(path_or_name, *, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub name, downloaded (config, safetensors and
    tokenizer files only) into the Hugging Face cache."""
    path = local_folder_or_hub_id(path_or_name)
    if path is not None:
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id=str(path_or_name), revision=revision, allow_patterns=list(HUB_PATTERNS)
            )
        )
    except Exception as e:  # offline, unknown repo, network errors, bad revision
        raise CheckpointUnavailable(
            f"{path_or_name!r} is not a local folder: {not_a_local_folder(path_or_name)} it "
            f"could not be downloaded from the Hugging Face Hub (revision={revision!r}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a folder (one file, or the shards of an index)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(
                f"{index}: not a safetensors index with a 'weight_map' ({e})"
            ) from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {absent}")
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickle weights {pickles}: pickle checkpoints are refused "
            "(loading them can run arbitrary code) and were not opened. Convert once, in an "
            "environment you trust, with transformers + torch: "
            "AutoModel.from_pretrained(folder).save_pretrained(out, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def _read_config(folder: Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e


def _expected_shapes(model: BertModel, with_head: bool) -> dict[FlaxPath, tuple]:
    """Flax path -> shape of every parameter ``model.init`` creates (traced, not run)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    method = model.cmlm_logits if with_head else model.__call__
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, method=method))
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes["params"]))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _set(tree: dict, path: FlaxPath, value) -> None:
    """tree[path[0]][path[1]]... = value, creating the intermediate dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _damaged_weights(file: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{file} is not a readable safetensors file ({type(err).__name__}: {err}); it may be "
        "truncated or damaged: copy or download it again"
    )


def _open_weights(file: Path):
    """``safe_open`` of one weight file; a truncated or foreign file is a CheckpointError
    naming it."""
    from safetensors import SafetensorError

    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise _damaged_weights(file, err) from None


def _index_keys(files: list[Path]) -> dict[str, tuple[Path, str]]:
    """Key without the ``bert.`` prefix -> (file, key as stored), over all weight files."""
    sources: dict[str, tuple[Path, str]] = {}
    for file in files:
        with _open_weights(file) as f:
            for key in f.keys():
                name = key[len("bert.") :] if key.startswith("bert.") else key
                if name in sources:
                    raise CheckpointError(f"{file}: key {key!r} appears twice in the checkpoint")
                sources[name] = (file, key)
    return sources


def _read_params(
    files: list[Path],
    sources: dict[str, tuple[Path, str]],
    table: dict[str, tuple[FlaxPath, Transform]],
    expected: dict[FlaxPath, tuple],
) -> dict:
    """Reads every tensor of ``table`` (file by file), checks its shape against the one
    ``expected`` from the config and returns the nested float32 ``params`` dict."""
    from safetensors import SafetensorError

    params: dict = {}
    for file in files:
        with _open_weights(file) as f:
            for hf_key, (flax_path, transform) in table.items():
                source_file, key = sources[hf_key]
                if source_file != file:
                    continue
                found = tuple(f.get_slice(key).get_shape())
                want = transform.hf_shape(expected[flax_path])
                if found != want:
                    raise CheckpointError(
                        f"{file}: key {key!r} has shape {found}, expected {want} from config.json"
                    )
                try:
                    array = f.get_tensor(key).astype(np.float32)
                except (SafetensorError, OSError, ValueError) as err:
                    raise _damaged_weights(file, err) from None
                _set(params, flax_path, jnp.asarray(transform.to_flax(array, expected[flax_path])))
    return params


def load_bert(
    path_or_name,
    *,
    cmlm_vocab_size: int | None = None,
    dtype: Any = jnp.float32,
    revision: str | None = None,
    attention_impl: str = "einsum",
) -> tuple[BertModel, dict, BertConfig]:
    """Loads a Hugging Face BERT checkpoint into ``(model, params, config)``.

    ``params`` is the plain ``params`` collection (nested dict of float32 arrays, use as
    ``model.apply({"params": params}, ...)``); its tree is exactly that of
    ``model.init(rng, input_ids)["params"]`` (unboxed). With ``cmlm_vocab_size`` set and a
    checkpoint that carries BERT's MLM transform (``cls.predictions.transform.*``), the
    transform is also loaded into ``params["cmlm_head"]`` (``dense``, ``LayerNorm``);
    ``distill_jax.models.bert.init_cmlm_head`` then adds the output projection.
    ``dtype`` is the compute dtype and ``attention_impl`` the attention kernel
    (``layers.MultiHeadAttention.implementation``). Keys may carry the ``bert.`` prefix or not.
    """
    folder = resolve_checkpoint(path_or_name, revision=revision)
    config = BertConfig.from_hf_dict(
        _read_config(folder),
        cmlm_vocab_size=cmlm_vocab_size,
        dtype=dtype,
        attention_impl=attention_impl,
    )
    model = BertModel(config)
    files = _safetensors_files(folder)
    sources = _index_keys(files)

    has_transform = any(k.startswith("cls.predictions.transform.") for k in sources)
    load_transform = has_transform and cmlm_vocab_size is not None
    table = bert_key_table(config, mlm_transform=load_transform)
    expected = _expected_shapes(model, with_head=load_transform)
    ignored = re.compile(
        "|".join(
            IGNORED_KEYS + ((r"cls\.predictions\.transform\..*",) if not load_transform else ())
        )
    )
    unknown = sorted(k for k in sources if k not in table and not ignored.fullmatch(k))
    if unknown:
        raise CheckpointError(
            f"{folder}: checkpoint keys not explained by config.json "
            f"(num_hidden_layers={config.num_hidden_layers}): {unknown[:10]}"
            + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        )

    missing = [k for k in table if k not in sources]
    if missing:
        raise CheckpointError(
            f"{folder}: checkpoint is missing key(s) {missing[:10]} "
            f"(for {'/'.join(table[missing[0]][0])}, ...)"
        )
    params = _read_params(files, sources, table, expected)
    return model, params, config


def load_tokenizer(path_or_name, *, revision: str | None = None):
    """The checkpoint's own fast WordPiece tokenizer (``transformers.AutoTokenizer``)."""
    from transformers import AutoTokenizer

    folder = resolve_checkpoint(path_or_name, revision=revision)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise CheckpointError(f"{folder} has no tokenizer (neither tokenizer.json nor vocab.txt)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    if not tokenizer.is_fast:
        raise CheckpointError(
            f"{folder}: no fast tokenizer could be built (got {type(tokenizer).__name__})"
        )
    return tokenizer
