"""distill-jax: distil knowledge learned by a C-MLM fine-tuned BERT into a Transformer
sequence-to-sequence student (Chen et al., ACL 2020), in JAX/Flax."""

__version__ = "0.1.0"
