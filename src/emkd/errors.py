"""Errors a user can fix: a recipe, a path, a data record, a pair of models that do not fit together.

The ``emkd`` command prints a :class:`UserError` as one line, ``emkd COMMAND: error: MESSAGE``, and exits with
status 2; any other exception is a bug of ours and keeps its traceback. ``--debug`` (or ``EMKD_DEBUG=1``) shows
the traceback of a :class:`UserError` too. It subclasses ``ValueError`` so that library callers who catch
``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong; the message says what, where (file, key, record) and what to do."""


__all__ = ["UserError"]
