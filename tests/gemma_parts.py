"""The real Gemma-3-270m in tests: its name, and a skip marker for when its part packages are not installed."""

from __future__ import annotations

import importlib.util

import pytest

from flashmemory.models.loader import EMBEDDED_MODELS

GEMMA = "gemma3-270m"

needs_gemma = pytest.mark.skipif(
    any(importlib.util.find_spec(module) is None for module, _ in EMBEDDED_MODELS[GEMMA].parts),
    reason="the Gemma-3-270m part packages are not installed")
