"""The error contract shared by the library and its command-line tools.

Errors a user causes (a missing or malformed file, an empty dataset, a wrong flag combination, a
checkpoint that does not match) derive from :class:`UserError`. The library raises them with a
message that names the file, line or field; every console script reports them as one line,
``m2-<tool>: error: <message>``, and exits with status 2 (:func:`run_cli`). Anything else is a
bug and keeps its traceback.

Torch-free, so that the tools can report argument errors before importing anything heavy.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

__all__ = ["UserError", "ConfigError", "USER_OS_ERRORS", "is_user_error", "error_line",
           "report_error", "fail", "run_cli", "DEBUG_ENV"]

DEBUG_ENV = "M2_DEBUG"
"""Set to 1 to get the traceback of user errors too (for reporting a problem)."""

USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                  FileExistsError)
"""Operating-system errors about a path the user gave: reported as user errors."""


class UserError(Exception):
    """Base class of errors caused by the user's input or configuration (reported as one line,
    exit status 2)."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field (or flag)."""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix (one line) rather than a bug (a traceback)."""
    return isinstance(exc, (UserError,) + USER_OS_ERRORS)


def error_line(prog: str, exc_or_msg) -> str:
    """``"<prog>: error: <message>"`` on one line (newlines in the message are folded)."""
    if isinstance(exc_or_msg, BaseException):
        exc = exc_or_msg
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            msg = f"{exc.filename}: {exc.strerror}"
    else:
        msg = str(exc_or_msg)
    msg = " ".join(msg.strip().strip("'\"").split()) or type(exc_or_msg).__name__
    return f"{prog}: error: {msg}"


def report_error(prog: str, exc_or_msg) -> None:
    """Write :func:`error_line` to stderr (and flush: the process may end right after)."""
    sys.stderr.write(error_line(prog, exc_or_msg) + "\n")
    sys.stderr.flush()
    _record_for_torchrun(error_line(prog, exc_or_msg))


def fail(prog: str, exc_or_msg, status: int = 2) -> NoReturn:
    """Report :func:`error_line` (a message or an exception) and end the process with
    ``status``: for code that runs outside :func:`run_cli`'s handler (a training rank's loop)
    and must exit with one line, not a traceback."""
    report_error(prog, exc_or_msg)
    raise SystemExit(status)


def _record_for_torchrun(line: str) -> None:
    """Under torchrun, also write the message to the worker's error file, so that torchrun's
    closing summary names it as the root cause instead of "<N/A>"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    import json
    import time

    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


def run_cli(prog: str, main: Callable[[Optional[Sequence[str]]], int],
            argv: Optional[Sequence[str]] = None) -> int:
    """Run a console script's ``main(argv)`` under the error contract: a :class:`UserError`
    (or an OS error about a given path) becomes one line and exit status 2; Ctrl-C exits 130
    with one line; other exceptions keep their traceback. ``M2_DEBUG=1`` re-raises everything."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        if not is_user_error(exc) or os.environ.get(DEBUG_ENV) == "1":
            raise
        report_error(prog, exc)
        return 2
