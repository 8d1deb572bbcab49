"""The one error type for user mistakes.

A `UserError` says what is wrong, where (file:line, config key, directory) and how to fix it.
`main.py` prints its message on one line and exits non-zero, without a traceback; everything
else (a bug) keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's config, data, model directory or checkpoint."""


class Preempted(Exception):
    """SIGTERM arrived during training: the trainer saved a checkpoint and stopped. Not an
    error: ``main.py`` prints the message and exits 0, and the same command resumes."""
