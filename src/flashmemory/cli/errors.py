"""Turning expected failures into one-line messages instead of tracebacks."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..models.loader import BackboneError
from ..policies import BudgetError
from ..runtime.cache import ContextLengthError
from ..runtime.engine import PromptError

#: Errors that mean "the input is wrong", as opposed to a bug.
USER_ERRORS = (ConfigError, BackboneError, BudgetError, ContextLengthError, PromptError, FileNotFoundError,
               ValueError)


def fail(message: str) -> int:
    print(f"flashmemory: error: {message}", file=sys.stderr)
    return 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not state a default itself and X says something
    (None and False defaults stay silent: the help explains what leaving the option out means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
