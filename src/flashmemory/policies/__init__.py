"""Selection policies: which chunks of history are resident during the next cycle."""

from __future__ import annotations

from .base import BudgetError, PagePlan, SelectionContext, SelectionPolicy, choose_pages
from .baselines import FullPolicy, RandomPolicy, RecencyPolicy, StreamingPolicy
from .kvzip import KVzipPolicy
from .oracle import OraclePolicy
from .quest import QuestPolicy
from .snapkv import SnapKVPolicy

#: The policy used when none is named (the API, the CLI and the server): the learned indexer.
DEFAULT_POLICY = "lsa"

_REGISTRY: dict[str, type[SelectionPolicy]] = {}


def register_policy(cls: type[SelectionPolicy]) -> type[SelectionPolicy]:
    """Make a policy class available by its `name` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (FullPolicy, RecencyPolicy, RandomPolicy, StreamingPolicy, QuestPolicy, OraclePolicy, SnapKVPolicy,
             KVzipPolicy):
    register_policy(_cls)


def policy_names() -> list[str]:
    _load_optional()
    return sorted(_REGISTRY)


def _load_optional() -> None:
    # The learned policies live beside the indexers; importing them registers `lsa` and `deepseek-lsa`.
    try:
        from . import deepseek_lsa, lsa  # noqa: F401
    except ImportError:
        pass


def make_policy(policy: str | SelectionPolicy, **kwargs) -> SelectionPolicy:
    """A policy instance from its name (or the instance itself)."""
    if isinstance(policy, SelectionPolicy):
        return policy
    _load_optional()
    if not isinstance(policy, str) or policy not in _REGISTRY:
        raise ValueError(f"unknown policy {policy!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[policy](**kwargs)


__all__ = ["DEFAULT_POLICY", "BudgetError", "PagePlan", "SelectionContext", "SelectionPolicy", "choose_pages", "make_policy",
           "policy_names", "register_policy", "FullPolicy", "RecencyPolicy", "RandomPolicy", "StreamingPolicy",
           "QuestPolicy", "OraclePolicy", "SnapKVPolicy", "KVzipPolicy"]
