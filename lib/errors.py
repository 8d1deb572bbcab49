"""The one error type for user mistakes.

A `UserError` says what is wrong, where (file:line, config key, directory) and how to fix it.
`main.py` prints its message on one line and exits non-zero, without a traceback; everything
else (a bug) keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's config, data, model directory or checkpoint."""
