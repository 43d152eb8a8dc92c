"""Errors a user can fix: a recipe, a path, a data record, a pair of models that do not fit together.

The ``emkd`` command prints a :class:`UserError` as one line, ``emkd COMMAND: error: MESSAGE``, and exits with
status 2; any other exception is a bug of ours and keeps its traceback. ``--debug`` (or ``EMKD_DEBUG=1``) shows
the traceback of a :class:`UserError` too. A subclass may choose another status (``exit_code``). It subclasses ``ValueError`` so that library callers who catch
``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong; the message says what, where (file, key, record) and what to do.

    ``exit_code`` is the status the ``emkd`` command exits with.
    """

    exit_code: int = 2


class NonFiniteError(UserError):
    """Training produced a non-finite loss, loss component, gradient norm or weight (the recipe's hyperparameters,
    most often its learning rate, not a bug of ours). Nothing non-finite was written: the newest complete checkpoint
    is the last good one. ``emkd train`` prints it as one line and exits with status 3."""

    exit_code = 3


class OutputDirError(UserError):
    """The run's ``output_dir`` is in use by a live run, holds another run, or holds no checkpoint ``--resume`` may
    take; the message says which and what to pass (``--resume``, ``--overwrite``, another ``output_dir``)."""


__all__ = ["NonFiniteError", "OutputDirError", "UserError"]
