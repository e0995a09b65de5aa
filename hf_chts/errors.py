"""``UserError``: a problem with what the user gave hf_chts (recipe, checkpoint, flag, folder).

The ``hf-chts`` command prints such errors as one line and exits with status 2
(``ValueError``, ``FileNotFoundError`` and the other ``OSError`` s count as user
errors too); any other exception is an internal error (status 1, traceback and
a request to report it). ``UserError`` subclasses ``ValueError`` so callers that
already catch ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the file or field and the fix."""
