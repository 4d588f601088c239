"""The ``distill-jax`` subcommands, one module each (``add_arguments(parser)`` and
``run(args) -> int``). They parse arguments and wire library pieces together; nothing in
the library imports them."""
