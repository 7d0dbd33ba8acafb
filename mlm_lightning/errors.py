"""User-facing errors: one line that names the problem and the fix.

Everything a user can get wrong (paths, encodings, options, missing hardware) raises `MLMError`.
The CLI prints it as a single line and exits with `exit_code`; `--debug` or `MLM_LIGHTNING_DEBUG=1`
shows the traceback instead.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager


class MLMError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""

    exit_code = 2


class NonFiniteLossError(MLMError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""

    exit_code = 3


class NothingToDo(Exception):
    """The command has nothing to do (e.g. a finished run resumed): the message says why; the exit code is 0."""


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


# -- operating-system errors --------------------------------------------------------------------------------------
# how Rust (safetensors, tokenizers: "(os error 28)"), Python ("[Errno 28]") and torch's C++ ("...: No space left
# on device (28)", checked against the text of that number) put it in a message
_ERRNO_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]|: ([^:()]+) \((\d+)\)\s*$")


def os_error(e: BaseException) -> OSError | None:
    """The operating-system error behind `e`: `e` itself, its direct cause, or one a library reported only as text
    (safetensors and tokenizers raise "... (os error 28)")."""
    for candidate in (e, e.__cause__):
        if isinstance(candidate, OSError) and candidate.errno:
            return candidate
    # (the context only of a RuntimeError: torch's zip writer raises one while handling the OSError of the write)
    for candidate in (e, e.__cause__, e.__context__ if isinstance(e, RuntimeError) else None):
        found = _ERRNO_TEXT.search(str(candidate)) if candidate is not None else None
        if found and (found.group(3) is None or found.group(3) == os.strerror(int(found.group(4)))):
            code = int(found.group(1) or found.group(2) or found.group(4))
            return OSError(code, os.strerror(code), getattr(candidate, "filename", None))
    return None


@contextmanager
def writing(path: str, temporary: tuple[str, ...] = ()):
    """Report an OS error raised inside as one about `path` where the OS named no file (write() and close() name
    none) or named one of our own temporary files (`temporary`: their path prefixes), which are gone by then."""
    try:
        yield
    except Exception as e:
        error = os_error(e)
        if error is None:
            raise
        named = error.filename if isinstance(error.filename, str) else None
        if named and not os.path.abspath(named).startswith(tuple(os.path.abspath(t) for t in temporary)):
            raise
        raise OSError(error.errno, error.strerror, path) from e


def first_line(e: BaseException) -> str:
    """An exception's message as one short line (its class name when it has none), for the one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
