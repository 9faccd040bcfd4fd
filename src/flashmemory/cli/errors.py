"""Turning expected failures into one-line messages instead of tracebacks."""

from __future__ import annotations

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
