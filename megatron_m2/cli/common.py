"""What every console script shares: the help formatter and the error contract.

Help: each flag's default is shown exactly once, by the formatter (``(default: X)``), so help
texts never state defaults themselves; flags whose default is "off" or "none" show none.
Errors: see :mod:`megatron_m2.errors` (one line ``m2-<tool>: error: ...``, exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..errors import error_line, run_cli

__all__ = ["ArgumentParser", "HelpFormatter", "run_cli", "shows_default"]


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` shows this flag's default: not for switches, help-less or positional
    arguments, or defaults that mean "not set" (None, False, empty)."""
    if action.help in (None, argparse.SUPPRESS) or not action.option_strings:
        return False
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse._HelpAction, argparse._VersionAction)):
        return False
    return action.default not in (None, False, argparse.SUPPRESS, "", [], ())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their line breaks); each flag's
    default appended once as ``(default: X)`` (see :func:`shows_default`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if shows_default(action) and "%(default)" not in text:
            default = action.default
            if isinstance(default, (list, tuple)):
                default = " ".join(str(x) for x in default)
            text += f" (default: {str(default).replace('%', '%%')})"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the project's help formatter, whose usage errors are one
    line (``prog: error: ... (see prog --help)``, exit status 2) like every other user error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(error_line(self.prog, f"{message} (see {self.prog} --help)") + "\n")
        sys.exit(2)
