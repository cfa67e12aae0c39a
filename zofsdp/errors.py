"""Errors that are the user's to fix. The CLI prints their message as one line (no traceback) and exits 2.

Raise `UserError` where the input is wrong (a config value, a path, a data file, a checkpoint) and say
what to change. Anything else is a bug or an environment failure and keeps its traceback.
`UserError` subclasses ValueError so that callers catching ValueError (and older tests) still do.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message says what to change."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the input names does not exist."""
