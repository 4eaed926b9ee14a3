"""The errors a user's input can cause: one family, one base.

Every ``python -m medjax.X`` entry point prints a :class:`UserError` as one ``error: ...`` line
and exits with status 2 (``medjax.cli_errors.run_cli``); any other exception is a bug in medjax
and keeps its traceback. Raise the class that names *what* the user got wrong, with a message
that names *where* (file:line, dotted config key, tensor name):

- :class:`ConfigError`: a config file, a ``key=value`` override, a command-line option, a path
  given as an argument, a mesh that cannot hold the model;
- :class:`DataError`: training data or benchmark files (``FieldError`` for one record's field,
  before the caller adds ``file:line``);
- :class:`CheckpointError`: model weights, tokenizer files, training checkpoints, an
  architecture medjax does not support.

``UserError`` is a ``ValueError`` so that code written against the built-in keeps working.
This module imports nothing, so any module (``models/`` included) may raise these.
"""


class UserError(ValueError):
    """Bad input from the user; the message is the whole story (no traceback is printed)."""


class ConfigError(UserError):
    """A config key, override, option or argument path that cannot be used; names the key."""


class DataError(UserError):
    """Missing or malformed training/benchmark data; names the file, line/row and field."""


class FieldError(DataError):
    """A record lacks a field or has the wrong type; names the field (the caller adds file:line)."""


class CheckpointError(UserError):
    """Weights, tokenizer files or a training checkpoint that are missing, corrupt, unsupported
    or do not match the model; names the file and tensor."""
