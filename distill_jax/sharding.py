"""Device mesh, logical-axis rules and sharded state creation.

The mesh has three axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor (model) parallelism over heads, the feed-forward width and the vocabulary

``LOGICAL_AXIS_RULES`` is the single table that maps the logical names used by the
models (see ``distill_jax.models.layers``) onto these mesh axes.
"""

from __future__ import annotations

# (logical name, mesh axis or axes or None)
LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)
