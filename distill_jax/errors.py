"""Exceptions shared across the package."""


class UserError(Exception):
    """An error caused by the user's input (a file, a flag, a config field).

    The CLI prints its message without a traceback and exits with status 2.
    """
