"""User-facing errors: one line that names the problem and the fix.

Everything a user can get wrong (paths, encodings, options, missing hardware) raises `MLMError`.
The CLI prints it as a single line and exits with `exit_code`; `--debug` or `MLM_LIGHTNING_DEBUG=1`
shows the traceback instead.
"""

from __future__ import annotations


class MLMError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""

    exit_code = 2


class NonFiniteLossError(MLMError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""

    exit_code = 3


def check(condition: bool, message: str) -> None:
    """Raise `MLMError(message)` unless `condition` holds."""
    if not condition:
        raise MLMError(message)


class Interrupted(BaseException):
    """A stop by SIGINT/SIGTERM where no checkpoint is due (before training, or a second Ctrl-C).

    A `BaseException`, like `KeyboardInterrupt`, so no `except Exception` swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
